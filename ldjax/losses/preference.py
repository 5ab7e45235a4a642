"""Pairwise preference losses with TRL semantics, and their residual coefficients.

Every loss here depends on the policy only through the two sequence log-probs
``log π(y⁺|x)`` and ``log π(y⁻|x)``, so its gradient w.r.t. the logits of each sequence is
a scalar times ``π − e_y`` per token (SPEC §1.3). ``preference_coefficients`` gives those
scalars in closed form (derived by hand below, checked against ``jax.grad`` in the tests):

    ∂L/∂z_t(χ±) = −g± · (π_t(·|χ±) − e_{y±_t}),   g± = ∂L/∂log π(y±|x)

and SPEC's residual coefficients are ``c± = −g±`` (``residual_coefficients``), so that
``G± = c±(π − y±)`` and SFT has ``c = 1``, DPO ``c⁺ = −c⁻ = β(1 − a)``.

Notation: ``r± = log π(y±|x) − log π_ref(y±|x)`` (the log-ratios), ``d = r⁺ − r⁻``,
``σ`` the logistic function, ``ε`` = ``label_smoothing``.

Sources (TRL, https://github.com/huggingface/trl):

* TRL 1.x ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` (the
  ``for loss_type in self.loss_types`` branches; the version read has ``ld_alpha``,
  ``f_divergence_type`` and ``loss_weights``): rewards ``β r±``; ``sigmoid`` ignores
  ``label_smoothing``; ``ipo`` divides each log-ratio by its completion length; ``bco_pair``
  has no running reward mean; ``aot_pair`` is called ``aot_unpaired``; ``exo_pair`` uses
  ``ε = label_smoothing`` as is (infinite at 0).
* TRL 0.x (0.12 to 0.2x) ``trl/trainer/dpo_trainer.py``, ``DPOTrainer.dpo_loss``:
  ``sigmoid`` is conservative DPO (cDPO) with ``label_smoothing``; ``bco_pair`` subtracts a
  running mean ``δ`` of the rewards; ``exo_pair`` uses ``ε = 1e-3`` when
  ``label_smoothing == 0``. ``ipo``: ``dpo_loss`` itself has no length, but
  ``concatenated_forward`` divides the summed log-probs of policy *and* reference by the
  completion length (``loss_mask.sum(-1)``, not clamped) when ``loss_type == "ipo"``, so
  TRL 0.x trains IPO on the same length-normalised log-ratios as TRL 1.x; only its logged
  rewards differ (``β r±/L±`` instead of ``β r±``). To reproduce TRL 0.x's IPO rewards,
  pass length-averaged log-probs and no lengths.
* TRL ``trl/trainer/cpo_trainer.py``, ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``.

What ldjax uses, per loss type (identical to TRL 1.x wherever TRL 1.x is defined and the
optional arguments are left at their defaults):

============  ==========================================================================
sigmoid       ``−(1−ε) log σ(βd) − ε log σ(−βd)`` (cDPO, TRL 0.x; = TRL 1.x at ε = 0)
hinge         ``max(0, 1 − βd)``  (SLiC / RSO)
ipo           ``(r⁺/L⁺ − r⁻/L⁻ − 1/(2β))²`` with ``chosen_lengths``/``rejected_lengths``
              ``L±`` (clamped at 1): the loss TRL 0.x and 1.x train with. Without
              lengths ``(d − 1/(2β))²`` on summed log-probs (Azar et al.'s formula as
              written; neither TRL version uses it, pass lengths to match TRL)
robust        ``[−(1−ε) log σ(βd) + ε log σ(−βd)] / (1 − 2ε)``  (ε < ½)
exo_pair      ``q_w(log q_w − log(1−ε)) + q_l(log q_l − log ε)``, ``q_w = σ(βd)``,
              ``q_l = σ(−βd)``; ``ε = 1e-3`` when ``label_smoothing == 0`` (TRL 0.x)
nca_pair      ``−log σ(βr⁺) − ½ log σ(−βr⁺) − ½ log σ(−βr⁻)``
bco_pair      ``−log σ(βr⁺ − δ) − log σ(−(βr⁻ − δ))`` with ``bco_delta = δ`` (default 0 =
              TRL 1.x; TRL 0.x passes its running mean of the rewards)
sppo_hard     ``(r⁺ − 1/(2β))² + (r⁻ + 1/(2β))²``
aot           ``f(β Δ_i)``, ``Δ = sort(log π⁺ − log π⁻) − sort(log π_ref⁺ − log π_ref⁻)``,
              ``f(x) = −(1−ε) log σ(x) − ε log σ(−x)``; losses are per *sorted position*
aot_pair      ``f(β Δ_i)``, ``Δ = sort(r⁺) − sort(r⁻)`` (TRL 1.x name ``aot_unpaired``,
              accepted as an alias)
apo_zero      ``1 − σ(βr⁺) + σ(βr⁻)``
apo_down      ``σ(βr⁺) + 1 − σ(βd)``
discopop      ``x = βd``, ``m = σ(x/τ)``: ``−log σ(x)(1−m) + e^{−x} m`` (``discopop_tau = τ``,
              default 0.05 as TRL)
simpo         reference free: ``x = β(ℓ⁺ − ℓ⁻) − γ`` with length-normalised log-probs ``ℓ``;
              ``−(1−ε) log σ(x) − ε log σ(−x)``; ``γ`` from ``gamma`` or ``simpo_gamma``
              (default 0.5 as TRL's ``CPOConfig``). Pass summed log-probs together with
              ``chosen_lengths``/``rejected_lengths``, or already averaged log-probs
              without lengths. Rewards ``β ℓ±`` as TRL's CPO trainer.
============  ==========================================================================

Rewards are ``β r±`` for every type but ``simpo`` (TRL 1.x logs ``β · logratios`` for all
types, also for length-normalised IPO).
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ldjax.losses.errors import LossInputError

__all__ = [
    "LOSS_TYPES",
    "preference_loss",
    "preference_coefficients",
    "residual_coefficients",
]

_log_sigmoid = jax.nn.log_sigmoid
_sigmoid = jax.nn.sigmoid


class _Pair(NamedTuple):
    """What a loss branch sees. ``chosen``/``rejected`` are policy log-probs."""

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array | None
    ref_rejected: jax.Array | None
    beta: float
    label_smoothing: float
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None
    options: dict

    @property
    def chosen_logratio(self):
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self):
        return self.rejected - self.ref_rejected


# A branch returns (losses, ∂ΣL/∂log π(y⁺), ∂ΣL/∂log π(y⁻)), each (B,). The gradients are
# those of the *summed* loss so that the batch-coupled AOT losses have a meaning too; for
# every other type ∂ΣL/∂log π_j = ∂L_j/∂log π_j.
_Branch = Callable[[_Pair], tuple[jax.Array, jax.Array, jax.Array]]


def _smoothed_logistic(x, eps):
    """``f(x) = −(1−ε) log σ(x) − ε log σ(−x)`` and ``f'(x) = −(1−ε) σ(−x) + ε σ(x)``."""
    value = -(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
    slope = -(1 - eps) * _sigmoid(-x) + eps * _sigmoid(x)
    return value, slope


def _sigmoid_branch(p: _Pair):
    beta = p.beta
    d = p.chosen_logratio - p.rejected_logratio
    loss, slope = _smoothed_logistic(beta * d, p.label_smoothing)
    return loss, beta * slope, -beta * slope


def _hinge_branch(p: _Pair):
    beta = p.beta
    d = p.chosen_logratio - p.rejected_logratio
    margin = 1 - beta * d
    active = (margin > 0).astype(d.dtype)
    return jnp.maximum(margin, 0), -beta * active, beta * active


def _ipo_branch(p: _Pair):
    beta = p.beta
    scale_c, scale_r = _length_scales(p, "ipo")
    h = p.chosen_logratio * scale_c - p.rejected_logratio * scale_r
    error = h - 1 / (2 * beta)
    # dL/dh = 2(h − 1/(2β)): changes sign once the margin passes its target (SPEC §1.3).
    return error**2, 2 * error * scale_c, -2 * error * scale_r


def _robust_branch(p: _Pair):
    beta, eps = p.beta, p.label_smoothing
    x = beta * (p.chosen_logratio - p.rejected_logratio)
    loss = (-(1 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1 - 2 * eps)
    slope = (-(1 - eps) * _sigmoid(-x) - eps * _sigmoid(x)) / (1 - 2 * eps)
    return loss, beta * slope, -beta * slope


def _exo_pair_branch(p: _Pair):
    beta = p.beta
    # where() rather than an if: label_smoothing may be traced under jit.
    eps = jnp.where(p.label_smoothing == 0, 1e-3, p.label_smoothing)
    x = beta * (p.chosen_logratio - p.rejected_logratio)
    q_w, q_l = _sigmoid(x), _sigmoid(-x)
    log_q_w, log_q_l = _log_sigmoid(x), _log_sigmoid(-x)
    log_p_w, log_p_l = jnp.log1p(-eps), jnp.log(eps)
    loss = q_w * (log_q_w - log_p_w) + q_l * (log_q_l - log_p_l)
    # dq_w/dx = −dq_l/dx = q_w q_l and log q_w − log q_l = x, so the +1 terms cancel.
    slope = q_w * q_l * (x - log_p_w + log_p_l)
    return loss, beta * slope, -beta * slope


def _nca_pair_branch(p: _Pair):
    beta = p.beta
    u, v = beta * p.chosen_logratio, beta * p.rejected_logratio
    loss = -_log_sigmoid(u) - 0.5 * _log_sigmoid(-u) - 0.5 * _log_sigmoid(-v)
    return loss, beta * (-_sigmoid(-u) + 0.5 * _sigmoid(u)), beta * 0.5 * _sigmoid(v)


def _bco_pair_branch(p: _Pair):
    beta, delta = p.beta, p.options["bco_delta"]
    u = beta * p.chosen_logratio - delta
    v = beta * p.rejected_logratio - delta
    loss = -_log_sigmoid(u) - _log_sigmoid(-v)
    return loss, -beta * _sigmoid(-u), beta * _sigmoid(v)


def _sppo_hard_branch(p: _Pair):
    half_inv_beta = 0.5 / p.beta
    winner = p.chosen_logratio - half_inv_beta
    loser = p.rejected_logratio + half_inv_beta
    return winner**2 + loser**2, 2 * winner, 2 * loser


def _scatter_to_examples(sorted_values, order):
    """Value at sorted position i belongs to example ``order[i]``."""
    return jnp.zeros_like(sorted_values).at[order].set(sorted_values)


def _aot_branch(p: _Pair):
    beta = p.beta
    logratios = p.chosen - p.rejected
    ref_logratios = p.ref_chosen - p.ref_rejected
    order = jnp.argsort(logratios)
    delta = logratios[order] - jnp.sort(ref_logratios)
    loss, slope = _smoothed_logistic(beta * delta, p.label_smoothing)
    grad = _scatter_to_examples(beta * slope, order)
    return loss, grad, -grad


def _aot_pair_branch(p: _Pair):
    beta = p.beta
    chosen, rejected = p.chosen_logratio, p.rejected_logratio
    order_c, order_r = jnp.argsort(chosen), jnp.argsort(rejected)
    delta = chosen[order_c] - rejected[order_r]
    loss, slope = _smoothed_logistic(beta * delta, p.label_smoothing)
    return (
        loss,
        _scatter_to_examples(beta * slope, order_c),
        _scatter_to_examples(-beta * slope, order_r),
    )


def _apo_zero_branch(p: _Pair):
    beta = p.beta
    s_c, s_r = _sigmoid(beta * p.chosen_logratio), _sigmoid(beta * p.rejected_logratio)
    return 1 - s_c + s_r, -beta * s_c * (1 - s_c), beta * s_r * (1 - s_r)


def _apo_down_branch(p: _Pair):
    beta = p.beta
    s_c = _sigmoid(beta * p.chosen_logratio)
    s_d = _sigmoid(beta * (p.chosen_logratio - p.rejected_logratio))
    loss = s_c + 1 - s_d
    return loss, beta * (s_c * (1 - s_c) - s_d * (1 - s_d)), beta * s_d * (1 - s_d)


def _discopop_branch(p: _Pair):
    beta, tau = p.beta, p.options["discopop_tau"]
    x = beta * (p.chosen_logratio - p.rejected_logratio)
    m = _sigmoid(x / tau)
    dm = m * (1 - m) / tau
    logistic, exponential = -_log_sigmoid(x), jnp.exp(-x)
    loss = logistic * (1 - m) + exponential * m
    slope = -_sigmoid(-x) * (1 - m) - logistic * dm - exponential * m + exponential * dm
    return loss, beta * slope, -beta * slope


def _simpo_branch(p: _Pair):
    beta, gamma = p.beta, p.options["gamma"]
    scale_c, scale_r = _length_scales(p, "simpo")
    x = beta * (p.chosen * scale_c - p.rejected * scale_r) - gamma
    loss, slope = _smoothed_logistic(x, p.label_smoothing)
    return loss, beta * slope * scale_c, -beta * slope * scale_r


_BRANCHES: dict[str, _Branch] = {
    "sigmoid": _sigmoid_branch,
    "hinge": _hinge_branch,
    "ipo": _ipo_branch,
    "robust": _robust_branch,
    "exo_pair": _exo_pair_branch,
    "nca_pair": _nca_pair_branch,
    "bco_pair": _bco_pair_branch,
    "sppo_hard": _sppo_hard_branch,
    "aot": _aot_branch,
    "aot_pair": _aot_pair_branch,
    "aot_unpaired": _aot_pair_branch,
    "apo_zero": _apo_zero_branch,
    "apo_down": _apo_down_branch,
    "discopop": _discopop_branch,
    "simpo": _simpo_branch,
}

LOSS_TYPES: tuple[str, ...] = tuple(_BRANCHES)
_REFERENCE_FREE = frozenset({"simpo"})
_OPTION_DEFAULTS = {"gamma": 0.5, "discopop_tau": 0.05, "bco_delta": 0.0}


def _length_scales(p: _Pair, loss_type: str):
    """1/length per side (lengths clamped at 1 as TRL), or 1 without lengths."""
    if p.chosen_lengths is None:
        return 1.0, 1.0
    dtype = p.chosen.dtype
    scale_c = 1 / jnp.maximum(p.chosen_lengths.astype(dtype), 1)
    scale_r = 1 / jnp.maximum(p.rejected_lengths.astype(dtype), 1)
    return scale_c, scale_r


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _options(loss_type: str, kw: dict) -> dict:
    kw = dict(kw)
    options = dict(_OPTION_DEFAULTS)
    if "gamma" in kw and "simpo_gamma" in kw:
        raise LossInputError("pass SimPO's margin as either gamma or simpo_gamma, not both")
    if "simpo_gamma" in kw:
        kw["gamma"] = kw.pop("simpo_gamma")
    unknown = sorted(set(kw) - set(_OPTION_DEFAULTS))
    if unknown:
        raise LossInputError(
            f"unknown keyword argument(s) {unknown} for preference loss {loss_type!r}; "
            f"accepted: {sorted(_OPTION_DEFAULTS) + ['simpo_gamma']}"
        )
    options.update(kw)
    if _is_number(options["discopop_tau"]) and options["discopop_tau"] <= 0:
        raise LossInputError(f"discopop_tau must be > 0, got {options['discopop_tau']}")
    return options


def _as_logps(name: str, value) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise LossInputError(f"{name} must be floating point, got dtype {array.dtype}")
    if array.ndim != 1:
        raise LossInputError(f"{name} must have shape (B,), got {array.shape}")
    return array


def _pair(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type,
    beta,
    label_smoothing,
    chosen_lengths,
    rejected_lengths,
    kw,
) -> _Pair:
    if loss_type not in _BRANCHES:
        raise LossInputError(
            f"unknown loss_type {loss_type!r}; supported: {', '.join(LOSS_TYPES)}"
        )
    if _is_number(beta) and not beta > 0:
        raise LossInputError(f"beta must be > 0, got {beta}")
    if _is_number(label_smoothing):
        upper = 0.5 if loss_type == "robust" else 1.0
        if not 0 <= label_smoothing < upper:
            raise LossInputError(
                f"label_smoothing must be in [0, {upper}) for loss_type {loss_type!r}, "
                f"got {label_smoothing}"
            )
    chosen = _as_logps("policy_chosen_logps", policy_chosen_logps)
    rejected = _as_logps("policy_rejected_logps", policy_rejected_logps)
    arrays = {"policy_rejected_logps": rejected}
    if loss_type in _REFERENCE_FREE:
        ref_chosen = ref_rejected = None
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise LossInputError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        ref_chosen = _as_logps("ref_chosen_logps", ref_chosen_logps)
        ref_rejected = _as_logps("ref_rejected_logps", ref_rejected_logps)
        arrays.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise LossInputError("pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        chosen_lengths, rejected_lengths = jnp.asarray(chosen_lengths), jnp.asarray(rejected_lengths)
        arrays.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    for name, array in arrays.items():
        if array.shape != chosen.shape:
            raise LossInputError(
                f"{name} has shape {array.shape}, expected {chosen.shape} like policy_chosen_logps"
            )
    return _Pair(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        options=_options(loss_type, kw),
    )


def preference_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    **kw,
):
    """Per-example preference loss and implicit rewards, with TRL ``DPOTrainer`` semantics.

    Args:
      policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs
        ``log π_θ(y±|x)`` (see ``sequence_logps``); for ``simpo`` see the module table.
      ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs (``None`` allowed for
        ``simpo``, which ignores them).
      loss_type: one of ``LOSS_TYPES``; formulas and TRL version notes in the module
        docstring.
      beta: inverse temperature β (IPO: the regulariser τ).
      label_smoothing: ε for ``sigmoid`` (cDPO), ``robust``, ``exo_pair``, ``aot``,
        ``aot_pair``, ``simpo``; ignored by the others.
      chosen_lengths, rejected_lengths: optional (B,) response token counts; used by
        ``ipo`` (length-normalised as TRL 0.x and 1.x train it) and ``simpo``; ignored
        by the others.
      **kw: ``gamma``/``simpo_gamma`` (SimPO margin), ``discopop_tau``, ``bco_delta``.

    Returns:
      ``(losses, chosen_rewards, rejected_rewards)``, each (B,). Average ``losses`` for a
      batch loss. For ``aot``/``aot_pair`` entry i belongs to sorted position i, not to
      example i (as TRL); only their mean is meaningful.
    """
    pair = _pair(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        kw=kw,
    )
    losses, _, _ = _BRANCHES[loss_type](pair)
    if loss_type in _REFERENCE_FREE:
        scale_c, scale_r = _length_scales(pair, loss_type)
        chosen_rewards = beta * pair.chosen * scale_c
        rejected_rewards = beta * pair.rejected * scale_r
    else:
        chosen_rewards = beta * pair.chosen_logratio
        rejected_rewards = beta * pair.rejected_logratio
    # Rewards are diagnostics: no gradient flows through them (TRL detaches them too).
    return losses, jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)


def preference_coefficients(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    **kw,
):
    """``(g⁺, g⁻) = (∂L/∂log π(y⁺|x), ∂L/∂log π(y⁻|x))`` per example, in closed form.

    ``L`` is ``sum(preference_loss(...)[0])`` with the same arguments, so ``g±[j]`` is the
    derivative w.r.t. ``policy_chosen_logps[j]`` / ``policy_rejected_logps[j]`` (for every
    type but ``aot``/``aot_pair`` that is just ``∂L_j/∂log π_j``). The logits gradient of
    each sequence is ``−g± (π − e_y)`` per scored token, i.e. SPEC §1.3's ``G±`` with
    ``c± = −g±`` (see ``residual_coefficients`` and ``sequence_residual``).

    Examples (SPEC §1.3): DPO ``g⁺ = −g⁻ = −β(1 − a)``, ``a = σ(βd)``; IPO
    ``g⁺ = −g⁻ = 2h − 1/β``; hinge ``g⁺ = −g⁻ = −β·1[βd < 1]``.

    Returns:
      ``(g_plus, g_minus)``, each (B,), in the dtype of the log-probs.
    """
    pair = _pair(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        kw=kw,
    )
    _, g_plus, g_minus = _BRANCHES[loss_type](pair)
    shape = pair.chosen.shape
    return jnp.broadcast_to(g_plus, shape), jnp.broadcast_to(g_minus, shape)


def residual_coefficients(*args, **kwargs):
    """SPEC §1.3's ``(c⁺, c⁻) = (−∂L/∂log π(y⁺|x), −∂L/∂log π(y⁻|x))``.

    Same arguments as ``preference_coefficients``. With these, the residual of each
    sequence is ``G± = c±(π(·|χ±) − y±)`` (``sequence_residual(..., c±)``) and one SGD
    step changes the observed log-probs by ``−η Σ A (K⁺G⁺ + K⁻G⁻)``. DPO:
    ``c⁺ = −c⁻ = β(1 − a)``; SFT would be ``c = 1``.
    """
    g_plus, g_minus = preference_coefficients(*args, **kwargs)
    return -g_plus, -g_minus
