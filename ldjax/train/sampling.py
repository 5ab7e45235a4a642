"""Temperature / top-k sampling from a causal LM, and on-policy preference batches.

Sampling is jit-compiled with a fixed number of new tokens and an explicit RNG key, on one
fixed-length buffer (prompt + new tokens), so there is a single compiled shape. A model with
``prefill`` / ``decode`` (``ldjax.models.CausalLM``) decodes with a KV cache: one pass over the
prompts, then O(L) work per new token. Any other ``(input_ids, attention_mask) -> logits``
callable is rerun on the whole buffer for every token (causal attention makes the
not-yet-written positions irrelevant). Both routes sample the same distribution and, from the
same key, the same tokens unless float round-off flips a near-tie (the logits agree to ~1e-6).
Measured on 2 CPU cores, batch 8, 4-layer GPT-NeoX: the cache is 14x faster at d=128
(64-token prompts + 64 new tokens: 75 vs 1,065 ms) and 25x at d=256 (128 + 128: 0.66 vs 16.4 s).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldjax import losses

Apply = Callable[[jax.Array, jax.Array], jax.Array]  # (input_ids, attention_mask) -> logits


def has_kv_cache(apply: Any) -> bool:
    """True for a model that decodes with a KV cache (``prefill`` and ``decode`` methods)."""
    return callable(getattr(apply, "prefill", None)) and callable(getattr(apply, "decode", None))


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """``logits / temperature`` with everything below the k-th largest set to −inf (k=0: all kept)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def sample_continuations(apply: Apply, prompt_ids: jax.Array, prompt_lengths: jax.Array, key: jax.Array, *,
                         max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None,
                         pad_id: int = 0) -> dict[str, jax.Array]:
    """Samples ``max_new_tokens`` tokens after each (right-padded) prompt.

    Args:
      apply: ``(input_ids (B, L), attention_mask (B, L)) -> logits (B, L, V)``; a model with a KV
        cache (:func:`has_kv_cache`) is decoded with it.
      prompt_ids: (B, T) int, prompt ``b`` in ``prompt_ids[b, :prompt_lengths[b]]``.
      prompt_lengths: (B,) int, ≥ 1.
      key: a PRNG key; step ``i`` uses ``fold_in(key, i)``.
      max_new_tokens: fixed length of the continuation.
      temperature, top_k: see :func:`filter_logits`.
      eos_id: generation of a row stops after its first ``eos_id`` (which is kept and scored).
      pad_id: written after the end.

    Returns:
      ``{input_ids, attention_mask, loss_mask}`` of shape (B, T + max_new_tokens), int32, in
      the team's convention (``loss_mask`` = 1 on the sampled tokens up to and including EOS).
    """
    b, t = prompt_ids.shape
    length = t + max_new_tokens
    positions = jnp.arange(length)[None, :]
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    ids = jnp.where(positions < prompt_lengths[:, None],
                    jnp.pad(prompt_ids.astype(jnp.int32), ((0, 0), (0, max_new_tokens)), constant_values=pad_id),
                    pad_id)
    rows = jnp.arange(b)

    def draw(i, next_logits, ids, done, generated):
        """Token i of every row from its next-token logits (B, V), written at the row's cursor."""
        cursor = prompt_lengths + i
        filtered = filter_logits(next_logits, temperature=temperature, top_k=top_k)
        token = jax.random.categorical(jax.random.fold_in(key, i), filtered).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)
        ids = ids.at[rows, cursor].set(token)
        generated = generated.at[rows, cursor].set(jnp.where(done, 0, 1))
        if eos_id is not None:
            done = done | (token == eos_id)
        return token, ids, done, generated

    done0, generated0 = jnp.zeros((b,), bool), jnp.zeros((b, length), jnp.int32)
    if has_kv_cache(apply):
        first_logits, cache = apply.prefill(ids, (positions < prompt_lengths[:, None]).astype(jnp.int32),
                                            logits_at=prompt_lengths - 1)

        def body(i, carry):
            ids, done, generated, next_logits, cache = carry
            token, ids, done, generated = draw(i, next_logits, ids, done, generated)
            # The last step's logits are unused; computing them keeps one loop body.
            next_logits, cache = apply.decode(token, prompt_lengths + i, cache)
            return ids, done, generated, next_logits, cache

        init = (ids, done0, generated0, first_logits, cache)
        ids, _, generated, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    else:
        def body(i, carry):
            ids, done, generated = carry
            cursor = prompt_lengths + i  # where token i goes
            logits = apply(ids, (positions < cursor[:, None]).astype(jnp.int32))
            _, ids, done, generated = draw(i, logits[rows, cursor - 1], ids, done, generated)
            return ids, done, generated

        ids, _, generated = jax.lax.fori_loop(0, max_new_tokens, body, (ids, done0, generated0))
    attention = ((positions < prompt_lengths[:, None]) | (generated == 1)).astype(jnp.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": generated}


def prompt_lengths_of(attention_mask: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """(B,) prompt lengths of right-padded sequences: real tokens before the first scored one."""
    return jnp.sum(attention_mask * (1 - jnp.cumsum(loss_mask, axis=1).clip(0, 1)), axis=1).astype(jnp.int32)


def _ranked_samples(sample: Callable[[jax.Array], dict], key: jax.Array, candidates: int,
                    score_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[dict, dict]:
    """``candidates`` samples per prompt; (the highest-scored, the lowest-scored) per prompt."""
    draws = [sample(jax.random.fold_in(key, j)) for j in range(candidates)]
    stacked = {k: jnp.stack([d[k] for d in draws]) for k in draws[0]}  # (k, B, L)
    scores = jnp.stack([score_fn(d["input_ids"], d["loss_mask"]) for d in draws])  # (k, B)
    rows = jnp.arange(scores.shape[1])
    pick = lambda j: {k: v[j, rows] for k, v in stacked.items()}  # noqa: E731
    return pick(jnp.argmax(scores, axis=0)), pick(jnp.argmin(scores, axis=0))


def on_policy_batch(apply: Apply, ref_apply: Apply, batch: dict[str, jax.Array], key: jax.Array, *, mode: str,
                    max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, eos_id: int | None = None,
                    pad_id: int = 0, candidates: int = 1,
                    score_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> dict[str, jax.Array]:
    """A preference batch whose rejected (``mode="rejected"``) or both (``"both"``) responses are
    sampled from the current policy ``apply``, with the reference log-probs recomputed by
    ``ref_apply`` for the new responses. Both sides get length T + ``max_new_tokens``. Pass the
    policy model itself (not a lambda around it) to sample with its KV cache.

    Judge-ranked negatives: with ``candidates = k > 1`` and a ``score_fn(input_ids, loss_mask) ->
    (B,)`` (higher = better, e.g. :func:`ldjax.judge.token_judge_scores`), ``k`` responses are
    sampled per prompt and the lowest-scored becomes y⁻ (``"rejected"``); with ``"both"`` the
    highest-scored of the same ``k`` becomes y⁺ (best-of-k vs worst-of-k).
    """
    if mode not in ("rejected", "both"):
        raise ValueError(f"on-policy mode must be 'rejected' or 'both', got {mode!r}")
    if candidates < 1 or (candidates > 1 and score_fn is None):
        raise ValueError(f"candidates must be >= 1, and more than 1 needs a score_fn to rank them; got {candidates} "
                         f"{'with' if score_fn else 'without'} a score_fn")
    lengths = prompt_lengths_of(batch["chosen_attention_mask"], batch["chosen_loss_mask"])
    k_rej, k_cho = jax.random.split(key)
    sample = lambda k: sample_continuations(  # noqa: E731
        apply, batch["chosen_input_ids"], lengths, k, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, eos_id=eos_id, pad_id=pad_id)
    widen = lambda x: jnp.pad(x, ((0, 0), (0, max_new_tokens)), constant_values=0)  # noqa: E731
    if candidates > 1:
        best, worst = _ranked_samples(sample, k_rej, candidates, score_fn)
        sides = {"rejected": worst, **({"chosen": best} if mode == "both" else {})}
    else:
        sides = {"rejected": sample(k_rej)}
        if mode == "both":
            sides["chosen"] = sample(k_cho)
    if mode != "both":
        sides["chosen"] = {k: widen(batch[f"chosen_{k}"].astype(jnp.int32)) for k in ("input_ids", "attention_mask", "loss_mask")}
        sides["chosen"]["input_ids"] = jnp.where(sides["chosen"]["attention_mask"] == 1, sides["chosen"]["input_ids"], pad_id)
    out = {f"{side}_{k}": v for side, arrays in sides.items() for k, v in arrays.items()}
    for side in ("chosen", "rejected"):
        logits = ref_apply(out[f"{side}_input_ids"], out[f"{side}_attention_mask"])
        out[f"ref_{side}_logps"] = losses.sequence_logps(logits, out[f"{side}_input_ids"], out[f"{side}_loss_mask"])
    return out


def make_sampler(graphdef, rest, **kwargs: Any) -> Callable:
    """A jit-compiled ``sample(params, prompt_ids, prompt_lengths, key)`` for a split model
    (KV-cached when the model has one; ``kwargs`` as :func:`sample_continuations`)."""
    from flax import nnx

    @jax.jit
    def sample(params, prompt_ids, prompt_lengths, key):
        model = nnx.merge(graphdef, params, rest)
        return sample_continuations(model, prompt_ids, prompt_lengths, key, **kwargs)

    return sample
