"""The A·K·G decomposition of one update for sequences: SFT and preference losses (SPEC §1.2–1.5).

An *update batch* (SFT examples, or preference pairs under any ``loss_type`` of
:func:`ldjax.losses.preference_loss`) takes one step; an *observed batch* of (prompt, response)
sequences is watched. To first order in the step, every observed token's log-probability moves by

    Δ log π(y_m | χ_o, y_<m) = [A(χ_o)]_{m-1} Δz_{m-1}(χ_o) read at y_m,   Δz(χ_o) = J(χ_o) u

for the parameter update ``u``. For one SGD step ``u = −η ∇_θ L = −η Σ_s J(χ_s)ᵀ G_s`` with one
term per update sequence ``s`` (SPEC §1.2, §1.3, paper eq. (5)–(7)):

    [Δ log π(·|χ_o)]_m = −η Σ_l [A]_m ( [K(χ_o,χ⁺)]_{m,l} [G⁺]_l + [K(χ_o,χ⁻)]_{m,l} [G⁻]_l )

- ``[A]_m = I − 1 π_mᵀ`` (softmax Jacobian at logits row m),
- ``[K(χ_o, χ_s)]_{m,l} = ∂z_m(χ_o)/∂θ · (∂z_l(χ_s)/∂θ)ᵀ`` (V×V blocks of the eNTK),
- ``[G_s]_l = c_s (π_l(·|χ_s) − e_{y_{l+1}})`` on rows whose next token is scored, zero elsewhere,
  with ``c_s`` the residual coefficient (SFT ``c = 1``; preference ``c± = residual_coefficients``)
  times the batch reduction (``1/B`` for a mean over examples).

**Positions.** Logits row ``t − 1`` predicts token ``t``. Per-token outputs (``tokens``) are
aligned with ``input_ids`` like :func:`ldjax.losses.token_logps`: entry ``t`` is the change of
``log π(input_ids[t] | input_ids[<t])``, zero where ``loss_mask`` does not score ``t`` and at
``t = 0``. The logits-grid terms ``A``, ``K``, ``G`` are indexed by logits *rows* ``r``
(row ``r`` predicts token ``r + 1``), as :func:`ldjax.losses.sequence_residual` lays out ``G``.
Per-update-position contributions are indexed by the update *token* ``l`` (whose residual sits
on row ``l − 1``).

**Loss and reductions** match :mod:`ldjax.train.objectives` (``sft_objective``,
``preference_objective``): the SFT per-example loss is ``−log π(y|x)`` (a sum over response
tokens; ``reduction="mean_token"`` divides by the response length), preference losses get the
response lengths (length-normalised IPO, SimPO), and the batch loss is the *mean* over examples
(``batch_reduction="mean"``; ``"sum"`` adds them). So the SGD step here is ``−η`` times the
gradient of the loss the training engine minimises (the engine casts logits to float32 first;
here they keep the model's dtype so that float64 checks are exact).

Routes:

- implicit (any size; K never formed): one VJP per update sequence gives the training gradient
  ``J_sᵀ G_s``, one JVP per observed chunk pushes it through the observed sequences
  (:func:`predict_sgd`, :func:`predict_for_update`, :func:`optimizer_step`); the observed batch
  is processed in chunks of ``chunk_size`` sequences (bounded memory, ``jax.lax.map``);
- per update position (small update batches): the JVP along the gradient of one position's
  residual alone, vmapped over positions (:func:`position_contributions`);
- explicit (small vocabularies): ``A``, every ``K`` block (via :func:`ldjax.ntk.empirical_ntk`),
  ``G`` and their contraction (:func:`explicit_decomposition`).

Inputs are the training engine's batch dicts: ``input_ids``/``attention_mask``/``loss_mask``
(B, T) for SFT and for the observed batch; ``chosen_*``/``rejected_*`` and
``ref_chosen_logps``/``ref_rejected_logps`` (B,) for preference updates. Models are given as
``apply_fn(params, inputs) -> logits (N, T, V)`` with ``inputs = {"input_ids",
"attention_mask"}`` (:func:`lm_apply_fn` builds it from any :class:`ldjax.models.CausalLM`; an
``f`` from :func:`ldjax.models.functional.functional` fits as ``lambda p, x: f(p,
x["input_ids"])`` for right-padded batches). The model must be causal (row ``t`` sees tokens
``≤ t``); the explicit route right-pads observed and update sequences to one length.

Every function is pure and jit-able (value checks of the masks run only on concrete arrays);
the compiled kernels take the residual coefficients as data, so one compilation serves every
loss type. For exactness checks use float64 on CPU, or ``jax.default_matmul_precision("highest")``
on accelerators (SPEC §1.5).

Reference: Y. Ren, D. J. Sutherland, "Learning Dynamics of LLM Finetuning", ICLR 2025,
arXiv:2407.10490, §3 (eq. (5)–(7)) and Appendix B.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax.dynamics import DynamicsInputError, softmax_jacobian
from ldjax.losses.preference import LOSS_TYPES, preference_loss, residual_coefficients
from ldjax.losses.sequence import (probability_weighted_logps, probability_weights, response_lengths, sequence_logps,
                                   sequence_residual, sft_loss, token_logps)

__all__ = [
    "SequenceDynamicsError",
    "SFTObjective",
    "PreferenceObjective",
    "ObservedChange",
    "SequencePrediction",
    "PositionContributions",
    "StepResult",
    "ExplicitDecomposition",
    "lm_apply_fn",
    "preference_side",
    "update_loss",
    "update_coefficients",
    "update_residuals",
    "training_gradients",
    "token_logp_change",
    "predict_for_update",
    "predict_sgd",
    "position_contributions",
    "actual_change",
    "optimizer_step",
    "explicit_decomposition",
]

PyTree = Any
ApplyFn = Callable[[PyTree, Mapping[str, jax.Array]], jax.Array]
Batch = Mapping[str, Any]

SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask")
SIDES = ("chosen", "rejected")
BATCH_REDUCTIONS = ("mean", "sum")
SFT_REDUCTIONS = ("sum", "mean_token")


class SequenceDynamicsError(DynamicsInputError):
    """A batch, objective or option given to :mod:`ldjax.sequence_dynamics` is not usable."""


# --------------------------------------------------------------------------------------------
# Objectives: which loss the update batch takes a step on.


@dataclasses.dataclass(frozen=True)
class SFTObjective:
    """SFT as :func:`ldjax.train.objectives.sft_objective`: ``c = 1`` per response (SPEC §1.2).

    Attributes:
      reduction: per example, ``"sum"`` (``−log π(y|x)``, the default) or ``"mean_token"``
        (divided by the number of scored tokens, ``c = 1/L``).
      batch_reduction: ``"mean"`` over examples (the training engine's) or ``"sum"``.
    """

    reduction: str = "sum"
    batch_reduction: str = "mean"

    def __post_init__(self):
        if self.reduction not in SFT_REDUCTIONS:
            raise SequenceDynamicsError(f"SFTObjective.reduction must be one of {SFT_REDUCTIONS}, got {self.reduction!r}")
        if self.batch_reduction not in BATCH_REDUCTIONS:
            raise SequenceDynamicsError(
                f"SFTObjective.batch_reduction must be one of {BATCH_REDUCTIONS}, got {self.batch_reduction!r}")


@dataclasses.dataclass(frozen=True)
class PreferenceObjective:
    """A pairwise loss as :func:`ldjax.train.objectives.preference_objective` (SPEC §1.3).

    The per-pair loss is :func:`ldjax.losses.preference_loss` on the summed response log-probs
    with the response lengths passed (length-normalised IPO, SimPO), reduced over pairs by
    ``batch_reduction``. Its residual coefficients ``c± =``
    :func:`ldjax.losses.residual_coefficients` give ``G± = c±(π − e_y)``.

    Attributes:
      loss_type: one of :data:`ldjax.losses.LOSS_TYPES`.
      beta, label_smoothing: as in :func:`ldjax.losses.preference_loss`.
      batch_reduction: ``"mean"`` over pairs (the training engine's) or ``"sum"``.
      loss_kwargs: extra options (``gamma``, ``discopop_tau``, ``bco_delta``) as a mapping; kept
        as sorted ``(name, value)`` pairs so that the objective is hashable (a static jit argument).
      negative_weight_power: ``α``; > 0 is the engine's probability-weighted negative gradient
        (:func:`ldjax.train.objectives.preference_objective`): the rejected coefficient becomes
        per token, ``c⁻_t = c⁻ π(y⁻_t)^α`` (B, T), so ``G⁻_t = c⁻_t (π − e_y)``.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    batch_reduction: str = "mean"
    loss_kwargs: Any = ()
    negative_weight_power: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise SequenceDynamicsError(f"PreferenceObjective.loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.batch_reduction not in BATCH_REDUCTIONS:
            raise SequenceDynamicsError(
                f"PreferenceObjective.batch_reduction must be one of {BATCH_REDUCTIONS}, got {self.batch_reduction!r}")
        kwargs = dict(self.loss_kwargs)
        object.__setattr__(self, "loss_kwargs", tuple(sorted(kwargs.items())))
        if self.negative_weight_power < 0:
            raise SequenceDynamicsError(
                f"PreferenceObjective.negative_weight_power must be >= 0, got {self.negative_weight_power}")

    @property
    def reference_free(self) -> bool:
        return self.loss_type == "simpo"


Objective = SFTObjective | PreferenceObjective


# --------------------------------------------------------------------------------------------
# Results.


class ObservedChange(NamedTuple):
    """A change of the observed log-probabilities.

    Attributes:
      tokens: (..., B_o, T_o) per observed token, aligned with ``input_ids`` (entry t is the
        change of ``log π(y_t | ...)``), exactly zero where ``loss_mask`` does not score t.
      responses: (..., B_o) per response: the sum of ``tokens`` over t (``log π(y|x)`` is a sum).
    """

    tokens: jax.Array
    responses: jax.Array


class SequencePrediction(NamedTuple):
    """First-order change of one SGD step, split by update sequence (SPEC §1.3).

    Attributes:
      total: the whole predicted change, ``positive + negative``.
      positive: the term of the chosen sequences, ``−η A K(χ_o, χ⁺) G⁺`` (SFT: the only term);
        ``None`` when the split was not asked for.
      negative: the term of the rejected sequences, ``−η A K(χ_o, χ⁻) G⁻`` (the minus sign of
        the push-down sits in ``c⁻``); ``None`` for SFT or without the split.
    """

    total: ObservedChange
    positive: ObservedChange | None
    negative: ObservedChange | None


class PositionContributions(NamedTuple):
    """The SGD prediction split over update token positions.

    Attributes:
      positive: per chosen (SFT: update) token position: ``tokens`` (B_u, T_u, B_o, T_o),
        ``responses`` (B_u, T_u, B_o); entry ``[b, l]`` is the change caused by the residual of
        update token ``l`` of sequence ``b`` alone (zero for unscored ``l`` and ``l = 0``).
      negative: the same over rejected token positions, ``None`` for SFT.
      positive_sum: ``positive`` summed over update positions (the chosen-token group).
      negative_sum: ``negative`` summed (the rejected-token group), ``None`` for SFT.
      total: ``positive_sum + negative_sum``.
    """

    positive: ObservedChange
    negative: ObservedChange | None
    positive_sum: ObservedChange
    negative_sum: ObservedChange | None
    total: ObservedChange


class StepResult(NamedTuple):
    """One real optimizer step with its first-order prediction (:func:`optimizer_step`)."""

    predicted: ObservedChange  # A J_o u for the update u actually taken
    actual: ObservedChange  # log π_new − log π_old
    gap: ObservedChange  # predicted − actual (O(η²))
    new_params: Any
    new_opt_state: Any
    update: Any  # the update u that the optimizer produced


@chex.dataclass(frozen=True)
class ExplicitDecomposition:
    """Every term of one SGD step's first-order effect on the observed sequences (small V).

    Logits-grid terms are indexed by rows (row r predicts token r + 1); the layout of ``K`` is
    :func:`ldjax.ntk.empirical_ntk`'s (neural-tangents') for logits ``(N, T, V)``.

    Attributes:
      A: (B_o, T_o, V, V) ``I − 1 π_rᵀ`` at each observed row.
      K_plus: (B_o, B_u, T_o, T_u, V, V) eNTK blocks ``∂z_r(χ_o)/∂θ (∂z_l(χ⁺)/∂θ)ᵀ`` with the
        chosen (SFT: update) sequences.
      G_plus: (B_u, T_u, V) ``c⁺ (π_l − e_{y_{l+1}})`` on scored rows, zero elsewhere (``c⁺``
        includes the batch reduction).
      K_plus_norms: (B_o, B_u, T_o, T_u) Frobenius norm of each V×V block of ``K_plus``.
      K_minus, G_minus, K_minus_norms: the same with the rejected sequences (``None`` for SFT).
      prediction: :class:`SequencePrediction` contracted from the terms.
      positions: :class:`PositionContributions` contracted from the terms.
    """

    A: jax.Array
    K_plus: jax.Array
    G_plus: jax.Array
    K_plus_norms: jax.Array
    K_minus: jax.Array | None
    G_minus: jax.Array | None
    K_minus_norms: jax.Array | None
    prediction: SequencePrediction
    positions: PositionContributions


# --------------------------------------------------------------------------------------------
# Batches.


def lm_apply_fn(model, **call_kwargs: Any) -> tuple[ApplyFn, PyTree]:
    """``(apply_fn, params)`` for a causal LM ``model(input_ids, attention_mask) -> logits``.

    Like :func:`ldjax.models.functional.functional`, but ``apply_fn(params, inputs)`` takes
    ``inputs = {"input_ids": (N, T), "attention_mask": (N, T)}`` as the training engine calls
    the model. Non-parameter state is closed over. ``apply_fn`` is a
    :class:`~ldjax.models.functional.ModuleApply`: models of one structure give equal ones, so
    the jitted functions here (``apply_fn`` is their static argument) compile once per structure.
    """
    from flax import nnx  # imported here: the rest of this module needs no flax

    from ldjax.models.functional import ModuleApply

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModuleApply(graphdef, rest, call_kwargs=call_kwargs, lm_inputs=True), params


def preference_side(batch: Batch, side: str) -> dict[str, Any]:
    """The ``chosen`` or ``rejected`` sequences of a preference batch as a plain sequence batch
    ``{input_ids, attention_mask, loss_mask}`` (e.g. to observe them)."""
    if side not in SIDES:
        raise SequenceDynamicsError(f"side must be one of {SIDES}, got {side!r}")
    missing = [f"{side}_{k}" for k in SEQUENCE_KEYS if f"{side}_{k}" not in batch]
    if missing:
        raise SequenceDynamicsError(f"preference batch is missing {missing}")
    return {k: batch[f"{side}_{k}"] for k in SEQUENCE_KEYS}


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_sequences(batch: Batch, prefix: str, where: str) -> int:
    """Checks one side's (B, T) arrays; returns B. Value checks only on concrete arrays."""
    keys = [prefix + k for k in SEQUENCE_KEYS]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise SequenceDynamicsError(f"{where}: batch is missing {missing} (has {sorted(batch)})")
    ids, att, mask = (batch[k] for k in keys)
    shape = tuple(jnp.shape(ids))
    if len(shape) != 2 or shape[1] < 2:
        raise SequenceDynamicsError(
            f"{where}: {keys[0]} must have shape (B, T) with T >= 2 (row t-1 predicts token t), got {shape}")
    for k, a in ((keys[1], att), (keys[2], mask)):
        if tuple(jnp.shape(a)) != shape:
            raise SequenceDynamicsError(f"{where}: {k} has shape {tuple(jnp.shape(a))}, expected {shape} like {keys[0]}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise SequenceDynamicsError(f"{where}: {keys[0]} must be integer token ids, got dtype {jnp.result_type(ids)}")
    if _is_concrete(att) and _is_concrete(mask):
        scored = np.asarray(mask)[:, 1:] != 0
        real = np.asarray(att)[:, 1:] != 0
        if np.any(scored & ~real):
            rows = sorted(set(np.nonzero(scored & ~real)[0].tolist()))
            raise SequenceDynamicsError(
                f"{where}: {keys[2]} scores padding tokens ({keys[1]} = 0) in rows {rows}")
        if not np.all(scored.any(axis=1)):
            rows = np.nonzero(~scored.any(axis=1))[0].tolist()
            raise SequenceDynamicsError(
                f"{where}: empty response in rows {rows}: {keys[2]} scores no token after position 0")
    return shape[0]


def _check_update_batch(batch: Batch, objective: Objective, where: str) -> None:
    if not isinstance(batch, Mapping):
        raise SequenceDynamicsError(f"{where}: the update batch must be a dict, got {type(batch).__name__}")
    if isinstance(objective, SFTObjective):
        _check_sequences(batch, "", where + " (update batch)")
        return
    if not isinstance(objective, PreferenceObjective):
        raise SequenceDynamicsError(
            f"{where}: objective must be an SFTObjective or a PreferenceObjective, got {type(objective).__name__}")
    n_c = _check_sequences(batch, "chosen_", where + " (update batch)")
    n_r = _check_sequences(batch, "rejected_", where + " (update batch)")
    if n_c != n_r:
        raise SequenceDynamicsError(f"{where}: {n_c} chosen but {n_r} rejected sequences in the update batch")
    if not objective.reference_free:
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            if k not in batch:
                raise SequenceDynamicsError(
                    f"{where}: loss_type {objective.loss_type!r} needs {k!r} (B,) in the update batch "
                    "(ldjax.train.objectives.reference_logps computes them)")
            if tuple(jnp.shape(batch[k])) != (n_c,):
                raise SequenceDynamicsError(f"{where}: {k} has shape {tuple(jnp.shape(batch[k]))}, expected ({n_c},)")


def _check_observed_batch(batch: Batch, where: str) -> None:
    if not isinstance(batch, Mapping):
        raise SequenceDynamicsError(f"{where}: the observed batch must be a dict, got {type(batch).__name__}")
    _check_sequences(batch, "", where + " (observed batch)")


def _check_logits(apply_fn: ApplyFn, params: PyTree, inputs: Mapping[str, Any], where: str) -> int:
    out = jax.eval_shape(apply_fn, params, dict(inputs))
    shape = tuple(jnp.shape(inputs["input_ids"]))
    if not hasattr(out, "shape") or len(out.shape) != 3 or tuple(out.shape[:2]) != shape:
        raise SequenceDynamicsError(
            f"{where}: apply_fn(params, inputs) must return logits (B, T, V) = {shape + ('V',)}, "
            f"got {getattr(out, 'shape', out)}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise SequenceDynamicsError(f"{where}: apply_fn must return floating-point logits, got {out.dtype}")
    return out.shape[-1]


def _inputs(batch: Batch, prefix: str = "") -> dict[str, jax.Array]:
    return {"input_ids": jnp.asarray(batch[prefix + "input_ids"]),
            "attention_mask": jnp.asarray(batch[prefix + "attention_mask"])}


def _sides(batch: Batch, objective: Objective) -> tuple[tuple[dict, jax.Array], ...]:
    """(model inputs, loss_mask) per update side: one for SFT, (chosen, rejected) otherwise."""
    prefixes = ("",) if isinstance(objective, SFTObjective) else ("chosen_", "rejected_")
    return tuple((_inputs(batch, p), jnp.asarray(batch[p + "loss_mask"])) for p in prefixes)


def _refs(batch: Batch, objective: Objective):
    if isinstance(objective, SFTObjective) or objective.reference_free:
        return None, None
    return jnp.asarray(batch["ref_chosen_logps"]), jnp.asarray(batch["ref_rejected_logps"])


# --------------------------------------------------------------------------------------------
# The loss, its residual coefficients and the training gradient.


def _batch_scale(objective: Objective, n: int) -> float:
    return 1.0 / n if objective.batch_reduction == "mean" else 1.0


def _loss_from_logits(objective: Objective, logits: tuple[jax.Array, ...], sides, refs) -> jax.Array:
    if isinstance(objective, SFTObjective):
        (inputs, mask), = sides
        per_example = sft_loss(logits[0], inputs["input_ids"], mask, reduction=objective.reduction)
    else:
        (in_c, mask_c), (in_r, mask_r) = sides
        rejected = sequence_logps(logits[1], in_r["input_ids"], mask_r)
        if objective.negative_weight_power:
            rejected = probability_weighted_logps(logits[1], in_r["input_ids"], mask_r, objective.negative_weight_power)
        per_example = preference_loss(
            sequence_logps(logits[0], in_c["input_ids"], mask_c), rejected,
            refs[0], refs[1], loss_type=objective.loss_type, beta=objective.beta,
            label_smoothing=objective.label_smoothing, chosen_lengths=response_lengths(mask_c),
            rejected_lengths=response_lengths(mask_r), **dict(objective.loss_kwargs))[0]
    return jnp.mean(per_example) if objective.batch_reduction == "mean" else jnp.sum(per_example)


def _coefficients_from_logits(objective: Objective, logits: tuple[jax.Array, ...], sides, refs) -> tuple[jax.Array, ...]:
    """Residual coefficient per update sequence, batch reduction included: ``−∂L/∂log π(y_s|x)``."""
    if isinstance(objective, SFTObjective):
        (_, mask), = sides
        scale = _batch_scale(objective, mask.shape[0])
        dtype = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
        if objective.reduction == "sum":
            return (jnp.full((mask.shape[0],), scale, dtype),)
        return (scale / jnp.maximum(response_lengths(mask), 1).astype(dtype),)
    (in_c, mask_c), (in_r, mask_r) = sides
    chosen = jax.lax.stop_gradient(sequence_logps(logits[0], in_c["input_ids"], mask_c))
    rejected = jax.lax.stop_gradient(sequence_logps(logits[1], in_r["input_ids"], mask_r))
    c_plus, c_minus = residual_coefficients(
        chosen, rejected, refs[0], refs[1], loss_type=objective.loss_type, beta=objective.beta,
        label_smoothing=objective.label_smoothing, chosen_lengths=response_lengths(mask_c),
        rejected_lengths=response_lengths(mask_r), **dict(objective.loss_kwargs))
    scale = _batch_scale(objective, mask_c.shape[0])
    if objective.negative_weight_power:
        weights = probability_weights(logits[1], in_r["input_ids"], mask_r, objective.negative_weight_power)
        return scale * c_plus, scale * c_minus[:, None] * weights.astype(c_minus.dtype)
    return scale * c_plus, scale * c_minus


# Small graphs, one compile per objective instead of many op-by-op dispatches.
_coefficients_jit = jax.jit(_coefficients_from_logits, static_argnums=0)
_loss_jit = jax.jit(_loss_from_logits, static_argnums=0)


@jax.jit
def _residual(logits, input_ids, loss_mask, coefficient):
    return sequence_residual(logits, input_ids, loss_mask, coefficient).astype(logits.dtype)


def _check_coefficients(coefficients, sides, where: str) -> tuple[jax.Array, ...]:
    coefficients = tuple(coefficients)
    if len(coefficients) != len(sides):
        raise SequenceDynamicsError(
            f"{where}: coefficients must hold {len(sides)} array(s) (one per update side), got {len(coefficients)}")
    out = []
    for c, (_, mask) in zip(coefficients, sides):
        c = jnp.asarray(c)
        if c.shape not in ((mask.shape[0],), mask.shape):
            raise SequenceDynamicsError(
                f"{where}: a coefficient has shape {c.shape}, expected (B,) = ({mask.shape[0]},) or (B, T) = {mask.shape}")
        out.append(c)
    return tuple(out)


def _residuals_and_pullbacks(apply_fn, params, sides, coefficients):
    """Forward (with VJP) per side; the residuals G_s (B, T, V) on logits rows; the pullbacks."""
    outs = [jax.vjp(lambda p, x=inputs: apply_fn(p, x), params) for inputs, _ in sides]
    residuals = tuple(sequence_residual(z, inputs["input_ids"], mask, c).astype(z.dtype)
                      for (z, _), (inputs, mask), c in zip(outs, sides, coefficients))
    return tuple(o[0] for o in outs), residuals, tuple(o[1] for o in outs)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _forward(apply_fn, params, inputs):
    return apply_fn(params, inputs)


def _coefficients(apply_fn, params, batch: Batch, objective: Objective, coefficients, where: str):
    """The residual coefficients, from the objective or the caller's override (checked)."""
    sides = _sides(batch, objective)
    if coefficients is not None:
        return _check_coefficients(coefficients, sides, where)
    if isinstance(objective, SFTObjective):
        # SFT's coefficients depend on the masks only: no forward pass.
        logits = (None,)
    else:
        logits = tuple(_forward(apply_fn, params, inputs) for inputs, _ in sides)
    return _coefficients_jit(objective, logits, sides, _refs(batch, objective))


def update_loss(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, objective: Objective) -> jax.Array:
    """The scalar loss of the update batch, as the training engine computes it.

    Equals ``loss_fn(model, batch)[0]`` of :func:`ldjax.train.objectives.sft_objective` /
    ``preference_objective`` with the same options (up to the engine's float32 cast of the
    logits); its gradient is ``Σ_s J_sᵀ G_s`` (:func:`training_gradients`).
    """
    _check_update_batch(update_batch, objective, "update_loss")
    sides = _sides(update_batch, objective)
    logits = tuple(_forward(apply_fn, params, inputs) for inputs, _ in sides)
    return _loss_jit(objective, logits, sides, _refs(update_batch, objective))


def update_coefficients(apply_fn: ApplyFn, params: PyTree, update_batch: Batch,
                        objective: Objective) -> tuple[jax.Array, ...]:
    """Residual coefficients ``c_s = −∂L/∂log π(y_s|x)`` per update sequence (SPEC §1.3).

    Batch reduction included (a mean over B examples divides by B). SFT: ``(c,)`` with
    ``c = 1/B`` (``"mean_token"``: ``1/(B L)``), from the masks alone; preference: ``(c⁺, c⁻)``
    from :func:`ldjax.losses.residual_coefficients` at the current log-probs (one forward pass
    per side; DPO: ``c⁺ = −c⁻ = β(1 − a)/B``). Each (B,).

    The routes below take these coefficients as data, so their compiled kernels do not depend
    on the loss type, and any other coefficients can be passed instead (``coefficients=``).
    """
    _check_update_batch(update_batch, objective, "update_coefficients")
    return _coefficients(apply_fn, params, update_batch, objective, None, "update_coefficients")


def update_residuals(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, objective: Objective, *,
                     coefficients=None) -> tuple[jax.Array, ...]:
    """``G_s = ∂L/∂z(χ_s) = c_s (π − e_y)`` per update side, each (B, T, V) on logits rows.

    Row ``t − 1`` carries the residual of token ``t`` where ``loss_mask`` scores it; other rows
    are zero. ``coefficients`` overrides :func:`update_coefficients` (one (B,) or (B, T) array
    per side).
    """
    where = "update_residuals"
    _check_update_batch(update_batch, objective, where)
    coefficients = _coefficients(apply_fn, params, update_batch, objective, coefficients, where)
    residuals = []
    for (inputs, mask), c in zip(_sides(update_batch, objective), coefficients):
        residuals.append(_residual(_forward(apply_fn, params, inputs), inputs["input_ids"], mask, c))
    return tuple(residuals)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _side_gradients(apply_fn, params, sides, coefficients):
    _, residuals, pullbacks = _residuals_and_pullbacks(apply_fn, params, sides, coefficients)
    return tuple(pb(g)[0] for pb, g in zip(pullbacks, residuals))


def training_gradients(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, objective: Objective, *,
                       coefficients=None) -> tuple[PyTree, ...]:
    """``J(χ_s)ᵀ G_s`` per update side (one VJP each): SFT ``(∇L,)``, preference ``(d⁺, d⁻)``.

    Their sum is ``∇_θ`` :func:`update_loss` (the training gradient); ``d⁺`` pulls the chosen
    sequences up, ``d⁻`` (with ``c⁻ < 0`` for DPO) pushes the rejected ones down.
    """
    where = "training_gradients"
    _check_update_batch(update_batch, objective, where)
    coefficients = _coefficients(apply_fn, params, update_batch, objective, coefficients, where)
    return _side_gradients(apply_fn, params, _sides(update_batch, objective), coefficients)


# --------------------------------------------------------------------------------------------
# Observed side: A applied and the observed token read, chunk by chunk.


def _next_token_values(rows: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """(B, T) with entry t = ``rows[:, t-1]`` (a per-row scalar), zero where t is not scored."""
    shifted = jnp.concatenate([jnp.zeros_like(rows[:, :1]), rows[:, :-1]], axis=1)
    scored = (jnp.asarray(loss_mask) != 0).at[:, 0].set(False)
    return jnp.where(scored, shifted, jnp.zeros((), rows.dtype))


def token_logp_change(logits: jax.Array, delta_logits: jax.Array, input_ids: jax.Array,
                      loss_mask: jax.Array) -> jax.Array:
    """``[A Δz]`` read at the observed tokens: ``Δz_{t-1}[y_t] − π_{t-1}ᵀ Δz_{t-1}`` (SPEC §1.5).

    The first-order change of :func:`ldjax.losses.token_logps` for a logits change ``Δz``,
    without forming the (B, T, V, V) ``A``.

    Args:
      logits: (B, T, V) where ``A = I − 1 πᵀ`` is evaluated.
      delta_logits: (B, T, V) the logits change ``Δz``.
      input_ids: (B, T) observed tokens.
      loss_mask: (B, T) scored tokens.

    Returns:
      (B, T) aligned with ``input_ids``; zero where not scored and at t = 0.
    """
    if logits.shape != delta_logits.shape or logits.ndim != 3 or logits.shape[:2] != jnp.shape(input_ids):
        raise SequenceDynamicsError(
            f"token_logp_change: logits {logits.shape} and delta_logits {delta_logits.shape} must both be "
            f"(B, T, V) with (B, T) = input_ids' shape {jnp.shape(input_ids)}")
    dtype = jnp.promote_types(jnp.result_type(logits, delta_logits), jnp.float32)
    logits, delta_logits = logits.astype(dtype), delta_logits.astype(dtype)
    # Row t is read at token t + 1 (the last row at a dummy 0, dropped by the shift below).
    next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    picked = jnp.take_along_axis(delta_logits, next_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mean = jnp.sum(jax.nn.softmax(logits, axis=-1) * delta_logits, axis=-1)
    return _next_token_values(picked - mean, input_ids, loss_mask)


def _changes(tokens: jax.Array) -> ObservedChange:
    return ObservedChange(tokens=tokens, responses=jnp.sum(tokens, axis=-1))


def _chunked(observed: dict, chunk_size: int | None):
    """Observed arrays reshaped to (n_chunks, chunk, T); the last chunk padded with copies of
    the last sequence (one compiled shape; the caller drops the padded rows)."""
    n = observed["input_ids"].shape[0]
    size = n if chunk_size is None else min(chunk_size, n)
    n_chunks = -(-n // size)
    pad = n_chunks * size - n

    def reshape(a):
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)
        return a.reshape((n_chunks, size) + a.shape[1:])

    return jax.tree_util.tree_map(reshape, observed), n


def _unchunk(x: jax.Array, n: int, lead: int) -> jax.Array:
    """(n_chunks, *lead axes, chunk, T) -> (*lead axes, n, T)."""
    x = jnp.moveaxis(x, 0, lead)  # (*lead, n_chunks, chunk, T)
    x = x.reshape(x.shape[:lead] + (-1,) + x.shape[lead + 2:])
    return x[(slice(None),) * lead + (slice(0, n),)]


def _directional_changes(apply_fn, params, observed: dict, directions: PyTree, chunk_size) -> jax.Array:
    """(D, B_o, T_o) first-order token log-prob change along each of D stacked directions."""
    chunks, n = _chunked(observed, chunk_size)

    def body(chunk):
        inputs = {"input_ids": chunk["input_ids"], "attention_mask": chunk["attention_mask"]}
        f = lambda p: apply_fn(p, inputs)  # noqa: E731
        logits, delta = jax.vmap(lambda d: jax.jvp(f, (params,), (d,)), out_axes=(None, 0))(directions)
        return jax.vmap(token_logp_change, in_axes=(None, 0, None, None))(
            logits, delta, chunk["input_ids"], chunk["loss_mask"])

    return _unchunk(jax.lax.map(body, chunks), n, 1)


def _cast_like(tree: PyTree, params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda t, p: jnp.asarray(t, jnp.result_type(p)), tree, params)


def _observed_arrays(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(batch[k]) for k in SEQUENCE_KEYS}


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def _changes_along(apply_fn, params, observed, directions, scale, chunk_size):
    """(D, B_o, T_o) along ``scale · d`` for each of the D pytrees in the tuple ``directions``.

    Separate from the gradient so that every route shares one compiled JVP per D."""
    stacked = jax.tree_util.tree_map(lambda *d: scale * jnp.stack(d), *(_cast_like(d, params) for d in directions))
    return _directional_changes(apply_fn, params, observed, stacked, chunk_size)


def _tree_sum(trees) -> PyTree:
    return functools.reduce(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), trees)


def _check_chunk(chunk_size, where: str) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise SequenceDynamicsError(f"{where}: chunk_size must be a positive integer or None, got {chunk_size!r}")


def predict_for_update(apply_fn: ApplyFn, params: PyTree, observed_batch: Batch, update: PyTree, *,
                       chunk_size: int | None = None) -> ObservedChange:
    """First-order change of the observed log-probs for ANY parameter update ``u`` (SPEC §1.4).

    ``Δ log π(y_t|...) ≈ [A J(χ_o) u]_{t-1}[y_t]``: one JVP per observed chunk along ``u``
    (e.g. what an optax optimizer produced; for a diagonal preconditioner P this is
    ``−A J_o P J_uᵀ G``, a preconditioned kernel).

    Args:
      apply_fn: ``apply_fn(params, {"input_ids", "attention_mask"}) -> logits (N, T, V)``.
      params: θ, where the Jacobian is taken.
      observed_batch: ``{input_ids, attention_mask, loss_mask}`` (B_o, T_o).
      update: ``u``, a pytree shaped like ``params``.
      chunk_size: observed sequences per JVP (bounded memory); ``None``: all at once.

    Returns:
      :class:`ObservedChange` with ``tokens`` (B_o, T_o) and ``responses`` (B_o,).
    """
    where = "predict_for_update"
    _check_observed_batch(observed_batch, where)
    _check_chunk(chunk_size, where)
    if jax.tree_util.tree_structure(update) != jax.tree_util.tree_structure(params):
        raise SequenceDynamicsError(
            f"{where}: update has tree structure {jax.tree_util.tree_structure(update)}, "
            f"params has {jax.tree_util.tree_structure(params)}")
    _check_logits(apply_fn, params, _inputs(observed_batch), where)
    return _changes(_changes_along(apply_fn, params, _observed_arrays(observed_batch), (update,), 1.0, chunk_size)[0])


def _check_update_and_observed(apply_fn, params, update_batch, observed_batch, objective, chunk_size, where):
    _check_update_batch(update_batch, objective, where)
    _check_observed_batch(observed_batch, where)
    _check_chunk(chunk_size, where)
    vocab = _check_logits(apply_fn, params, _inputs(observed_batch), where)
    for inputs, _ in _sides(update_batch, objective):
        if _check_logits(apply_fn, params, inputs, where) != vocab:
            raise SequenceDynamicsError(f"{where}: update and observed logits have different vocabularies")


def predict_sgd(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, observed_batch: Batch,
                objective: Objective, *, lr: float, chunk_size: int | None = None, split: bool = True,
                coefficients=None) -> SequencePrediction:
    """First-order change of the observed log-probs after one SGD step ``−η ∇L`` (implicit A·K·G).

    One VJP per update side gives ``d_s = J(χ_s)ᵀ G_s`` (their sum is the training gradient);
    one JVP per observed chunk pushes ``−η d_s`` through the observed sequences, and ``A`` is
    applied at the observed tokens (:func:`token_logp_change`). ``K`` is never formed (SPEC §1.5).

    Args:
      apply_fn: ``apply_fn(params, {"input_ids", "attention_mask"}) -> logits (N, T, V)``.
      params: θ.
      update_batch: SFT ``{input_ids, attention_mask, loss_mask}`` or preference
        ``{chosen_*, rejected_*, ref_chosen_logps, ref_rejected_logps}``.
      observed_batch: ``{input_ids, attention_mask, loss_mask}`` (B_o, T_o).
      objective: :class:`SFTObjective` or :class:`PreferenceObjective`.
      lr: η.
      chunk_size: observed sequences per JVP; ``None``: all at once.
      split: for preference updates, push ``d⁺`` and ``d⁻`` separately (two tangents per chunk)
        to return the positive and negative terms; ``False`` pushes their sum only (one tangent).
      coefficients: overrides :func:`update_coefficients` (one (B,) or (B, T) array per side).

    Returns:
      :class:`SequencePrediction` (``total``, ``positive``, ``negative``), tokens (B_o, T_o) and
      responses (B_o,) each.
    """
    where = "predict_sgd"
    _check_update_and_observed(apply_fn, params, update_batch, observed_batch, objective, chunk_size, where)
    sides = _sides(update_batch, objective)
    coefficients = _coefficients(apply_fn, params, update_batch, objective, coefficients, where)
    split = bool(split) and len(sides) > 1
    grads = _side_gradients(apply_fn, params, sides, coefficients)
    if not split:
        grads = (_tree_sum(grads),)
    tokens = _changes_along(apply_fn, params, _observed_arrays(observed_batch), grads, -lr, chunk_size)
    if isinstance(objective, SFTObjective):
        total = _changes(tokens[0])
        return SequencePrediction(total=total, positive=total, negative=None)
    if not split:
        return SequencePrediction(total=_changes(tokens[0]), positive=None, negative=None)
    return SequencePrediction(total=_changes(tokens[0] + tokens[1]), positive=_changes(tokens[0]),
                              negative=_changes(tokens[1]))


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def _position_tokens(apply_fn, params, sides, observed, coefficients, lr, chunk_size):
    _, residuals, pullbacks = _residuals_and_pullbacks(apply_fn, params, sides, coefficients)
    out = []
    for g, pullback in zip(residuals, pullbacks):
        b, t, _ = g.shape
        # One cotangent per (sequence, logits row): G restricted to that row.
        basis = jnp.eye(b * t, dtype=g.dtype).reshape(b * t, b, t)

        # Every position at once: one vmapped VJP gives B_u·T_u directions, one vmapped JVP per chunk.
        directions = jax.vmap(lambda select: pullback(select[..., None] * g)[0])(basis)
        directions = jax.tree_util.tree_map(lambda d: -lr * d, directions)
        rows = _directional_changes(apply_fn, params, observed, directions, chunk_size)
        rows = rows.reshape((b, t) + observed["input_ids"].shape)
        # Row l-1 holds update token l's residual; the last row's residual is zero.
        out.append(jnp.concatenate([jnp.zeros_like(rows[:, :1]), rows[:, :-1]], axis=1))
    return tuple(out)


def _sum_positions(change: ObservedChange) -> ObservedChange:
    return ObservedChange(tokens=change.tokens.sum(axis=(0, 1)), responses=change.responses.sum(axis=(0, 1)))


def _add(a: ObservedChange, b: ObservedChange | None) -> ObservedChange:
    return a if b is None else ObservedChange(tokens=a.tokens + b.tokens, responses=a.responses + b.responses)


def _positions_result(per_side: tuple[jax.Array, ...]) -> PositionContributions:
    positive = _changes(per_side[0])
    negative = _changes(per_side[1]) if len(per_side) > 1 else None
    positive_sum = _sum_positions(positive)
    negative_sum = None if negative is None else _sum_positions(negative)
    return PositionContributions(positive=positive, negative=negative, positive_sum=positive_sum,
                                 negative_sum=negative_sum, total=_add(positive_sum, negative_sum))


def position_contributions(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, observed_batch: Batch,
                           objective: Objective, *, lr: float, chunk_size: int | None = None,
                           coefficients=None) -> PositionContributions:
    """The SGD prediction split over update token positions (small update batches).

    The contribution of update token ``l`` of sequence ``b`` is the JVP along ``−η J(χ_b)ᵀ
    [G]_{l-1}``, the gradient of that position's residual alone:
    ``−η Σ [A]_m [K]_{m,l-1} [G]_{l-1}`` (SPEC §1.2–1.3). One VJP and one JVP per update
    position, vmapped over all positions (memory: B_u·T_u parameter-sized directions, so for
    small update batches; the observed side is chunked as usual). Positions that are not
    scored (padding, prompt, ``l = 0``) contribute exactly zero. Grouped over chosen and rejected
    positions they give the positive and negative terms of :func:`predict_sgd`, and all together
    its total.

    Args: as :func:`predict_sgd`.

    Returns:
      :class:`PositionContributions`: per position ``tokens`` (B_u, T_u, B_o, T_o) and
      ``responses`` (B_u, T_u, B_o) per side, their grouped sums and the total.
    """
    where = "position_contributions"
    _check_update_and_observed(apply_fn, params, update_batch, observed_batch, objective, chunk_size, where)
    coefficients = _coefficients(apply_fn, params, update_batch, objective, coefficients, where)
    per_side = _position_tokens(apply_fn, params, _sides(update_batch, objective), _observed_arrays(observed_batch),
                                coefficients, lr, chunk_size)
    return _positions_result(per_side)


# --------------------------------------------------------------------------------------------
# The real step.


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def _actual_tokens(apply_fn, params, new_params, observed, chunk_size):
    chunks, n = _chunked(observed, chunk_size)

    def body(chunk):
        inputs = {"input_ids": chunk["input_ids"], "attention_mask": chunk["attention_mask"]}
        old = token_logps(apply_fn(params, inputs), chunk["input_ids"], chunk["loss_mask"])
        new = token_logps(apply_fn(new_params, inputs), chunk["input_ids"], chunk["loss_mask"])
        return new - old

    return _unchunk(jax.lax.map(body, chunks), n, 0)


def actual_change(apply_fn: ApplyFn, params: PyTree, new_params: PyTree, observed_batch: Batch, *,
                  chunk_size: int | None = None) -> ObservedChange:
    """``token_logps(θ_new) − token_logps(θ)`` on the observed batch, per token and per response."""
    where = "actual_change"
    _check_observed_batch(observed_batch, where)
    _check_chunk(chunk_size, where)
    _check_logits(apply_fn, params, _inputs(observed_batch), where)
    return _changes(_actual_tokens(apply_fn, params, new_params, _observed_arrays(observed_batch), chunk_size))


def optimizer_step(apply_fn: ApplyFn, params: PyTree, optimizer: optax.GradientTransformation, opt_state: Any,
                   update_batch: Batch, observed_batch: Batch, objective: Objective, *,
                   chunk_size: int | None = None) -> StepResult:
    """Takes one real optax step on the update batch; predicts and measures its effect.

    The gradient is the training gradient (:func:`training_gradients`, summed); the prediction is
    ``A J(χ_o) u`` along the update ``u = θ_new − θ`` really taken (SPEC §1.4), so it is the
    optimizer-aware first-order change (for ``optax.sgd(η)`` it equals :func:`predict_sgd`).
    The gap ``predicted − actual`` is O(η²) (SPEC §1.4).

    Returns:
      :class:`StepResult` ``(predicted, actual, gap, new_params, new_opt_state, update)``.
    """
    where = "optimizer_step"
    _check_update_and_observed(apply_fn, params, update_batch, observed_batch, objective, chunk_size, where)
    coefficients = _coefficients(apply_fn, params, update_batch, objective, None, where)
    grads = _side_gradients(apply_fn, params, _sides(update_batch, objective), coefficients)
    grad = _tree_sum(grads)
    update, new_opt_state = optimizer.update(grad, opt_state, params)
    new_params = optax.apply_updates(params, update)
    # apply_updates may round the update into params' dtype: predict the step really taken.
    taken = jax.tree_util.tree_map(lambda new, old: new - old, new_params, params)
    observed = _observed_arrays(observed_batch)
    predicted = _changes(_changes_along(apply_fn, params, observed, (taken,), 1.0, chunk_size)[0])
    actual = _changes(_actual_tokens(apply_fn, params, new_params, observed, chunk_size))
    gap = ObservedChange(tokens=predicted.tokens - actual.tokens, responses=predicted.responses - actual.responses)
    return StepResult(predicted=predicted, actual=actual, gap=gap, new_params=new_params,
                      new_opt_state=new_opt_state, update=update)


# --------------------------------------------------------------------------------------------
# Explicit terms (small vocabularies).


def _pad_length(inputs: dict, length: int) -> dict:
    """Right-pads ``{input_ids, attention_mask}`` with token 0 and attention 0 up to ``length``."""
    pad = length - inputs["input_ids"].shape[1]
    return {k: jnp.pad(v, ((0, 0), (0, pad))) for k, v in inputs.items()}


def _read_next_token(values: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """values (..., B, T, V) on logits rows -> (..., B, T) token-aligned reads at y_t."""
    next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    index = jnp.broadcast_to(next_ids[..., None], values.shape[:-1] + (1,)).astype(jnp.int32)
    rows = jnp.take_along_axis(values, index, axis=-1)[..., 0]
    lead = rows.ndim - 2
    flat = rows.reshape((-1,) + rows.shape[lead:])
    out = jax.vmap(lambda r: _next_token_values(r, input_ids, loss_mask))(flat)
    return out.reshape(rows.shape)


_softmax_jacobian = jax.jit(softmax_jacobian)


@jax.jit
def _contract(a, k, g, lr, obs_ids, obs_mask):
    """Block norms (B_o, B_u, T_o, T_u), the side's token change (B_o, T_o) and its per-update-
    token contributions (B_u, T_u, B_o, T_o) from A (B_o, T_o, V, V), K (B_o, B_u, T_o, T_u, V, V)
    and G (B_u, T_u, V)."""
    norms = jnp.sqrt(jnp.sum(k * k, axis=(-2, -1)))
    delta = -lr * jnp.einsum("ourljk,ulk->orj", k, g)  # Δz on observed rows
    side = _read_next_token(jnp.einsum("orij,orj->ori", a, delta), obs_ids, obs_mask)
    # Per update row l: −η [A]_r [K]_{r,l} [G]_l on observed rows, (B_u, T_u, B_o, T_o, V).
    per_row = -lr * jnp.einsum("orij,ourljk,ulk->ulori", a, k, g)
    per_token = _read_next_token(per_row, obs_ids, obs_mask)
    # Update row l-1 belongs to update token l; the last row's residual is zero.
    positions = jnp.concatenate([jnp.zeros_like(per_token[:, :1]), per_token[:, :-1]], axis=1)
    return norms, side, positions


def explicit_decomposition(apply_fn: ApplyFn, params: PyTree, update_batch: Batch, observed_batch: Batch,
                           objective: Objective, *, lr: float, coefficients=None,
                           **ntk_kwargs: Any) -> ExplicitDecomposition:
    """Every term of one SGD step's effect, K formed block by block (small models, small V).

    ``A`` per observed row, ``K(χ_o, χ±)`` from :func:`ldjax.ntk.empirical_ntk` of
    ``apply_fn`` (logits (N, T, V); observed and update sequences right-padded to one length,
    then cropped), ``G±`` per update row, the Frobenius norm of every V×V block, and the
    contractions ``−η Σ_l [A]_m [K]_{m,l} [G]_l`` read at the observed tokens: in total, per
    side and per update position. The implicit routes (:func:`predict_sgd`,
    :func:`position_contributions`) must give the same numbers.

    Args: as :func:`predict_sgd`; ``**ntk_kwargs`` go to :func:`ldjax.ntk.empirical_ntk`
      (``implementation``, ``batch_size``).

    Returns:
      :class:`ExplicitDecomposition`.
    """
    from ldjax.ntk import empirical_ntk  # a separate, flax-free module

    where = "explicit_decomposition"
    _check_update_and_observed(apply_fn, params, update_batch, observed_batch, objective, None, where)
    sides = _sides(update_batch, objective)
    residuals = update_residuals(apply_fn, params, update_batch, objective, coefficients=coefficients)
    obs_in = _inputs(observed_batch)
    obs_ids, obs_mask = obs_in["input_ids"], jnp.asarray(observed_batch["loss_mask"])
    a = _softmax_jacobian(_forward(apply_fn, params, obs_in))  # (B_o, T_o, V, V)
    t_o = obs_ids.shape[1]
    kernels, norms, side_tokens, position_tokens = [], [], [], []
    for (inputs, _), g in zip(sides, residuals):
        t_u = inputs["input_ids"].shape[1]
        length = max(t_o, t_u)
        k = empirical_ntk(apply_fn, params, _pad_length(obs_in, length), _pad_length(inputs, length), **ntk_kwargs)
        k = k[:, :, :t_o, :t_u]  # (B_o, B_u, T_o, T_u, V, V)
        kernels.append(k)
        n, side, positions = _contract(a, k, g, lr, obs_ids, obs_mask)
        norms.append(n)
        side_tokens.append(side)
        position_tokens.append(positions)
    positive = _changes(side_tokens[0])
    negative = _changes(side_tokens[1]) if len(side_tokens) > 1 else None
    prediction = SequencePrediction(total=_add(positive, negative), positive=positive, negative=negative)
    two = len(sides) > 1
    return ExplicitDecomposition(
        A=a, K_plus=kernels[0], G_plus=residuals[0], K_plus_norms=norms[0],
        K_minus=kernels[1] if two else None, G_minus=residuals[1] if two else None,
        K_minus_norms=norms[1] if two else None, prediction=prediction,
        positions=_positions_result(tuple(position_tokens)))
