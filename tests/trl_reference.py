"""Plain-numpy transcriptions of TRL's loss formulas, used only as a test oracle.

Written branch by branch from TRL's source text, independently of ``ldjax.losses`` (no
shared helpers, no closed-form gradients, torch calls mapped one to one onto numpy):

* ``dpo_loss_trl_1x``: TRL 1.x ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``,
  the ``for loss_type, loss_weight in zip(self.loss_types, self.loss_weights)`` branches
  with ``f_divergence_type="reverse_kl"`` and ``ld_alpha=None`` (the version that divides
  IPO's scores by ``completion_mask.sum(dim=1).clamp(min=1.0)``), and its reward metrics
  ``self.beta * chosen_logratios``.
* ``dpo_loss_trl_0x``: TRL 0.x (0.12-0.2x) ``trl/trainer/dpo_trainer.py``,
  ``DPOTrainer.dpo_loss`` (``self.loss_type`` branches; cDPO ``sigmoid`` with
  ``label_smoothing``; ``bco_pair`` with ``self.running.mean``; ``aot_pair``), preceded for
  ``ipo`` by what ``concatenated_forward`` does to the log-probs it returns for the policy
  and the reference model alike: ``all_logps = all_logps / loss_mask.sum(-1)``.
* ``cpo_loss_trl``: ``trl/trainer/cpo_trainer.py``, ``CPOTrainer.cpo_loss`` (simpo branch).
* ``batch_logps_trl``: TRL 0.x ``DPOTrainer._get_batch_logps`` (labels with -100 padding).
* ``grpo_loss_trl``: ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._compute_loss`` with
  ``loss_type="grpo"`` (per-token ``-min(coef_1 * A, coef_2 * A)``, sequence token mean).
"""
from __future__ import annotations

import numpy as np


def logsigmoid(x):
    """torch.nn.functional.logsigmoid, stable."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(logsigmoid(x))


def relu(x):
    return np.maximum(x, 0.0)


def dpo_loss_trl_1x(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type,
    beta,
    label_smoothing=0.0,
    chosen_completion_len=None,
    rejected_completion_len=None,
    discopop_tau=0.05,
):
    """Returns (per_sequence_loss, chosen_rewards, rejected_rewards) as TRL 1.x."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    # reverse_kl: scores are the log-ratios.
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores

    if loss_type == "sigmoid":
        loss = -logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        loss = relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        chosen_avg_score = chosen_scores / np.maximum(chosen_completion_len, 1.0)
        rejected_avg_score = rejected_scores / np.maximum(rejected_completion_len, 1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        epsilon = label_smoothing
        qw = sigmoid(beta * delta_score)
        log_qw = logsigmoid(beta * delta_score)
        log_pw = np.log1p(-epsilon)
        ql = sigmoid(-beta * delta_score)
        log_ql = logsigmoid(-beta * delta_score)
        log_pl = np.log(epsilon)
        loss = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
    elif loss_type == "nca_pair":
        chosen_rewards = beta * chosen_scores
        rejected_rewards = beta * rejected_scores
        loss = -logsigmoid(chosen_rewards) - 0.5 * logsigmoid(-chosen_rewards) - 0.5 * logsigmoid(-rejected_rewards)
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * logsigmoid(-beta * delta_score)
        loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    elif loss_type == "bco_pair":
        chosen_rewards = beta * chosen_scores
        rejected_rewards = beta * rejected_scores
        loss = -logsigmoid(chosen_rewards) - logsigmoid(-rejected_rewards)
    elif loss_type == "sppo_hard":
        winner_margin_error = (chosen_scores - 0.5 / beta) ** 2
        loser_margin_error = (rejected_scores + 0.5 / beta) ** 2
        loss = winner_margin_error + loser_margin_error
    elif loss_type == "aot":
        logratios = chosen_logps - rejected_logps
        ref_logratios = ref_chosen_logps - ref_rejected_logps
        delta = np.sort(logratios, axis=0) - np.sort(ref_logratios, axis=0)
        loss = -logsigmoid(beta * delta) * (1 - label_smoothing) - logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "aot_unpaired":
        delta = np.sort(chosen_logratios, axis=0) - np.sort(rejected_logratios, axis=0)
        loss = -logsigmoid(beta * delta) * (1 - label_smoothing) - logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "apo_zero":
        loss = (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        loss = sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * delta_score))
    elif loss_type == "discopop":
        logits = delta_score * beta
        log_ratio_modulation = sigmoid(logits / discopop_tau)
        logistic_component = -logsigmoid(logits)
        exp_component = np.exp(-logits)
        loss = logistic_component * (1 - log_ratio_modulation) + exp_component * log_ratio_modulation
    else:
        raise ValueError(loss_type)
    return loss, beta * chosen_logratios, beta * rejected_logratios


def dpo_loss_trl_0x(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type,
    beta,
    label_smoothing=0.0,
    running_mean=0.0,
    discopop_tau=0.05,
    chosen_completion_len=None,
    rejected_completion_len=None,
):
    """Returns (losses, chosen_rewards, rejected_rewards) as TRL 0.x trains and logs them.

    Inputs are summed log-probs; the completion lengths are required for ``ipo``.
    """
    if loss_type == "ipo":
        # concatenated_forward, for the policy and (via compute_ref_log_probs) the reference.
        chosen_logps = chosen_logps / chosen_completion_len
        ref_chosen_logps = ref_chosen_logps / chosen_completion_len
        rejected_logps = rejected_logps / rejected_completion_len
        ref_rejected_logps = ref_rejected_logps / rejected_completion_len
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)

    if loss_type == "sigmoid":
        losses = -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "robust":
        losses = (
            -logsigmoid(beta * logits) * (1 - label_smoothing) + logsigmoid(-beta * logits) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        if label_smoothing == 0:
            label_smoothing = 1e-3
        losses = sigmoid(beta * logits) * (logsigmoid(beta * logits) - np.log(1 - label_smoothing)) + sigmoid(
            -beta * logits
        ) * (logsigmoid(-beta * logits) - np.log(label_smoothing))
    elif loss_type == "hinge":
        losses = relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        delta = running_mean
        losses = -logsigmoid((beta * chosen_logratios) - delta) - logsigmoid(-(beta * rejected_logratios - delta))
    elif loss_type == "sppo_hard":
        a = chosen_logps - ref_chosen_logps
        b = rejected_logps - ref_rejected_logps
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        chosen_rewards = (chosen_logps - ref_chosen_logps) * beta
        rejected_rewards = (rejected_logps - ref_rejected_logps) * beta
        losses = -logsigmoid(chosen_rewards) - 0.5 * logsigmoid(-chosen_rewards) - 0.5 * logsigmoid(-rejected_rewards)
    elif loss_type == "aot_pair":
        delta = np.sort(chosen_logratios, axis=0) - np.sort(rejected_logratios, axis=0)
        losses = -logsigmoid(beta * delta) * (1 - label_smoothing) - logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "aot":
        delta = np.sort(chosen_logps - rejected_logps, axis=0) - np.sort(ref_chosen_logps - ref_rejected_logps, axis=0)
        losses = -logsigmoid(beta * delta) * (1 - label_smoothing) - logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "apo_zero":
        losses = (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * (chosen_logratios - rejected_logratios)))
    elif loss_type == "discopop":
        logits = logits * beta
        log_ratio_modulation = sigmoid(logits / discopop_tau)
        losses = -logsigmoid(logits) * (1 - log_ratio_modulation) + np.exp(-logits) * log_ratio_modulation
    else:
        raise ValueError(loss_type)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def cpo_loss_trl(policy_chosen_logps, policy_rejected_logps, *, beta, simpo_gamma, label_smoothing=0.0):
    """TRL ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (inputs: averaged log-probs)."""
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * policy_chosen_logps, beta * policy_rejected_logps


def batch_logps_trl(logits, labels, *, average_log_prob=False, label_pad_token_id=-100):
    """TRL 0.x ``_get_batch_logps``: logits (B, T, V), labels (B, T) with -100 = unscored."""
    labels = labels[:, 1:].copy()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    per_token_logps = np.take_along_axis(log_softmax, labels[..., None], axis=2)[..., 0]
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def grpo_loss_trl(per_token_logps, old_per_token_logps, advantages, completion_mask, *, epsilon_low, epsilon_high):
    """TRL GRPO per-sequence loss (``loss_type="grpo"``) before the batch mean."""
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = np.exp(log_ratio)
    coef_2 = np.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -np.minimum(per_token_loss1, per_token_loss2)
    return (per_token_loss * completion_mask).sum(-1) / np.maximum(completion_mask.sum(-1), 1.0)
