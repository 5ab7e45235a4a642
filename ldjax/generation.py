"""Text generation for evaluation (win rates of generations, SPEC §3's "extend" comparison).

:func:`generate` turns prompt strings into response strings with a :class:`ldjax.models.CausalLM`
and its tokenizer, on top of :func:`ldjax.train.sampling.sample_continuations` (KV-cached,
jit-compiled once per call: every batch is padded to the same shape).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_AUTO = "auto"


def _special_ids(tokenizer, bos_id, eos_id, pad_id) -> tuple[int | None, int | None, int]:
    """Training's conventions (``ldjax.cli.special_ids``) for whatever is left at "auto"."""
    from ldjax.data.tokenize import EOS_CANDIDATES, PAD_CANDIDATES, TokenizationError, special_token_id

    def lookup(candidates, what):
        try:
            return special_token_id(tokenizer, None, candidates, what)
        except TokenizationError:
            return None

    from ldjax.cli import BOS_CANDIDATES

    if bos_id == _AUTO:
        bos_id = lookup(BOS_CANDIDATES, "bos_id")
    if eos_id == _AUTO:
        eos_id = lookup(EOS_CANDIDATES, "eos_id")
    if pad_id == _AUTO:
        pad_id = lookup(PAD_CANDIDATES + EOS_CANDIDATES, "pad_id")
        pad_id = 0 if pad_id is None else pad_id
    return bos_id, eos_id, int(pad_id)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "top_k", "has_eos", "pad_id"))
def _sample(graphdef, params, rest, prompt_ids, prompt_lengths, key, temperature, eos_id, *, max_new_tokens, top_k,
            has_eos, pad_id):
    """``sampling.sample_continuations`` on the merged model, compiled once per graph, shape and
    static option (``sampling.make_sampler`` makes a new jitted function per call; here the
    temperature and the EOS id are traced, so changing them does not recompile)."""
    from flax import nnx

    from ldjax.train import sampling

    return sampling.sample_continuations(nnx.merge(graphdef, params, rest), prompt_ids, prompt_lengths, key,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         eos_id=eos_id if has_eos else None, pad_id=pad_id)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, batch_size: int = 32, bos_id: int | None | str = _AUTO,
             eos_id: int | None | str = _AUTO, pad_id: int | str = _AUTO) -> list[str]:
    """Samples one response per prompt.

    Args:
      model: a :class:`ldjax.models.CausalLM` (decoded with its KV cache).
      tokenizer: a ``tokenizers.Tokenizer`` (e.g. from :func:`ldjax.models.load_pretrained`).
      prompts: prompt strings.
      max_new_tokens: the most tokens generated per response.
      temperature: softmax temperature; ``0`` means greedy decoding (the same as ``top_k=1``).
      top_k: keep only the k most likely tokens (0 = all); ``top_k=1`` is greedy decoding
        (exactly argmax: sampling from a single token).
      seed: batch ``j`` is sampled with ``fold_in(PRNGKey(seed), j)``: the same seed, prompts
        and ``batch_size`` give the same responses (a row's draw depends on its batch).
      batch_size: rows per sampling call; the last batch is padded with copies of a prompt.
      bos_id, eos_id, pad_id: token ids; ``"auto"`` resolves them as training does
        (``ldjax.cli.special_ids``: BOS = ``<bos>``/``<s>``/``<|endoftext|>`` when present, else
        none; EOS the first known of ``ldjax.data.tokenize.EOS_CANDIDATES``, else no stopping;
        PAD a pad-like token, else EOS, else 0).

    Returns:
      the responses: the generated tokens up to (not including) the first EOS, decoded with
      ``tokenizer.decode(..., skip_special_tokens=True)``.

    Raises:
      ValueError: an empty prompt without BOS, a bad argument, or prompt + ``max_new_tokens``
        longer than the model's ``max_position_embeddings``.
    """
    from ldjax.train import steps

    if max_new_tokens < 1 or batch_size < 1 or top_k < 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 1, batch_size >= 1, top_k >= 0, temperature >= 0; got "
                         f"{max_new_tokens}, {batch_size}, {top_k}, {temperature}")
    if temperature == 0:
        temperature, top_k = 1.0, 1
    prompts = list(prompts)
    if not prompts:
        return []
    bos_id, eos_id, pad_id = _special_ids(tokenizer, bos_id, eos_id, pad_id)
    encoded = [([bos_id] if bos_id is not None else []) + list(tokenizer.encode(p, add_special_tokens=False).ids)
               for p in prompts]
    if min(len(e) for e in encoded) == 0:
        raise ValueError("generate: a prompt has no token and there is no BOS token to start it")
    width = max(len(e) for e in encoded)
    limit = model.config.max_position_embeddings
    if width + max_new_tokens > limit:
        raise ValueError(f"generate: the longest prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({limit})")
    batch_size = min(batch_size, len(prompts))
    width = min(-(-width // 16) * 16, limit - max_new_tokens)  # prompt widths in steps of 16: fewer compilations
    graphdef, params, rest = steps.split_model(model)
    sample = functools.partial(_sample, graphdef, max_new_tokens=int(max_new_tokens), top_k=int(top_k),
                               has_eos=eos_id is not None, pad_id=pad_id)
    dynamic = (jnp.float32(temperature), jnp.int32(-1 if eos_id is None else eos_id))
    key = jax.random.PRNGKey(seed)
    responses: list[str] = []
    for j, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids = np.full((batch_size, width), pad_id, np.int32)
        for b, e in enumerate(rows):
            ids[b, :len(e)] = e
        lengths = np.array([len(e) for e in rows], np.int32)
        out = sample(params, rest, jnp.asarray(ids), jnp.asarray(lengths), jax.random.fold_in(key, j), *dynamic)
        tokens = np.asarray(jax.device_get(out["input_ids"]))
        for b in range(len(chunk)):
            new = [int(t) for t in tokens[b, lengths[b]:lengths[b] + max_new_tokens]]
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id)]
            responses.append(tokenizer.decode(new, skip_special_tokens=True))
    return responses


__all__ = ["generate"]
