"""Token arrays for SFT and preference training: truncation, padding, masks, batching.

Layout (the team's causal-LM convention): right padding; ``attention_mask`` is 1 on real
tokens; ``loss_mask[b, t]`` is 1 exactly where ``input_ids[b, t]`` is a response token
(the appended EOS included), so logits row ``t - 1`` is scored against it; position 0 is
never scored because every sequence starts with at least one prompt token.

Truncation follows TRL's ``DPOTrainer.tokenize_row`` (0.9 to 0.12, before the 0.13
rewrite): prompt and both responses are tokenised separately (EOS appended to each
response); if ``prompt + longer response`` exceeds ``max_length``, the prompt is cut to
``max_prompt_length`` tokens (``"keep_end"`` keeps its last tokens, ``"keep_start"`` its
first); if ``prompt + longer response`` still exceeds ``max_length``, *both* responses are
cut to ``max_length - max_prompt_length`` tokens (keeping their start, so a cut response
loses its EOS). That is ``response_truncation="trl"``, the default. Note that TRL's cut does
not depend on the prompt's actual length: a prompt shorter than ``max_prompt_length`` leaves
room unused. ``response_truncation="fill"`` instead cuts the responses to
``max_length - len(prompt)`` tokens, filling ``max_length`` exactly (not TRL's behaviour).
Both sides share the prompt truncation, so a pair stays a pair. Since
``max_prompt_length < max_length``, truncation always leaves a response at least one token;
a response with no token at all (an empty text without EOS) cannot be scored: it raises, or
with ``on_empty="drop"`` the example is dropped and the count and indices are logged.

Unlike TRL, an added BOS token is never cut: the prompt body is truncated within one token
less (the response budget is the same either way).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SFT_KEYS = ("input_ids", "attention_mask", "loss_mask")
PREFERENCE_KEYS = tuple(f"{side}_{key}" for side in ("chosen", "rejected") for key in SFT_KEYS)
EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")

TruncationMode = Literal["keep_end", "keep_start"]
ResponseTruncation = Literal["trl", "fill"]


class TokenizationError(ValueError):
    """An example cannot be turned into valid token arrays.

    Attributes:
      index: position of the example in the input sequence (``None`` for argument errors).
      reason: what is wrong.
    """

    def __init__(self, reason: str, *, index: int | None = None):
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"example {index}: {reason}")


def special_token_id(tokenizer, given: int | None, candidates: Sequence[str], what: str) -> int:
    """``given`` if set, else the id of the first of ``candidates`` the tokenizer knows.

    Raises:
      TokenizationError: none of ``candidates`` is in the vocabulary (``what`` names the
        argument the caller should pass instead).
    """
    if given is not None:
        return int(given)
    for token in candidates:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    raise TokenizationError(f"the tokenizer has none of {list(candidates)}; pass {what} explicitly")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def _check_lengths(
    max_length: int, max_prompt_length: int, truncation_mode: str, response_truncation: str = "trl"
) -> None:
    if truncation_mode not in ("keep_end", "keep_start"):
        raise TokenizationError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if response_truncation not in ("trl", "fill"):
        raise TokenizationError(f"response_truncation must be 'trl' or 'fill', got {response_truncation!r}")
    if not 0 < max_prompt_length < max_length:
        raise TokenizationError(
            f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
            f"max_length={max_length}"
        )


def truncate(
    prompt: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
    response_truncation: ResponseTruncation = "trl",
) -> tuple[list[int], list[list[int]]]:
    """Truncation of one prompt shared by one or more responses (token id lists).

    Args:
      prompt, responses: token ids (EOS already appended to the responses).
      max_length, max_prompt_length, truncation_mode: as TRL's ``DPOConfig``.
      response_truncation: ``"trl"`` cuts over-long responses to
        ``max_length - max_prompt_length`` tokens (TRL's ``tokenize_row``); ``"fill"`` to
        ``max_length - len(prompt)`` (see the module docstring).

    Returns:
      ``(prompt, responses)`` with ``len(prompt) + len(r) <= max_length`` for every response.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode, response_truncation)
    prompt = list(prompt)
    responses = [list(r) for r in responses]
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    if len(prompt) + longest > max_length:
        budget = max_length - max_prompt_length if response_truncation == "trl" else max_length - len(prompt)
        responses = [r[:budget] for r in responses]
    return prompt, responses


def _encode_example(
    index: int, prompt: str, responses: Sequence[str], tokenizer, *, eos_id, bos_id, vocab_size, lengths
) -> tuple[list[int], list[list[int]]]:
    prompt_ids = ([bos_id] if bos_id is not None else []) + _encode(tokenizer, prompt)
    response_ids = [_encode(tokenizer, r) + ([eos_id] if eos_id is not None else []) for r in responses]
    if vocab_size is not None:
        for name, ids in [("prompt", prompt_ids)] + [(f"response {k}", r) for k, r in enumerate(response_ids)]:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise TokenizationError(
                    f"{name} has token id {bad[0]} outside the model vocabulary [0, {vocab_size})", index=index
                )
    if not prompt_ids:
        raise TokenizationError(
            "the prompt has no token, so the first response token would sit at position 0 "
            "(never scored); pass bos_id to start every sequence with a BOS token",
            index=index,
        )
    if bos_id is None:
        return truncate(prompt_ids, response_ids, **lengths)
    # The BOS stays first whatever is cut: truncate the prompt body within one token less.
    if lengths["max_prompt_length"] < 2:
        raise TokenizationError("max_prompt_length must be at least 2 when a BOS token is added")
    body, cut = truncate(
        prompt_ids[1:], response_ids, max_length=lengths["max_length"] - 1,
        max_prompt_length=lengths["max_prompt_length"] - 1, truncation_mode=lengths["truncation_mode"],
        response_truncation=lengths["response_truncation"],
    )
    return [bos_id] + body, cut


def _pack(rows: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(rows)
    input_ids = np.full((n, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((n, length), dtype=np.int32)
    loss_mask = np.zeros((n, length), dtype=np.int32)
    for b, (prompt, response) in enumerate(rows):
        p, r = len(prompt), len(response)
        input_ids[b, : p + r] = prompt + response
        attention_mask[b, : p + r] = 1
        loss_mask[b, p : p + r] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _tokenize(
    prompts_and_responses: Sequence[tuple[str, Sequence[str]]],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode,
    response_truncation: ResponseTruncation,
    add_eos: bool,
    eos_id: int | None,
    bos_id: int | None,
    pad_id: int | None,
    vocab_size: int | None,
    pad_to_max_length: bool,
    on_empty: str,
) -> list[dict[str, np.ndarray]]:
    _check_lengths(max_length, max_prompt_length, truncation_mode, response_truncation)
    if on_empty not in ("raise", "drop"):
        raise TokenizationError(f"on_empty must be 'raise' or 'drop', got {on_empty!r}")
    eos = special_token_id(tokenizer, eos_id, EOS_CANDIDATES, "eos_id") if add_eos else None
    pad = special_token_id(tokenizer, pad_id, PAD_CANDIDATES + EOS_CANDIDATES, "pad_id")
    if vocab_size is not None and not 0 <= pad < vocab_size:
        raise TokenizationError(f"pad_id {pad} is outside the model vocabulary [0, {vocab_size})")
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
                   response_truncation=response_truncation)
    kept, dropped = [], []
    for index, (prompt, responses) in enumerate(prompts_and_responses):
        prompt_ids, response_ids = _encode_example(
            index, prompt, responses, tokenizer, eos_id=eos, bos_id=bos_id, vocab_size=vocab_size, lengths=lengths
        )
        if any(len(r) == 0 for r in response_ids):
            if on_empty == "raise":
                raise TokenizationError(
                    f"a response has no token left after truncation (prompt {len(prompt_ids)} tokens, "
                    f"max_length {max_length}); raise max_length, lower max_prompt_length or use on_empty='drop'",
                    index=index,
                )
            dropped.append(index)
            continue
        kept.append((prompt_ids, response_ids))
    if dropped:
        logger.warning(
            "dropped %d of %d examples whose response had no token left after truncation (indices %s%s)",
            len(dropped), len(prompts_and_responses), dropped[:20], "…" if len(dropped) > 20 else "",
        )
    if not kept:
        raise TokenizationError("no example left to tokenize")
    longest = max(len(p) + len(r) for p, rs in kept for r in rs)
    length = max_length if pad_to_max_length else longest
    num_sides = len(kept[0][1])
    return [_pack([(p, rs[side]) for p, rs in kept], length, pad) for side in range(num_sides)]


def tokenize_preference(
    examples: Sequence[Any],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
    response_truncation: ResponseTruncation = "trl",
    add_eos: bool = True,
    eos_id: int | None = None,
    bos_id: int | None = None,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    pad_to_max_length: bool = False,
    on_empty: Literal["raise", "drop"] = "raise",
) -> dict[str, np.ndarray]:
    """Preference pairs -> padded token arrays with the preference batch keys.

    Args:
      examples: objects with ``prompt``, ``chosen``, ``rejected`` strings (``PreferenceExample``).
      tokenizer: a ``tokenizers.Tokenizer``; texts are encoded without its special tokens.
      max_length: longest prompt + response in tokens.
      max_prompt_length: the prompt's length after truncation (see the module docstring).
      truncation_mode: ``"keep_end"`` (keep the end of a long prompt) or ``"keep_start"``.
      response_truncation: ``"trl"`` (TRL's cut to ``max_length - max_prompt_length``) or
        ``"fill"`` (cut to ``max_length - len(prompt)``).
      add_eos: append ``eos_id`` to each response (it is then scored).
      eos_id, pad_id: default to the tokenizer's ``<eos>`` / ``<pad>``-like tokens (pad falls
        back to EOS, which is safe because padding is masked everywhere).
      bos_id: if given, prepended to every prompt (needed when a prompt can be empty).
      vocab_size: the model's vocabulary size; any id outside ``[0, vocab_size)`` is an error.
      pad_to_max_length: pad to ``max_length`` instead of to the longest sequence of the set.
      on_empty: what to do with an example whose response has no token left.

    Returns:
      ``{chosen_input_ids, chosen_attention_mask, chosen_loss_mask, rejected_…}``, each an
      ``np.int32`` array of shape ``(N, T)`` with the same ``T`` on both sides.

    Raises:
      TokenizationError: naming the example index.
    """
    sides = _tokenize(
        [(e.prompt, (e.chosen, e.rejected)) for e in examples], tokenizer,
        max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
        response_truncation=response_truncation, add_eos=add_eos, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
        vocab_size=vocab_size, pad_to_max_length=pad_to_max_length, on_empty=on_empty,
    )
    return {f"{side}_{key}": arrays[key] for side, arrays in zip(("chosen", "rejected"), sides) for key in SFT_KEYS}


def tokenize_sft(
    examples: Sequence[Any],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
    response_truncation: ResponseTruncation = "trl",
    add_eos: bool = True,
    eos_id: int | None = None,
    bos_id: int | None = None,
    pad_id: int | None = None,
    vocab_size: int | None = None,
    pad_to_max_length: bool = False,
    on_empty: Literal["raise", "drop"] = "raise",
) -> dict[str, np.ndarray]:
    """Prompt/response examples -> ``{input_ids, attention_mask, loss_mask}`` (``np.int32``, (N, T)).

    ``examples`` are objects with ``prompt`` and ``response`` (``SFTExample``) or ``prompt`` and
    ``chosen`` (``PreferenceExample``: its chosen side). Arguments as :func:`tokenize_preference`.
    """
    pairs = [(e.prompt, (e.response if hasattr(e, "response") else e.chosen,)) for e in examples]
    (arrays,) = _tokenize(
        pairs, tokenizer,
        max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
        response_truncation=response_truncation, add_eos=add_eos, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
        vocab_size=vocab_size, pad_to_max_length=pad_to_max_length, on_empty=on_empty,
    )
    return arrays


def num_batches(num_examples: int, batch_size: int, *, drop_last: bool = True) -> int:
    """How many batches :func:`batches` yields per epoch."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation drawn from ``default_rng([seed, epoch])``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled mini-batches, deterministic in ``(seed, epoch)``.

    Args:
      arrays: equal-length arrays (first axis = examples), e.g. from :func:`tokenize_preference`.
      batch_size: examples per batch.
      seed, epoch: the shuffle is ``epoch_permutation(N, seed=seed, epoch=epoch)``.
      drop_last: leave out a final incomplete batch (keeps shapes static for jit).
      start: the index of the first batch to yield, to resume mid-epoch after a checkpoint;
        batch ``start`` is the same batch an uninterrupted iteration yields at that index.

    Yields:
      dicts with the keys of ``arrays``, each of leading size ``batch_size`` (the last may be
      smaller when ``drop_last=False``).
    """
    if not arrays:
        raise ValueError("batches: no arrays given")
    sizes = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batches: arrays must share their first axis, got leading sizes {sizes}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = next(iter(sizes.values()))
    total = num_batches(n, batch_size, drop_last=drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"start must be in [0, {total}] (batches per epoch), got {start}")
    order = epoch_permutation(n, seed=seed, epoch=epoch)
    for b in range(start, total):
        index = order[b * batch_size : (b + 1) * batch_size]
        yield {key: np.asarray(value)[index] for key, value in arrays.items()}
