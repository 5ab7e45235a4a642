"""Response log-probabilities of causal LMs, the SFT loss and the token-level residual.

Convention (shared by the whole of ldjax): a sequence batch holds ``input_ids (B, T)`` and
``loss_mask (B, T)``; ``loss_mask[:, t] = 1`` marks ``input_ids[:, t]`` as a scored response
token. Logits row ``t - 1`` predicts token ``t`` (teacher forcing), so position 0 is never
scored (its mask entry is ignored) and the last logits row predicts nothing.

SPEC §1.2: ``log π(y|x) = Σ_l log π(y_l | x, y_<l)`` is a *sum* over response tokens.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ldjax.losses.errors import LossInputError

__all__ = [
    "token_logps",
    "sequence_logps",
    "response_lengths",
    "sft_loss",
    "sequence_residual",
    "probability_weights",
    "probability_weighted_logps",
    "reweighted_sequence_logps",
]


def _compute_dtype(dtype) -> jnp.dtype:
    # Log-softmax in at least float32: bf16 has 8 mantissa bits, and a logsumexp over
    # thousands of vocabulary entries would lose whole nats. float64 stays float64.
    return jnp.promote_types(dtype, jnp.float32)


def _check_sequence_inputs(logits, input_ids, loss_mask) -> None:
    if logits.ndim != 3:
        raise LossInputError(f"logits must have shape (B, T, V), got shape {logits.shape}")
    if input_ids.shape != logits.shape[:2]:
        raise LossInputError(
            f"input_ids must have shape (B, T) = {logits.shape[:2]} to match logits "
            f"{logits.shape}, got {input_ids.shape}"
        )
    if loss_mask.shape != input_ids.shape:
        raise LossInputError(
            f"loss_mask must have the shape of input_ids {input_ids.shape}, got {loss_mask.shape}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise LossInputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise LossInputError(f"logits must be floating point, got dtype {logits.dtype}")
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= logits.shape[-1]):
            raise LossInputError(
                f"input_ids must lie in [0, V={logits.shape[-1]}), got range "
                f"[{ids.min()}, {ids.max()}]"
            )


def _scored(loss_mask: jax.Array, dtype) -> jax.Array:
    """(B, T) float mask of scored tokens with position 0 forced to 0."""
    mask = jnp.asarray(loss_mask).astype(dtype)
    return mask.at[:, 0].set(jnp.zeros((), dtype))


def token_logps(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token log-probabilities of the given tokens, zero where not scored.

    Args:
      logits: (B, T, V) next-token logits, any float dtype.
      input_ids: (B, T) integer token ids.
      loss_mask: (B, T), 1 where ``input_ids[:, t]`` is a scored response token.

    Returns:
      (B, T) array in float32 (float64 for float64 logits): entry ``t`` is
      ``log softmax(logits[:, t-1])[input_ids[:, t]]`` where scored, else 0; column 0 is 0.
    """
    logits, input_ids = jnp.asarray(logits), jnp.asarray(input_ids)
    loss_mask = jnp.asarray(loss_mask)
    _check_sequence_inputs(logits, input_ids, loss_mask)
    dtype = _compute_dtype(logits.dtype)
    logits = logits.astype(dtype)
    # Row t scores token t + 1. Every row is scored against a target (the last one against a
    # dummy 0, discarded below) so that no (B, T - 1, V) slice of the logits is copied, forward
    # or backward: only (B, T) arrays are shifted.
    next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    # logit_y - logsumexp(logits) avoids materialising a second (B, T, V) log-softmax.
    target_logits = jnp.take_along_axis(logits, next_ids[..., None], axis=-1)[..., 0]
    next_logps = target_logits - jax.nn.logsumexp(logits, axis=-1)
    padded = jnp.concatenate([jnp.zeros_like(next_logps[:, :1]), next_logps[:, :-1]], axis=1)
    # where() rather than a product keeps a -inf log-prob on an unscored token from
    # turning into nan.
    return jnp.where(_scored(loss_mask, bool), padded, jnp.zeros((), dtype))


def probability_weights(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, power: float) -> jax.Array:
    """Per-token weights ``w_t = π(y_t | x, y_<t)^power`` (held constant: no gradient), zero where not scored.

    The weights of ldjax's probability-weighted negative gradient (``negative_weight_power`` of
    :func:`ldjax.train.objectives.preference_objective`): a rejected token the model already
    puts in the valley (``π(y_t) ≈ 0``) gets almost no push-down — by the squeezing lemma
    (SPEC §1.4) exactly the pushes that hand their mass to the argmax.

    Args:
      logits, input_ids, loss_mask: as :func:`token_logps`.
      power: ``α ≥ 0``; 0 gives weight 1 on every scored token.

    Returns:
      (B, T) in the compute dtype of :func:`token_logps`.
    """
    return _weights_of(token_logps(logits, input_ids, loss_mask), loss_mask, power)


def _weights_of(per_token: jax.Array, loss_mask: jax.Array, power: float) -> jax.Array:
    logps = jax.lax.stop_gradient(per_token)
    return jnp.where(_scored(loss_mask, bool), jnp.exp(power * logps), jnp.zeros((), logps.dtype))


def reweighted_sequence_logps(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                              weights: jax.Array, *, average: bool = False) -> jax.Array:
    """``log π(y|x)`` in value, with the gradient of ``Σ_t w_t log π(y_t | ...)``.

    The forward value equals :func:`sequence_logps` (so a loss built on it keeps its value,
    its reference log-probs and its margin), while ``∂/∂θ = Σ_t w_t ∂ log π(y_t)/∂θ``: the
    token-level residual of token ``t`` is scaled by ``w_t``.

    Args:
      logits, input_ids, loss_mask: as :func:`token_logps`.
      weights: (B, T) per-token weights (treated as constants).
      average: divide by the number of scored tokens (SimPO).

    Returns:
      (B,) as :func:`sequence_logps`.
    """
    per_token = token_logps(logits, input_ids, loss_mask)
    w = jnp.asarray(weights)
    if w.shape != per_token.shape:
        raise LossInputError(f"weights must have shape (B, T) = {per_token.shape}, got {w.shape}")
    return _reweighted_sum(per_token, w, loss_mask, average)


def probability_weighted_logps(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, power: float, *,
                               average: bool = False) -> jax.Array:
    """:func:`reweighted_sequence_logps` with the weights of :func:`probability_weights`, from one
    log-softmax pass: ``log π(y|x)`` in value, gradient ``Σ_t π(y_t)^power ∂ log π(y_t)``."""
    per_token = token_logps(logits, input_ids, loss_mask)
    return _reweighted_sum(per_token, _weights_of(per_token, loss_mask, power), loss_mask, average)


def _reweighted_sum(per_token, weights, loss_mask, average: bool) -> jax.Array:
    w = jax.lax.stop_gradient(weights.astype(per_token.dtype))
    total = jnp.sum(w * per_token + jax.lax.stop_gradient((1 - w) * per_token), axis=-1)
    if average:
        return total / jnp.maximum(response_lengths(loss_mask).astype(total.dtype), 1)
    return total


def response_lengths(loss_mask: jax.Array) -> jax.Array:
    """(B,) int32 number of scored response tokens per sequence (position 0 excluded)."""
    loss_mask = jnp.asarray(loss_mask)
    if loss_mask.ndim != 2:
        raise LossInputError(f"loss_mask must have shape (B, T), got {loss_mask.shape}")
    return jnp.sum(_scored(loss_mask, jnp.int32), axis=-1)


def sequence_logps(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, average: bool = False
) -> jax.Array:
    """Summed (or length-averaged) response log-probability ``log π(y|x)`` per sequence.

    Args:
      logits: (B, T, V) logits; bf16 logits are upcast to float32 before the log-softmax.
      input_ids: (B, T) token ids.
      loss_mask: (B, T) scored-token mask (shift convention in the module docstring).
      average: divide by the number of scored tokens (SimPO / TRL ``average_log_prob``);
        a sequence with no scored token then gives 0.

    Returns:
      (B,) float32 (float64 for float64 logits).
    """
    per_token = token_logps(logits, input_ids, loss_mask)
    total = jnp.sum(per_token, axis=-1)
    if average:
        lengths = response_lengths(loss_mask).astype(total.dtype)
        return total / jnp.maximum(lengths, 1)
    return total


def sft_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    reduction: Literal["sum", "mean_token"] = "sum",
) -> jax.Array:
    """Per-example SFT (negative log-likelihood) loss on the response tokens.

    ``reduction="sum"`` gives ``-log π(y|x)`` (SPEC §1.2, residual coefficient c = 1);
    ``"mean_token"`` divides by the number of scored tokens (c = 1 / L).

    Returns:
      (B,) losses; average them yourself for a batch loss.
    """
    if reduction not in ("sum", "mean_token"):
        raise LossInputError(f"reduction must be 'sum' or 'mean_token', got {reduction!r}")
    return -sequence_logps(logits, input_ids, loss_mask, average=reduction == "mean_token")


def sequence_residual(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, coefficient: jax.Array
) -> jax.Array:
    """Token-level residual ``G = c · (softmax(z_{t-1}) − e_{y_t})`` on scored rows.

    This is SPEC §1.3's ``G± = c±(π(·|χ±) − y±)`` laid out on the logits grid: row ``t-1``
    carries the residual of token ``t`` when it is scored; the last row and the rows of
    unscored tokens are zero.

    Sign convention: ``coefficient`` is the *residual* coefficient ``c = −∂L/∂log π(y)``
    (SFT: ``c = 1``; DPO chosen: ``c⁺ = β(1−a)``), so the result equals ``∂L/∂logits``
    for any loss ``L`` that depends on the logits only through the sequence log-probs
    (or, with a per-token ``c``, through the token log-probs). Use
    ``-preference_coefficients(...)`` or ``residual_coefficients(...)`` to get ``c``.

    Args:
      logits: (B, T, V).
      input_ids: (B, T).
      loss_mask: (B, T).
      coefficient: (B,) one coefficient per sequence, or (B, T) one per token aligned
        with ``input_ids`` (as ``token_logps``), e.g. PPO/GRPO token coefficients.

    Returns:
      (B, T, V) in float32 (float64 for float64 logits).
    """
    logits, input_ids = jnp.asarray(logits), jnp.asarray(input_ids)
    loss_mask, coefficient = jnp.asarray(loss_mask), jnp.asarray(coefficient)
    _check_sequence_inputs(logits, input_ids, loss_mask)
    batch, length, vocab = logits.shape
    if coefficient.shape == (batch,):
        coefficient = jnp.broadcast_to(coefficient[:, None], (batch, length))
    elif coefficient.shape != (batch, length):
        raise LossInputError(
            f"coefficient must have shape (B,) = ({batch},) or (B, T) = {(batch, length)}, "
            f"got {coefficient.shape}"
        )
    dtype = _compute_dtype(jnp.result_type(logits.dtype, coefficient.dtype))
    probs = jax.nn.softmax(logits[:, :-1].astype(dtype), axis=-1)
    onehot = jax.nn.one_hot(input_ids[:, 1:], vocab, dtype=dtype)
    # Token t's coefficient sits on row t-1, which predicts it.
    weight = (coefficient.astype(dtype) * _scored(loss_mask, dtype))[:, 1:]
    rows = weight[..., None] * (probs - onehot)
    return jnp.pad(rows, ((0, 0), (0, 1), (0, 0)))
