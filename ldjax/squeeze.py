"""The squeezing effect: the closed-form one-step update of a softmax under an identity kernel.

SPEC §2; Ren & Sutherland, "Learning Dynamics of LLM Finetuning", ICLR 2025, §3.3 and
Appendix (the squeezing lemma). With an identity kernel (one free logit vector, or linear
softmax regression ``z = Wᵀx`` on one input, where ``K = ‖x‖² I``) one cross-entropy step of
size α on label ȳ moves the logits by a multiple of the residual ``π − e_ȳ``:

    negative gradient (sign = −1, push ȳ down):  z' = z + α (π − e_ȳ)
    positive gradient (sign = +1, SFT on ȳ):      z' = z − α (π − e_ȳ)

so that ``π'_i = π_i e^{Δz_i} / Z`` with ``Z = Σ_j π_j e^{Δz_j}``. For the negative step the
non-label classes gain ``Δz_i = α π_i``; class i rises iff ``π_i > τ = log(Z)/α``.

Theorems (checked on every case): 1 the label falls; 2 the strongest other class y* rises;
3 the threshold rule is exact and the ratio ``π'_i/π_i`` increases with ``π_i``; 7 a positive
step's ratio decreases with ``π_i`` among non-targets (no squeeze). Tendencies (measured over
sweeps, not asserted per case): 4 peakedness, 5 valley labels and 6 pushing down the peak;
see :func:`tendency_peakedness`, :func:`tendency_label_rank`, :func:`tendency_peak_pushdown`.

Every claim function computes what the lemma *predicts* from the closed form (``τ``, ``Z``) and
what *actually* happens (the softmax of the updated logits), in float64, and reports both.
"""
from __future__ import annotations

import dataclasses
from decimal import Decimal, localcontext
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEGATIVE = -1  # gradient ascent on CE(ȳ): push the label down (the rejected side of DPO)
POSITIVE = +1  # gradient descent on CE(y): SFT

# Classes whose float64 *predicted* log-ratio (closed form) lies within this many nats of zero
# are reported as "ambiguous" (a tie at the threshold), not counted for or against a claim.
TIE_MARGIN = 1e-9
# The *actual* outcome of a step is computed in decimal arithmetic with this many digits, so that
# changes far below float64 resolution (e.g. π_ȳ = 1 − 1e-8 moving by 1e-16) are still decided.
EXACT_DIGITS = 60


class SqueezeInputError(ValueError):
    """Logits, labels, α or sign given to :mod:`ldjax.squeeze` are not usable."""


def _validate(logits: Any, label: Any = None, alpha: Any = None, sign: Any = None) -> None:
    shape = np.shape(logits)
    if len(shape) < 1 or shape[-1] < 2:
        raise SqueezeInputError(f"logits must have a trailing class axis of size >= 2, got shape {shape}")
    if label is not None:
        label_dtype = label.dtype if hasattr(label, "dtype") else np.asarray(label).dtype
        if not np.issubdtype(label_dtype, np.integer):
            raise SqueezeInputError(f"label must be an integer class id, got dtype {label_dtype}")
        if np.shape(label) != shape[:-1]:
            raise SqueezeInputError(f"label shape {np.shape(label)} does not match logits batch shape {shape[:-1]}")
        if not isinstance(label, jax.core.Tracer):
            lab = np.asarray(label)
            if np.any((lab < 0) | (lab >= shape[-1])):
                raise SqueezeInputError(f"label {lab} outside [0, {shape[-1]}) for logits of shape {shape}")
    if alpha is not None and not isinstance(alpha, jax.core.Tracer) and np.any(np.asarray(alpha) < 0):
        raise SqueezeInputError(f"alpha (step size η‖x‖²) must be >= 0, got {alpha}")
    if sign is not None and sign not in (NEGATIVE, POSITIVE):
        raise SqueezeInputError(f"sign must be -1 (negative gradient) or +1 (positive/SFT), got {sign!r}")


# --- the closed form -------------------------------------------------------------------------------
# Each function takes numpy or JAX arrays and answers in kind: numpy float64 for the claim checks
# (exact, no per-shape compilation over thousands of generated cases), jax.numpy inside jit.
def _xp(x: Any):
    return jnp if isinstance(x, (jax.Array, jax.core.Tracer)) else np


def log_probabilities(logits: Any) -> Any:
    """``log softmax(z)`` over the last axis (stable: shifts by the max)."""
    xp = _xp(logits)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def probabilities(logits: Any) -> Any:
    """``π = softmax(z)`` over the last axis."""
    return _xp(logits).exp(log_probabilities(logits))


def entropy(logits: Any) -> Any:
    """Shannon entropy (nats) of ``softmax(z)``, shape ``logits.shape[:-1]``."""
    xp = _xp(logits)
    logp = log_probabilities(logits)
    return -xp.sum(xp.exp(logp) * logp, axis=-1)


def _one_hot(label: Any, num_classes: int, dtype: Any, xp: Any) -> Any:
    return (xp.arange(num_classes) == xp.asarray(label)[..., None]).astype(dtype)


def logit_change(logits: jax.Array, label: jax.Array, alpha: Any, sign: int = NEGATIVE) -> jax.Array:
    """``Δz = −sign · α (π − e_label)``: one CE step of size α under an identity kernel.

    Args:
      logits: (..., V).
      label: (...,) integer class the step is taken on.
      alpha: scalar or (...,) step size (η‖x‖² for linear softmax regression).
      sign: ``NEGATIVE`` (−1) pushes the label down, ``POSITIVE`` (+1) is an SFT step.

    Returns:
      (..., V).
    """
    _validate(logits, label, alpha, sign)
    xp = _xp(logits)
    residual = probabilities(logits) - _one_hot(label, logits.shape[-1], logits.dtype, xp)
    return -sign * xp.asarray(alpha, logits.dtype)[..., None] * residual


def one_step_logits(logits: jax.Array, label: jax.Array, alpha: Any, sign: int = NEGATIVE) -> jax.Array:
    """``z' = z + Δz`` (see :func:`logit_change`), shape (..., V)."""
    return logits + logit_change(logits, label, alpha, sign)


def one_step_probabilities(logits: jax.Array, label: jax.Array, alpha: Any, sign: int = NEGATIVE) -> jax.Array:
    """``π' = softmax(z')`` after one step, shape (..., V)."""
    return probabilities(one_step_logits(logits, label, alpha, sign))


def log_partition(logits: jax.Array, delta_logits: jax.Array) -> jax.Array:
    """``log Z = log Σ_j π_j e^{Δz_j}``, so that ``log π'_i − log π_i = Δz_i − log Z``; shape (...,)."""
    shifted = log_probabilities(logits) + delta_logits
    top = _xp(logits).max(shifted, axis=-1)
    return top + _xp(logits).log(_xp(logits).sum(_xp(logits).exp(shifted - top[..., None]), axis=-1))


def threshold(logits: jax.Array, label: jax.Array, alpha: Any) -> jax.Array:
    """The lemma's threshold ``τ = log(Z)/α`` for a negative step: class ``i ≠ ȳ`` rises iff ``π_i > τ``.

    Returns:
      (...,) τ (can be negative: then every non-label class rises).
    """
    delta = logit_change(logits, label, alpha, NEGATIVE)
    return log_partition(logits, delta) / _xp(logits).asarray(alpha, logits.dtype)


def rising_by_rule(logits: jax.Array, delta_logits: jax.Array) -> jax.Array:
    """The general rule for ANY logit change: class i rises iff ``Δz_i > log Σ_j π_j e^{Δz_j}``.

    For the negative step (``Δz_i = α π_i`` off the label) this is the lemma's ``π_i > τ``.
    Returns a boolean (..., V).
    """
    return delta_logits > log_partition(logits, delta_logits)[..., None]


def combined_logit_change(logits: jax.Array, pos_label: jax.Array, neg_label: jax.Array,
                          alpha_pos: Any, alpha_neg: Any) -> jax.Array:
    """DPO-like step on one input: SFT on ``y⁺`` (size α⁺) plus push-down of ``y⁻`` (size α⁻).

    ``Δz = −α⁺(π − e⁺) + α⁻(π − e⁻)``; off both labels ``Δz_i = (α⁻ − α⁺) π_i``, so the others
    rise iff ``(α⁻ − α⁺) π_i > log Z``: a squeeze threshold when α⁻ > α⁺, none (a uniform
    rescaling by ``1/Z``) when α⁻ = α⁺ — DPO's equal coefficients under an identity kernel.
    """
    return logit_change(logits, pos_label, alpha_pos, POSITIVE) + logit_change(logits, neg_label, alpha_neg, NEGATIVE)


def steps_logit_change(logits: Any, steps: Sequence[tuple[int, float]]) -> Any:
    """Several simultaneous identity-kernel CE steps on one input: ``Δz = Σ_k c_k (π − e_{l_k})``.

    ``steps = [(label, c)]``: ``c = +α`` pushes ``label`` down (negative gradient), ``c = −α`` is
    an SFT step on it. Shape (V,) for logits (V,).
    """
    _validate(logits)
    xp = _xp(logits)
    p = probabilities(logits)
    delta = xp.zeros_like(logits)
    for label, c in steps:
        _validate(logits, np.int64(label))
        delta = delta + c * (p - _one_hot(label, logits.shape[-1], logits.dtype, xp))
    return delta


# --- linear softmax regression: a real gradient step with K = (‖x‖² [+1]) I ---------------------------
def linear_softmax_logits(params: dict, x: jax.Array) -> jax.Array:
    """``z = x W (+ b)`` for params ``{"w": (d, V)[, "b": (V,)]}`` and x (..., d)."""
    z = x @ params["w"]
    return z + params["b"] if "b" in params else z


def linear_softmax_alpha(x: jax.Array, lr: Any, *, bias: bool) -> jax.Array:
    """``α = η K`` with ``K = ‖x‖² (+1 with a bias)``: the identity-kernel step size of one input."""
    return lr * (_xp(x).sum(x * x, axis=-1) + (1.0 if bias else 0.0))


def linear_softmax_step(params: dict, x: jax.Array, label: jax.Array, lr: Any, sign: int = NEGATIVE) -> dict:
    """One gradient step on ``sign · CE(softmax(x W + b), label)`` for a single input x (d,).

    Written out: ``W' = W − sign · η x (π − e)ᵀ``, ``b' = b − sign · η (π − e)``, so
    ``z' = z − sign · η (‖x‖² + 1)(π − e)``: the closed form with α = :func:`linear_softmax_alpha`.
    """
    _validate(linear_softmax_logits(params, x), label, lr, sign)
    z = linear_softmax_logits(params, x)
    xp = _xp(z)
    residual = probabilities(z) - _one_hot(label, z.shape[-1], z.dtype, xp)
    new = {"w": params["w"] - sign * lr * xp.outer(x, residual)}
    if "b" in params:
        new["b"] = params["b"] - sign * lr * residual
    return new


# --- the claims --------------------------------------------------------------------------------------
def _f64(logits: Any) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64)


def _log_ratio(logits: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Float64 ``log π'_i − log π_i`` from the softmax of the updated logits."""
    return log_probabilities(logits + delta) - log_probabilities(logits)


def _digits_needed(logits: np.ndarray, coefficients: Sequence[float]) -> int:
    """:data:`EXACT_DIGITS` plus the decades separating the logits' scale from their smallest gap
    (and from the smallest step), so that near-equal classes are still told apart."""
    scale = max(1.0, float(np.max(np.abs(logits))))
    gaps = np.diff(np.unique(logits))
    extra = np.log10(scale) - np.log10(gaps.min()) if gaps.size else 0.0
    small = min((abs(c) for c in coefficients if c != 0), default=1.0)
    extra += max(0.0, -np.log10(small))
    return EXACT_DIGITS + int(np.ceil(max(0.0, extra)))


def _exact_step(logits: np.ndarray, steps: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """What a step actually does, in :data:`EXACT_DIGITS`-digit decimal arithmetic.

    The float64 logits are taken exactly; the step is ``Δz = Σ_k c_k (π − e_{l_k})`` for
    ``steps = [(l_k, c_k)]`` (``c = +α`` pushes ``l`` down, ``c = −α`` is an SFT step), and the
    updated distribution is the softmax of ``z + Δz`` — computed independently of the closed form.

    Returns:
      ``(probs, log_ratio)`` as numpy object arrays of ``Decimal`` (exact comparisons, no ties
      invented or hidden by rounding).
    """
    def log_softmax(values):
        top = max(values)
        shifted = [v - top for v in values]
        exps = [v.exp() for v in shifted]
        log_total = sum(exps).ln()
        return [v - log_total for v in shifted], exps, sum(exps)

    with localcontext() as ctx:
        ctx.prec = _digits_needed(logits, [c for _, c in steps])
        z = [Decimal(float(v)) for v in logits]
        logp, exps, total = log_softmax(z)
        probs = [e / total for e in exps]
        coef_sum = sum(Decimal(float(c)) for _, c in steps)
        delta = [coef_sum * p for p in probs]
        for label, c in steps:
            delta[label] -= Decimal(float(c))
        logp_new, _, _ = log_softmax([a + d for a, d in zip(z, delta)])
        log_ratio = [n - o for n, o in zip(logp_new, logp)]
    return np.array(probs, dtype=object), np.array(log_ratio, dtype=object)


def _others(num_classes: int, *exclude: int) -> np.ndarray:
    keep = np.ones(num_classes, bool)
    keep[list(exclude)] = False
    return np.flatnonzero(keep)


def _monotone(values: np.ndarray, keys: np.ndarray, increasing: bool) -> bool:
    """Whether exact ``values`` (log-ratios) strictly move with exact ``keys`` (probabilities).

    Sorted by key: where consecutive keys differ the values must differ in the given direction;
    where keys are equal the values must be equal.
    """
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    for a, b in zip(order[:-1], order[1:]):
        if keys[b] == keys[a]:
            if values[b] != values[a]:
                return False
        elif (values[b] > values[a]) != increasing or values[b] == values[a]:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class LabelFalls:
    """Claim 1: ``π'_ȳ < π_ȳ``."""
    holds: bool
    prob_before: float
    prob_after: float
    log_change: float


@dataclasses.dataclass(frozen=True)
class ArgmaxRises:
    """Claim 2: ``y* = argmax_{i≠ȳ} π_i`` gains, ``π'_{y*} > π_{y*}``."""
    holds: bool
    argmax: int
    prob_before: float
    prob_after: float
    gain: float


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """Claim 3 (and its generalisation): the predicted risers are exactly the actual risers.

    ``predicted_risers``/``actual_risers`` are sorted class ids among ``considered``;
    ``n_ambiguous`` classes sit within :data:`TIE_MARGIN` nats of the threshold and are
    excluded from the comparison; ``ratio_monotone`` says whether ``π'_i/π_i`` increases with
    ``π_i`` (claim 3) — ``None`` where the rule is not the lemma's.
    """
    holds: bool
    tau: float
    log_partition: float
    predicted_risers: np.ndarray
    actual_risers: np.ndarray
    n_ambiguous: int
    ratio_monotone: bool | None


@dataclasses.dataclass(frozen=True)
class PositiveNoSqueeze:
    """Claim 7: after an SFT step the non-target ratio ``π'_i/π_i = e^{−απ_i}/Z'`` decreases with ``π_i``."""
    holds: bool
    target_rises: bool
    largest_loser: int
    log_ratio_range: tuple[float, float]


def claim_label_falls(logits: Any, label: int, alpha: float) -> LabelFalls:
    """Claim 1 on one case: pushing ȳ down lowers ``π_ȳ`` (for any α > 0)."""
    z = _f64(logits)
    _validate(z, np.int64(label), alpha)
    probs, log_ratio = _exact_step(z, [(label, alpha)])
    change = log_ratio[label]
    return LabelFalls(holds=bool(change < 0), prob_before=float(probs[label]),
                      prob_after=float(probs[label] * change.exp()), log_change=float(change))


def claim_argmax_rises(logits: Any, label: int, alpha: float) -> ArgmaxRises:
    """Claim 2 on one case: the largest class other than ȳ gains probability."""
    z = _f64(logits)
    _validate(z, np.int64(label), alpha)
    probs, log_ratio = _exact_step(z, [(label, alpha)])
    others = _others(z.shape[-1], label)
    star = int(max(others, key=lambda i: probs[i]))
    after = probs[star] * log_ratio[star].exp()
    return ArgmaxRises(holds=bool(log_ratio[star] > 0), argmax=star, prob_before=float(probs[star]),
                       prob_after=float(after), gain=float(after - probs[star]))


def _compare_rule(z: np.ndarray, delta: np.ndarray, considered: np.ndarray, exact_log_ratio: np.ndarray):
    """Predicted risers (``Δz_i > log Z``, float64 closed form) vs actual risers (exact step).

    Returns ``(predicted, actual, clear, log_z)``; ``clear`` marks the considered classes whose
    predicted log-ratio is farther than :data:`TIE_MARGIN` from zero.
    """
    log_z = float(log_partition(z, delta))
    margin = delta[considered] - log_z  # predicted log-ratio from the closed form
    clear = np.abs(margin) > TIE_MARGIN
    predicted = considered[clear & (margin > 0)]
    actual = considered[clear & np.array([exact_log_ratio[i] > 0 for i in considered], dtype=bool)]
    return predicted, actual, clear, log_z


def claim_threshold_rule(logits: Any, label: int, alpha: float) -> ThresholdRule:
    """Claim 3 on one case: for ``i ≠ ȳ``, ``π'_i > π_i ⇔ π_i > τ = log(Z)/α``, and the ratio
    ``π'_i/π_i`` increases strictly with ``π_i``."""
    z = _f64(logits)
    _validate(z, np.int64(label), alpha)
    if alpha <= 0:
        raise SqueezeInputError(f"the threshold τ = log(Z)/α needs alpha > 0, got {alpha}")
    delta = logit_change(z, np.int64(label), alpha, NEGATIVE)
    p = probabilities(z)
    tau = float(threshold(z, np.int64(label), alpha))
    exact_probs, exact_log_ratio = _exact_step(z, [(label, alpha)])
    others = _others(z.shape[-1], label)
    _, actual, clear, log_z = _compare_rule(z, delta, others, exact_log_ratio)
    predicted = others[clear & (p[others] > tau)]  # the lemma's statement, on probabilities
    monotone = _monotone(exact_log_ratio[others], exact_probs[others], increasing=True)
    holds = np.array_equal(predicted, actual) and monotone
    return ThresholdRule(holds=bool(holds), tau=tau, log_partition=log_z, predicted_risers=predicted,
                         actual_risers=actual, n_ambiguous=int(np.sum(~clear)), ratio_monotone=monotone)


def claim_general_rule(logits: Any, steps: Sequence[tuple[int, float]]) -> ThresholdRule:
    """The rule behind claim 3 for ANY logit change: class i rises iff ``Δz_i > log Σ_j π_j e^{Δz_j}``.

    It follows from ``π'_i/π_i = e^{Δz_i}/Z``. ``steps`` as in :func:`steps_logit_change`;
    ``tau`` is ``log Z`` (the threshold on Δz).
    """
    z = _f64(logits)
    delta = steps_logit_change(z, steps)
    _, exact_log_ratio = _exact_step(z, steps)
    predicted, actual, clear, log_z = _compare_rule(z, delta, np.arange(z.shape[-1]), exact_log_ratio)
    return ThresholdRule(holds=bool(np.array_equal(predicted, actual)), tau=log_z, log_partition=log_z,
                         predicted_risers=predicted, actual_risers=actual, n_ambiguous=int(np.sum(~clear)),
                         ratio_monotone=None)


def claim_combined_rule(logits: Any, pos_label: int, neg_label: int, alpha_pos: float, alpha_neg: float) -> ThresholdRule:
    """The generalised threshold rule for the DPO-like step of :func:`combined_logit_change`.

    Every class rises iff ``Δz_i > log Z``. Off both labels ``Δz_i = (α⁻ − α⁺) π_i``, which is
    a threshold on ``π_i``: ``π_i > τ = log Z / (α⁻ − α⁺)`` when α⁻ > α⁺ (squeeze),
    ``π_i < τ`` when α⁻ < α⁺, and all-or-none (``log Z < 0``) when they are equal; ``tau`` is
    reported (``±inf`` for the equal case, sign of ``−log Z``).
    """
    z = _f64(logits)
    if pos_label == neg_label:
        raise SqueezeInputError(f"pos_label and neg_label must differ, both are {pos_label}")
    _validate(z, np.int64(pos_label), alpha_pos)
    _validate(z, np.int64(neg_label), alpha_neg)
    delta = combined_logit_change(z, np.int64(pos_label), np.int64(neg_label), alpha_pos, alpha_neg)
    _, exact_log_ratio = _exact_step(z, [(pos_label, -alpha_pos), (neg_label, alpha_neg)])
    every = np.arange(z.shape[-1])
    predicted, actual, clear, log_z = _compare_rule(z, delta, every, exact_log_ratio)
    slope = alpha_neg - alpha_pos
    tau = log_z / slope if slope != 0 else (-np.inf if log_z < 0 else np.inf)
    return ThresholdRule(holds=bool(np.array_equal(predicted, actual)), tau=float(tau), log_partition=log_z,
                         predicted_risers=predicted, actual_risers=actual, n_ambiguous=int(np.sum(~clear)),
                         ratio_monotone=None)


def claim_positive_step_no_squeeze(logits: Any, label: int, alpha: float) -> PositiveNoSqueeze:
    """Claim 7 on one case: after an SFT step on ``label`` the ratio ``π'_i/π_i`` of the non-targets
    decreases strictly with ``π_i`` (the large ones lose most)."""
    z = _f64(logits)
    _validate(z, np.int64(label), alpha)
    probs, log_ratio = _exact_step(z, [(label, -alpha)])
    others = _others(z.shape[-1], label)
    monotone = _monotone(log_ratio[others], probs[others], increasing=False)
    other_ratios = [float(log_ratio[i]) for i in others]
    return PositiveNoSqueeze(holds=monotone, target_rises=bool(log_ratio[label] > 0),
                             largest_loser=int(others[int(np.argmin(other_ratios))]),
                             log_ratio_range=(min(other_ratios), max(other_ratios)))


CLAIMS = {1: claim_label_falls, 2: claim_argmax_rises, 3: claim_threshold_rule, 7: claim_positive_step_no_squeeze}


# --- measurements for the tendencies 4–6 ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SqueezeStats:
    """Per-case squeeze measurements of a negative step (arrays of shape ``logits.shape[:-1]``).

    Attributes:
      frac_risers: fraction of the non-label classes whose probability rose.
      argmax_gain: ``π'_{y*} − π_{y*}`` for ``y* = argmax_{i≠ȳ} π_i``.
      argmax_share: y*'s share of all the probability mass gained (``Σ_i max(π'_i − π_i, 0)``).
      entropy_change: ``H(π') − H(π)`` in nats.
      all_others_rise: every class but ȳ rose.
      partition_below_one: ``Z < 1`` (sufficient for all others to rise).
      peak_overtaken: ȳ was the argmax and no longer is.
      label_prob, peak_prob: ``π_ȳ`` and ``max_i π_i`` before the step.
    """
    frac_risers: np.ndarray
    argmax_gain: np.ndarray
    argmax_share: np.ndarray
    entropy_change: np.ndarray
    all_others_rise: np.ndarray
    partition_below_one: np.ndarray
    peak_overtaken: np.ndarray
    label_prob: np.ndarray
    peak_prob: np.ndarray


def squeeze_stats(logits: Any, label: Any, alpha: Any) -> SqueezeStats:
    """Measures one negative step on a batch of cases: logits (..., V), label (...,), alpha scalar or (...,)."""
    z = _f64(logits)
    label = np.asarray(label)
    _validate(z, label, alpha)
    delta = logit_change(z, label, np.asarray(alpha, np.float64), NEGATIVE)
    p = probabilities(z)
    p_new = probabilities(z + delta)
    log_z = log_partition(z, delta)
    ent = entropy(z + delta) - entropy(z)
    v = z.shape[-1]
    is_label = _one_hot(label, v, bool, np)
    rose = (p_new > p) & ~is_label
    p_others = np.where(is_label, -1.0, p)
    star = np.argmax(p_others, axis=-1)
    take = lambda a, i: np.take_along_axis(a, i[..., None], axis=-1)[..., 0]  # noqa: E731
    gain = take(p_new, star) - take(p, star)
    gained = np.sum(np.maximum(p_new - p, 0.0), axis=-1)
    was_peak = np.argmax(p, axis=-1) == label
    return SqueezeStats(
        frac_risers=np.sum(rose, axis=-1) / (v - 1),
        argmax_gain=gain,
        argmax_share=np.maximum(gain, 0.0) / np.maximum(gained, np.finfo(np.float64).tiny),
        entropy_change=ent,
        all_others_rise=np.all(rose | is_label, axis=-1),
        partition_below_one=log_z < 0,
        peak_overtaken=was_peak & (np.argmax(p_new, axis=-1) != label),
        label_prob=take(p, label),
        peak_prob=np.max(p, axis=-1),
    )


@dataclasses.dataclass(frozen=True)
class Tendency:
    """A sweep's means: ``x`` is the swept quantity, each other field the mean over samples per x.

    ``spearman`` holds the rank correlation of each measured mean with ``x`` (the sign of the trend).
    """
    name: str
    x_name: str
    x: np.ndarray
    frac_risers: np.ndarray
    argmax_gain: np.ndarray
    argmax_share: np.ndarray
    entropy_rise_rate: np.ndarray
    all_others_rise_rate: np.ndarray
    peak_overtaken_rate: np.ndarray
    spearman: dict

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _tendency(name: str, x_name: str, x: Sequence[float], stats: Sequence[SqueezeStats]) -> Tendency:
    x = np.asarray(x, np.float64)
    fields = dict(
        frac_risers=np.array([s.frac_risers.mean() for s in stats]),
        argmax_gain=np.array([s.argmax_gain.mean() for s in stats]),
        argmax_share=np.array([s.argmax_share.mean() for s in stats]),
        entropy_rise_rate=np.array([(s.entropy_change > 0).mean() for s in stats]),
        all_others_rise_rate=np.array([s.all_others_rise.mean() for s in stats]),
        peak_overtaken_rate=np.array([s.peak_overtaken.mean() for s in stats]),
    )
    spearman = {k: _spearman(x, v) for k, v in fields.items()}
    return Tendency(name=name, x_name=x_name, x=x, spearman=spearman, **fields)


def _random_logits(rng: np.random.Generator, num_samples: int, num_classes: int, scale: float) -> np.ndarray:
    return scale * rng.standard_normal((num_samples, num_classes))


def tendency_peakedness(*, seed: int = 0, num_classes: int = 50, alpha: float = 5.0,
                        scales: Sequence[float] = (0.25, 0.5, 1, 2, 3, 4, 6), num_samples: int = 2000) -> Tendency:
    """Claim 4: logits ``s · N(0, 1)`` (larger s = more peaked π), ȳ a random non-argmax class.

    Expected: as s grows, fewer risers and a larger share of the gained mass goes to y*. ``x``
    is the mean peak probability at each s.
    """
    rng = np.random.default_rng(seed)
    xs, stats = [], []
    for s in scales:
        z = _random_logits(rng, num_samples, num_classes, s)
        top = np.argmax(z, axis=-1)
        label = (top + rng.integers(1, num_classes, num_samples)) % num_classes  # never the argmax
        st = squeeze_stats(z, label, alpha)
        xs.append(st.peak_prob.mean())
        stats.append(st)
    return _tendency("peakedness", "mean peak probability", xs, stats)


def tendency_label_rank(*, seed: int = 0, num_classes: int = 50, alpha: float = 5.0, scale: float = 2.0,
                        ranks: Sequence[int] | None = None, num_samples: int = 2000) -> Tendency:
    """Claim 5: ȳ taken at rank r of π (0 = peak, V−1 = deepest valley); ``x`` is the mean ``π_ȳ``.

    Expected: the smaller ``π_ȳ``, the fewer risers (the stronger the squeeze).
    """
    rng = np.random.default_rng(seed)
    ranks = list(ranks) if ranks is not None else sorted({0, 1, 2, 5, 10, num_classes // 2, num_classes - 1})
    z = _random_logits(rng, num_samples, num_classes, scale)
    order = np.argsort(-z, axis=-1)
    xs, stats = [], []
    for r in ranks:
        st = squeeze_stats(z, order[:, r], alpha)
        xs.append(st.label_prob.mean())
        stats.append(st)
    return _tendency("label_rank", "mean label probability", xs, stats)


def tendency_peak_pushdown(*, seed: int = 0, num_classes: int = 50, scale: float = 2.0,
                           alphas: Sequence[float] = (0.5, 1, 2, 5, 10, 20, 50),
                           num_samples: int = 2000) -> Tendency:
    """Claim 6: ȳ = argmax (on-policy push-down), swept over α; ``x`` is α.

    Reports how often the entropy rises, all others rise, and the old peak is overtaken.
    """
    rng = np.random.default_rng(seed)
    z = _random_logits(rng, num_samples, num_classes, scale)
    label = np.argmax(z, axis=-1)
    stats = [squeeze_stats(z, label, a) for a in alphas]
    return _tendency("peak_pushdown", "alpha", alphas, stats)


@dataclasses.dataclass(frozen=True)
class PeakPushdownGrid:
    """Claim 6 as a function of α *and* of the peak's height (SPEC §2): rates per (α, bin).

    Attributes:
      alphas: (A,) step sizes.
      peak_edges: (P + 1,) bin edges of ``π_ȳ``, the probability of the pushed-down peak.
      count: (P,) cases per bin (the same cases for every α).
      entropy_rise_rate, all_others_rise_rate, partition_below_one_rate, peak_overtaken_rate:
        (A, P) fractions of the bin's cases (NaN for an empty bin).
    """
    alphas: np.ndarray
    peak_edges: np.ndarray
    count: np.ndarray
    entropy_rise_rate: np.ndarray
    all_others_rise_rate: np.ndarray
    partition_below_one_rate: np.ndarray
    peak_overtaken_rate: np.ndarray

    def to_dict(self) -> dict:
        return {k: np.where(np.isnan(v), None, v).tolist() if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                else (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}


def peak_pushdown_grid(*, seed: int = 0, num_classes: int = 50,
                       alphas: Sequence[float] = (0.5, 1, 2, 5, 10, 20, 50),
                       peak_edges: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                       scale_range: tuple[float, float] = (0.25, 6.0), num_samples: int = 5000) -> PeakPushdownGrid:
    """Claim 6 swept over α and the peak's height: ȳ = argmax, logits ``s · N(0, 1)`` with s drawn
    log-uniformly from ``scale_range`` so that the peak probabilities cover (0, 1).

    Per (α, peak-height bin): how often the entropy rises, every other class rises, ``Z < 1``,
    and the old peak is overtaken. By claim 3 every other class rises exactly when
    ``log Z < α · min_{i≠ȳ} π_i``; ``Z < 1`` (τ < 0, SPEC's wording) is sufficient, not necessary:
    on flat distributions the two rates differ by up to ~0.4.
    """
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]), num_samples))
    z = scales[:, None] * rng.standard_normal((num_samples, num_classes))
    label = np.argmax(z, axis=-1)
    edges = np.asarray(peak_edges, np.float64)
    stats = [squeeze_stats(z, label, a) for a in alphas]
    which = np.clip(np.searchsorted(edges, stats[0].peak_prob, side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1)

    def rate(flags: np.ndarray) -> np.ndarray:
        hits = np.bincount(which, weights=flags.astype(np.float64), minlength=len(edges) - 1)
        return np.where(count > 0, hits / np.maximum(count, 1), np.nan)

    return PeakPushdownGrid(
        alphas=np.asarray(alphas, np.float64), peak_edges=edges, count=count,
        entropy_rise_rate=np.stack([rate(s.entropy_change > 0) for s in stats]),
        all_others_rise_rate=np.stack([rate(s.all_others_rise) for s in stats]),
        partition_below_one_rate=np.stack([rate(s.partition_below_one) for s in stats]),
        peak_overtaken_rate=np.stack([rate(s.peak_overtaken) for s in stats]),
    )
