"""Losses of LLM finetuning and their residual coefficients (SPEC §1.2–1.3).

- ``ldjax.losses.sequence``: response log-probs (shift convention), SFT, token residual
- ``ldjax.losses.preference``: DPO-family and SimPO losses with TRL semantics, coefficients
- ``ldjax.losses.policy_gradient``: the PPO/GRPO clipped surrogate and its coefficients
"""
from ldjax.losses.errors import LossInputError
from ldjax.losses.policy_gradient import clipped_surrogate, clipped_surrogate_coefficients
from ldjax.losses.preference import (
    LOSS_TYPES,
    preference_coefficients,
    preference_loss,
    residual_coefficients,
)
from ldjax.losses.sequence import (
    probability_weighted_logps,
    probability_weights,
    response_lengths,
    reweighted_sequence_logps,
    sequence_logps,
    sequence_residual,
    sft_loss,
    token_logps,
)

__all__ = [
    "LOSS_TYPES",
    "LossInputError",
    "clipped_surrogate",
    "clipped_surrogate_coefficients",
    "preference_coefficients",
    "preference_loss",
    "probability_weighted_logps",
    "probability_weights",
    "residual_coefficients",
    "response_lengths",
    "reweighted_sequence_logps",
    "sequence_logps",
    "sequence_residual",
    "sft_loss",
    "token_logps",
]
