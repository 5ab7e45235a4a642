"""The PPO/GRPO clipped token surrogate and its residual coefficient (SPEC §1.3).

Per token ``t`` with importance ratio ``ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)`` and advantage
``Â_t``:

    ℓ_t = −min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t)

(PPO, Schulman et al. 2017; ``ε_high ≠ ε_low`` is DAPO's "clip-higher"). The per-sequence
loss is the mean over the sequence's scored tokens, as TRL's ``GRPOTrainer`` with
``loss_type="grpo"`` (``trl/trainer/grpo_trainer.py``, ``_compute_loss``:
``((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1))``); average the result over
the batch for GRPO's batch loss.

Gradient: ``∂ℓ_t/∂log π_t = −ρ_t Â_t`` when the unclipped term is the minimum and 0 when the
clipped (constant) term is, so the residual on the logits is ``G_t = c_t(π_t − e_{a_t})``
with ``c_t = ρ_t Â_t`` or 0. The clipped cases are ``Â > 0, ρ > 1 + ε_high`` (no more push-up
on tokens already made likelier) and ``Â < 0, ρ < 1 − ε_low``: a negative-advantage token
that is already unlikely gets **no** push-down, which caps the squeezing of SPEC §2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ldjax.losses.errors import LossInputError

__all__ = ["clipped_surrogate", "clipped_surrogate_coefficients"]


def _prepare(logps, old_logps, advantages, mask, epsilon, epsilon_high):
    logps, old_logps = jnp.asarray(logps), jnp.asarray(old_logps)
    advantages, mask = jnp.asarray(advantages), jnp.asarray(mask)
    if logps.ndim != 2:
        raise LossInputError(f"logps must have shape (B, T), got {logps.shape}")
    for name, array in (("old_logps", old_logps), ("mask", mask)):
        if array.shape != logps.shape:
            raise LossInputError(f"{name} must have the shape of logps {logps.shape}, got {array.shape}")
    if advantages.shape == logps.shape[:1]:
        # GRPO: one advantage per sequence, shared by its tokens.
        advantages = advantages[:, None]
    elif advantages.shape != logps.shape:
        raise LossInputError(
            f"advantages must have shape (B,) = {logps.shape[:1]} or (B, T) = {logps.shape}, "
            f"got {advantages.shape}"
        )
    low = epsilon
    high = epsilon if epsilon_high is None else epsilon_high
    for name, value in (("epsilon", low), ("epsilon_high", high)):
        if isinstance(value, (int, float)) and value < 0:
            raise LossInputError(f"{name} must be >= 0, got {value}")
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    return ratio, advantages, mask.astype(ratio.dtype), low, high


def clipped_surrogate(
    logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None
) -> jax.Array:
    """Per-sequence PPO/GRPO clipped surrogate loss (token mean over ``mask``).

    Args:
      logps: (B, T) token log-probs of the current policy, e.g. ``token_logps(...)``.
      old_logps: (B, T) token log-probs of the sampling policy (no gradient flows).
      advantages: (B,) per-sequence (GRPO) or (B, T) per-token advantages.
      mask: (B, T) 1 on scored (sampled completion) tokens.
      epsilon: lower clip ε_low (and upper when ``epsilon_high`` is None).
      epsilon_high: upper clip ε_high (DAPO clip-higher).

    Returns:
      (B,) losses ``Σ_t m_t ℓ_t / max(Σ_t m_t, 1)``.
    """
    ratio, advantages, mask, low, high = _prepare(logps, old_logps, advantages, mask, epsilon, epsilon_high)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - low, 1 + high) * advantages
    per_token = -jnp.minimum(unclipped, clipped)
    return jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def clipped_surrogate_coefficients(
    logps, old_logps, advantages, mask, *, epsilon: float = 0.2, epsilon_high: float | None = None
) -> jax.Array:
    """Per-token residual coefficient ``c_t = −∂ℓ_t/∂log π_t`` of the clipped surrogate.

    ``c_t = ρ_t Â_t`` where the unclipped term is active and 0 where the clip is (see the
    module docstring); 0 on unmasked tokens. This is per token *before* the token mean:
    the gradient of ``clipped_surrogate(...)[b]`` w.r.t. ``logps[b, t]`` is
    ``−c_t / max(Σ_t m_t, 1)``, and ``sequence_residual(logits, ids, mask, c / n[:, None])``
    gives its logits gradient. Arguments as ``clipped_surrogate``; returns (B, T).
    """
    ratio, advantages, mask, low, high = _prepare(logps, old_logps, advantages, mask, epsilon, epsilon_high)
    clipped_up = (advantages > 0) & (ratio > 1 + high)
    clipped_down = (advantages < 0) & (ratio < 1 - low)
    active = jnp.logical_not(clipped_up | clipped_down)
    return jnp.where(active, ratio * advantages, 0) * mask
