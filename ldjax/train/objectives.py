"""Training objectives of a causal LM: pretraining, SFT, and every preference loss.

Each factory returns ``loss_fn(model, batch) -> (loss, metrics)`` for
:func:`ldjax.train.steps.make_train_step`; ``loss`` is a mean over the batch's examples.
Batches follow the team's token convention (``input_ids``/``attention_mask``/``loss_mask``,
preference batches with ``chosen_``/``rejected_`` prefixes; logits row t−1 predicts token t).
Preference batches also carry the reference log-probs ``ref_chosen_logps`` and
``ref_rejected_logps`` (B,), computed once with :func:`reference_logps` before training.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldjax import losses
from ldjax.models.functional import ModuleApply
from ldjax.train import sharding as sharding_lib

Batch = dict[str, jax.Array]


def _forward(model, input_ids, attention_mask):
    return model(input_ids.astype(jnp.int32), attention_mask.astype(jnp.int32)).astype(jnp.float32)


def pretrain_objective() -> Callable:
    """Next-token cross-entropy on every real token after the first, averaged per token.

    Micro-batches (gradient accumulation) are weighted equally, so with accumulation the
    update equals the big batch's only when micro-batches hold the same number of tokens.
    """

    def loss_fn(model, batch: Batch):
        logits = _forward(model, batch["input_ids"], batch["attention_mask"])
        logps = losses.sequence_logps(logits, batch["input_ids"], batch["attention_mask"])
        tokens = losses.response_lengths(batch["attention_mask"]).sum()
        loss = -logps.sum() / jnp.maximum(tokens, 1).astype(jnp.float32)
        return loss, {"perplexity": jnp.exp(loss)}

    return loss_fn


def sft_objective(reduction: str = "sum") -> Callable:
    """Mean over examples of :func:`ldjax.losses.sft_loss` (``sum``: −log π(y|x), SPEC §1.2)."""

    def loss_fn(model, batch: Batch):
        logits = _forward(model, batch["input_ids"], batch["attention_mask"])
        per_example = losses.sft_loss(logits, batch["input_ids"], batch["loss_mask"], reduction=reduction)
        return per_example.mean(), {"logps": -per_example.mean()}

    return loss_fn


def policy_logps(model, batch: Batch, *, average: bool = False, concatenate: bool | None = None,
                 negative_weight_power: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) summed (or length-averaged) response log-probs, each (B,).

    Args:
      model: ``model(input_ids, attention_mask) -> logits``.
      batch: ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}``, each (B, T).
      average: length-averaged log-probs (SimPO).
      concatenate: one forward pass over all 2B sequences (TRL's ``concatenated_forward``), or
        one pass per side. ``None`` picks per backend: two passes on CPU, where XLA runs the
        two independent passes on separate threads (3-5 % faster DPO steps at 1M-4M
        parameters, ``benchmarks/train``), one pass elsewhere. Values agree to float round-off.
      negative_weight_power: ``α``; when > 0 the rejected log-probs keep their value but their
        gradient weights token ``t`` by ``π(y⁻_t)^α``
        (:func:`ldjax.losses.probability_weighted_logps`): ldjax's probability-weighted negative
        gradient, which spares the tokens already in the valley.
    """
    if concatenate is None:
        concatenate = jax.default_backend() != "cpu"

    def logps(logits, ids, mask, rejected: bool):
        if rejected and negative_weight_power:
            return losses.probability_weighted_logps(logits, ids, mask, negative_weight_power, average=average)
        return losses.sequence_logps(logits, ids, mask, average=average)

    if not concatenate:
        return tuple(logps(_forward(model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]),
                           batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"], side == "rejected")
                     for side in ("chosen", "rejected"))
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logits = _forward(model, ids, att)
    b = batch["chosen_input_ids"].shape[0]
    if negative_weight_power:
        return logps(logits[:b], ids[:b], mask[:b], False), logps(logits[b:], ids[b:], mask[b:], True)
    both = losses.sequence_logps(logits, ids, mask, average=average)
    return both[:b], both[b:]


def preference_objective(loss_type: str = "sigmoid", *, beta: float = 0.1, label_smoothing: float = 0.0,
                         negative_weight_power: float = 0.0, **loss_kwargs: Any) -> Callable:
    """Mean of :func:`ldjax.losses.preference_loss` with TRL semantics (every ``loss_type``).

    Response lengths are passed, so ``ipo`` is length-normalised (TRL 1.x) and ``simpo``
    uses length-averaged log-probs. Metrics as TRL logs them: ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
    ``logps/rejected``.

    ``negative_weight_power`` ``α > 0`` turns on ldjax's probability-weighted negative gradient
    (see :func:`policy_logps`): the loss value is unchanged, the residual of rejected token ``t``
    is scaled by ``π(y⁻_t)^α`` (the decomposition's per-token ``c⁻_t``,
    :class:`ldjax.sequence_dynamics.PreferenceObjective`).
    """
    if negative_weight_power < 0:
        raise ValueError(f"negative_weight_power must be >= 0, got {negative_weight_power}")
    if loss_type not in losses.LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {losses.LOSS_TYPES}")

    def loss_fn(model, batch: Batch):
        chosen, rejected = policy_logps(model, batch, negative_weight_power=negative_weight_power)
        per_example, r_chosen, r_rejected = losses.preference_loss(
            chosen, rejected, batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps"),
            loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
            chosen_lengths=losses.response_lengths(batch["chosen_loss_mask"]),
            rejected_lengths=losses.response_lengths(batch["rejected_loss_mask"]), **loss_kwargs)
        metrics = {
            "rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
            "rewards/accuracies": (r_chosen > r_rejected).mean().astype(jnp.float32),
            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(),
        }
        return per_example.mean(), metrics

    return loss_fn


PPO_CLIP = "ppo_clip"


def ppo_clip_objective(*, epsilon: float = 0.2) -> Callable:
    """The PPO-clip surrogate on preference pairs, against the starting (reference) policy.

    Each pair is two sequences with advantage ``Â = +1`` (y⁺) and ``Â = −1`` (y⁻); the old
    policy of the importance ratio is the reference ``π_ref`` (token log-probs
    ``ref_{chosen,rejected}_token_logps`` (B, T), :func:`reference_logps` with
    ``per_token=True``). Per pair: :func:`ldjax.losses.clipped_surrogate` of y⁺ plus that of
    y⁻ (token means). Its residual coefficient is ``c_t = ρ_t Â / L`` until token ``t`` is
    clipped (``ρ_t > 1 + ε`` on y⁺, ``ρ_t < 1 − ε`` on y⁻), then 0
    (:func:`ldjax.losses.clipped_surrogate_coefficients`): a rejected token already pushed an
    ε below the reference gets no more push-down. At the start ``ρ = 1`` and the loss is 0.

    Metrics: ``clip_fraction/chosen``, ``clip_fraction/rejected`` (share of scored tokens whose
    coefficient is 0), ``logps/chosen``, ``logps/rejected``.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")

    def side(model, batch, name, advantage):
        ids = batch[f"{name}_input_ids"]
        logits = _forward(model, ids, batch[f"{name}_attention_mask"])
        logps = losses.token_logps(logits, ids, batch[f"{name}_loss_mask"])
        mask = (batch[f"{name}_loss_mask"] != 0).at[:, 0].set(False).astype(logps.dtype)
        old = batch[f"ref_{name}_token_logps"]
        adv = jnp.full(ids.shape[:1], advantage, logps.dtype)
        loss = losses.clipped_surrogate(logps, old, adv, mask, epsilon=epsilon)
        coef = losses.clipped_surrogate_coefficients(jax.lax.stop_gradient(logps), old, adv, mask, epsilon=epsilon)
        clipped = jnp.sum((coef == 0) * mask) / jnp.maximum(jnp.sum(mask), 1)
        return loss, clipped, logps.sum(-1)

    def loss_fn(model, batch: Batch):
        loss_c, clip_c, logp_c = side(model, batch, "chosen", 1.0)
        loss_r, clip_r, logp_r = side(model, batch, "rejected", -1.0)
        return (loss_c + loss_r).mean(), {"clip_fraction/chosen": clip_c, "clip_fraction/rejected": clip_r,
                                          "logps/chosen": logp_c.mean(), "logps/rejected": logp_r.mean()}

    return loss_fn


# Module level with the model's structure static (a ModuleApply: equal for equal graph
# definitions, identity otherwise): one compilation per model structure and shape, shared by
# every job of a process (the reference pass of each DPO job of a sweep).
@functools.partial(jax.jit, static_argnums=0)
def _reference_sequence_logps(model_of: ModuleApply, params: Any, batch: Batch):
    return policy_logps(model_of.module(params), batch)


@functools.partial(jax.jit, static_argnums=0)
def _reference_token_logps(model_of: ModuleApply, params: Any, batch: Batch):
    model = model_of.module(params)
    return tuple(losses.token_logps(_forward(model, batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"]),
                                    batch[f"{s}_input_ids"], batch[f"{s}_loss_mask"]) for s in ("chosen", "rejected"))


def reference_logps(graphdef: nnx.GraphDef, params: Any, rest: Any, arrays: dict[str, np.ndarray], *,
                    batch_size: int = 32, mesh: jax.sharding.Mesh | None = None,
                    per_token: bool = False) -> dict[str, np.ndarray]:
    """``{ref_chosen_logps, ref_rejected_logps}`` (N,) float32 of a whole preference dataset.

    Computed once before preference training with the starting policy (which is the
    reference), so the train step never runs the reference model. The last chunk is padded
    (with copies of row 0, then dropped) to keep one compiled shape. ``per_token`` adds
    ``ref_{chosen,rejected}_token_logps`` (N, T) (:func:`ldjax.losses.token_logps`; the
    PPO-clip objective's old policy); their row sums are the sequence values.
    """
    keys = [k for k in arrays if k.startswith(("chosen_", "rejected_"))]
    run = _reference_token_logps if per_token else _reference_sequence_logps
    model_of = ModuleApply(graphdef, rest)
    chosen, rejected = _over_rows(lambda batch: run(model_of, params, batch), arrays, keys, batch_size, mesh)
    out = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    if per_token:
        out = {"ref_chosen_token_logps": chosen, "ref_rejected_token_logps": rejected,
               "ref_chosen_logps": chosen.sum(-1), "ref_rejected_logps": rejected.sum(-1)}
    return out


def _over_rows(fn, arrays, keys, batch_size, mesh) -> tuple[np.ndarray, ...]:
    """``fn(batch)`` (a tuple of per-row arrays) over every row of ``arrays`` in chunks of ``batch_size``,
    concatenated as float32. The last chunk is padded with copies of row 0 (then dropped): one compiled shape."""
    n = len(arrays[keys[0]])
    if mesh is not None:
        batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    parts = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        batch = {k: np.asarray(arrays[k])[np.where(valid, idx, 0)] for k in keys}
        if mesh is not None:
            batch = sharding_lib.shard_batch(batch, mesh)
        parts.append([np.asarray(x)[valid] for x in sharding_lib.gather(fn(batch))])  # also across processes
    return tuple(np.concatenate(col).astype(np.float32) for col in zip(*parts))
