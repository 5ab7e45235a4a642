"""Probe sets (SPEC §3): the responses whose log-probabilities are watched during finetuning.

For each probe prompt ``x_u`` (a *training* prompt) a :class:`ProbeSet` holds one tokenised
response per family of :data:`PROBE_FAMILIES`:

=====================  =========================================================================
family                 embedded world                      preference JSONL file (``--data``)
=====================  =========================================================================
``chosen``             the pair's chosen response          the record's chosen response
``rejected``           the pair's rejected response        the record's rejected response
``chosen_rephrase``    same meaning, other words           optional record field ``chosen_rephrase``
``rejected_rephrase``  (synonyms and template variants)    optional record field ``rejected_rephrase``
``chosen_format``      same format, other meaning          optional record field ``chosen_format``
``rejected_format``    (every meaning replaced)            optional record field ``rejected_format``
``other_train``        chosen of another training example  the same: chosen of a training record j ≠ u
``other_test``         chosen of a held-out example        the same: chosen of a held-out record
``random_sentence``    a sentence of the world's           the *rejected* response of a held-out record
                       narrative generator, of similar     (not other_test's one when there are two or
                       length                              more), the closest in word count to chosen
                                                           among 20 seeded candidates
``shuffled_chosen``    chosen's words permuted             the same (words = whitespace-split; they are
                                                           re-joined with single spaces)
``shuffled_other``     words of a third training           the same: words of the chosen response of a
                       example's chosen permuted           training record k ∉ {u, j} (k = j when the
                                                           training set has only two records)
=====================  =========================================================================

Optional fields of a record (all four are optional, independently of each other). Their value
is written like the record's own responses:

- plain ``{"prompt", "chosen", "rejected"}`` records: the response text;
- Anthropic-HH records: either the response text, or (when it contains ``"\\n\\nAssistant:"``)
  a whole dialogue whose part up to its last assistant marker must equal the record's prompt;
- UltraFeedback records: either the response text, or a message list whose messages before
  the last (assistant) one must equal those of ``chosen``.

A family from an optional field is kept when every probe record has the field and omitted
(listed in :attr:`ProbeTexts.omitted` with the reason) when none has it; a field present on
some probe records and missing on others is a :class:`~ldjax.data.preference.DataFormatError`
naming the file and line of the first record without it. Families that a file cannot give
(no held-out record: ``other_test`` and ``random_sentence``; a single training record:
``other_train`` and ``shuffled_other``) are omitted and listed too, never faked.

Everything is seeded: the same records, ``num_prompts`` and ``seed`` give the same probes.

The model-dependent probe ``argmax`` (``y*``, SPEC §3) is not stored: :func:`token_diagnostics`
computes the teacher-forced ``Σ_l max_v log π(v | x_u, y_<l)`` along *every* scored family in the
same forward pass, so the argmax along ``chosen`` and along ``rejected`` are the
``argmax_logps`` of those two families.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import losses
from ldjax.data import preference as _pref
from ldjax.data.preference import DataFormatError, PreferenceExample, SFTExample
from ldjax.data.tokenize import TokenizationError, tokenize_sft
from ldjax.data.world import PROBE_FAMILIES, shuffle_words

__all__ = [
    "PROBE_FAMILIES",
    "OPTIONAL_FIELDS",
    "ProbeRecord",
    "ProbeTexts",
    "ProbeSet",
    "FamilyScores",
    "ProbeScorer",
    "read_probe_records",
    "probe_texts_from_world",
    "probe_texts_from_records",
    "probe_texts_from_jsonl",
    "tokenize_probes",
    "token_diagnostics",
    "a_frobenius_norm",
    "score_probes",
    "preference_diagnostics",
]

OPTIONAL_FIELDS = ("chosen_rephrase", "rejected_rephrase", "chosen_format", "rejected_format")
RANDOM_SENTENCE_CANDIDATES = 20


# ------------------------------------------------------------------------------------ texts


@dataclasses.dataclass(frozen=True)
class ProbeRecord:
    """One training or held-out preference record, with its optional probe fields.

    Attributes:
      example: the pair.
      extras: optional field name (:data:`OPTIONAL_FIELDS`) -> response text, for the fields
        the record has.
      line: 1-based line in ``path`` (``None`` for in-memory records).
      path: the file it was read from (``None`` for in-memory records).
    """

    example: PreferenceExample
    extras: Mapping[str, str] = dataclasses.field(default_factory=dict)
    line: int | None = None
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class ProbeTexts:
    """Probe prompts and the response text of every family, before tokenisation.

    Attributes:
      prompts: the ``P`` probe prompts (training prompts).
      train_indices: (P,) their positions in the training set.
      responses: family -> (P,) response texts, for the families present, in
        :data:`PROBE_FAMILIES` order.
      sources: family -> (P,) index of the example a borrowed response comes from
        (``other_train``, ``shuffled_other``: training index; ``other_test`` and, for files,
        ``random_sentence``: held-out index).
      omitted: family -> why it is not in the set.
      origin: ``"world"`` or the data file.
      notes: family -> how it was built, where that is not obvious.
    """

    prompts: tuple[str, ...]
    train_indices: tuple[int, ...]
    responses: Mapping[str, tuple[str, ...]]
    sources: Mapping[str, tuple[int, ...]]
    omitted: Mapping[str, str]
    origin: str
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def families(self) -> tuple[str, ...]:
        """The families present, in :data:`PROBE_FAMILIES` order."""
        return tuple(f for f in PROBE_FAMILIES if f in self.responses)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything above plus its :meth:`digest`."""
        body = {"origin": self.origin, "prompts": list(self.prompts), "train_indices": list(self.train_indices),
                "families": list(self.families), "responses": {f: list(self.responses[f]) for f in self.families},
                "sources": {f: list(v) for f, v in self.sources.items()}, "omitted": dict(self.omitted),
                "notes": dict(self.notes)}
        return {"digest": self.digest(), **body}

    def digest(self) -> str:
        """sha256 of the prompts and responses (what the log-probs are measured on)."""
        body = json.dumps([list(self.prompts), {f: list(self.responses[f]) for f in self.families}],
                          ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _field_error(reason: str, record: ProbeRecord | None) -> DataFormatError:
    if record is None:
        return DataFormatError(reason)
    return DataFormatError(reason, path=record.path, line=record.line)


def _extra_response(value: Any, key: str, record: dict, fmt: str, example: PreferenceExample) -> str:
    """The response text of optional field ``key`` of a record of format ``fmt``."""
    if fmt == "ultrafeedback" and isinstance(value, list):
        messages = _pref._require_messages(record, key)
        if messages[:-1] != record["chosen"][:-1]:
            raise _pref._RecordError(f"field {key!r}: its messages before the response differ from those of 'chosen'")
        text = messages[-1]["content"]
    elif isinstance(value, str):
        _pref._require_encodable(value, f"field {key!r}")
        text = value
        if fmt == "hh" and _pref.HH_ASSISTANT_MARKER in value:
            prompt, text = _pref._split_hh(value, key)
            if prompt != example.prompt:
                raise _pref._RecordError(f"field {key!r}: its dialogue differs from 'chosen' before the last assistant turn")
    else:
        kind = "a string or a message list" if fmt == "ultrafeedback" else "a string"
        raise _pref._RecordError(f"field {key!r} must be {kind}, got {type(value).__name__}")
    if not text.strip():
        raise _pref._RecordError(f"field {key!r}: response is empty")
    return text


def read_probe_records(path: str | os.PathLike, format: _pref.Format = "auto") -> list[ProbeRecord]:
    """Every record of a preference JSONL file with its optional probe fields.

    The examples are exactly those of ``load_preference_jsonl(path, format)`` (same parser,
    same order); malformed records raise (there is no skipping here, so that record ``i`` is
    example ``i``).

    Raises:
      DataFormatError: a malformed record or optional field, naming the file and line.
    """
    if format != "auto" and format not in _pref.PREFERENCE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {_pref.PREFERENCE_FORMATS}, got {format!r}")
    out: list[ProbeRecord] = []
    fmt = None if format == "auto" else format
    for number, record in _pref._iter_records(path):
        if isinstance(record, DataFormatError):
            raise record
        try:
            fmt = fmt or _pref.detect_format(record)
            example = _pref._PREFERENCE_PARSERS[fmt](record)
            extras = {key: _extra_response(record[key], key, record, fmt, example)
                      for key in OPTIONAL_FIELDS if key in record}
        except _pref._RecordError as err:
            raise DataFormatError(str(err), path=path, line=number) from None
        out.append(ProbeRecord(example, extras, number, os.fspath(path)))
    if not out:
        raise DataFormatError("no valid preference records in the file", path=path)
    return out


def _as_record(item: ProbeRecord | PreferenceExample) -> ProbeRecord:
    return item if isinstance(item, ProbeRecord) else ProbeRecord(item)


def _draw_excluding(rng: np.random.Generator, n: int, exclude: Sequence[int]) -> int:
    """A uniform draw from ``range(n)`` minus the distinct values ``exclude`` (O(len(exclude)))."""
    value = int(rng.integers(n - len(exclude)))
    for e in sorted(exclude):
        value += value >= e
    return value


def probe_texts_from_records(
    train: Sequence[ProbeRecord | PreferenceExample],
    held_out: Sequence[ProbeRecord | PreferenceExample],
    *,
    num_prompts: int,
    seed: int = 0,
    origin: str = "<records>",
) -> ProbeTexts:
    """Probe families of a preference data set (see the module table).

    Args:
      train: the training records (probe prompts and ``other_train``/``shuffled_other`` come
        from here); :class:`PreferenceExample` is accepted (no optional fields).
      held_out: records never trained on (``other_test``, ``random_sentence``). A record equal
        to a training example is not held out and is ignored.
      num_prompts: ``P``, drawn without replacement from ``train`` (sorted by index).
      seed: every random choice (prompts, partners, permutations) follows from it.
      origin: a name for :attr:`ProbeTexts.origin` (the file).

    Raises:
      ValueError: ``num_prompts`` outside ``[1, len(train)]``.
      DataFormatError: an optional field present on some probe records and missing on others
        (naming the file and line of the first record without it), or an empty response.
    """
    train = [_as_record(r) for r in train]
    trained = {r.example for r in train}
    held = [r for r in (_as_record(r) for r in held_out) if r.example not in trained]
    if not 1 <= num_prompts <= len(train):
        raise ValueError(f"num_prompts must be in [1, {len(train)}] (the training records), got {num_prompts}")
    rng = np.random.default_rng([seed, 0x70726F62])  # "prob"
    chosen_idx = sorted(int(i) for i in rng.choice(len(train), num_prompts, replace=False))
    probes = [train[u] for u in chosen_idx]
    for r in probes:
        for side in ("chosen", "rejected"):
            if not getattr(r.example, side).strip():
                raise _field_error(f"{side} response is empty", r)

    responses: dict[str, list[str]] = {"chosen": [r.example.chosen for r in probes],
                                       "rejected": [r.example.rejected for r in probes]}
    omitted: dict[str, str] = {}
    for key in OPTIONAL_FIELDS:
        have = [key in r.extras for r in probes]
        if all(have):
            responses[key] = [r.extras[key] for r in probes]
        elif not any(have):
            omitted[key] = f"no probe record has the optional field {key!r}"
        else:
            first = probes[have.index(False)]
            raise _field_error(f"optional field {key!r} is missing here but present on other probe records "
                               f"(give it on every record or on none)", first)

    sources: dict[str, list[int]] = {}
    if len(train) >= 2:
        for name in ("other_train", "shuffled_other"):
            responses[name], sources[name] = [], []
    else:
        for name in ("other_train", "shuffled_other"):
            omitted[name] = "the training set has a single record: no other training response"
    if held:
        for name in ("other_test", "random_sentence"):
            responses[name], sources[name] = [], []
    else:
        for name in ("other_test", "random_sentence"):
            omitted[name] = "no held-out record (every held-out record is also a training record, or there is none)"
    responses["shuffled_chosen"] = []

    for u, r in zip(chosen_idx, probes):
        if "other_train" in responses:
            j = _draw_excluding(rng, len(train), [u])
            k = _draw_excluding(rng, len(train), [u, j]) if len(train) > 2 else j
            responses["other_train"].append(train[j].example.chosen)
            sources["other_train"].append(j)
            responses["shuffled_other"].append(shuffle_words(train[k].example.chosen, rng))
            sources["shuffled_other"].append(k)
        if "other_test" in responses:
            t = int(rng.integers(len(held)))
            responses["other_test"].append(held[t].example.chosen)
            sources["other_test"].append(t)
            if len(held) > 1:  # candidates: distinct held-out records other than t
                picks = rng.choice(len(held) - 1, min(RANDOM_SENTENCE_CANDIDATES, len(held) - 1), replace=False)
                pool = [int(i) + (int(i) >= t) for i in picks]
            else:
                pool = [t]
            target = len(r.example.chosen.split())
            s = min(pool, key=lambda i: abs(len(held[i].example.rejected.split()) - target))
            responses["random_sentence"].append(held[s].example.rejected)
            sources["random_sentence"].append(s)
        responses["shuffled_chosen"].append(shuffle_words(r.example.chosen, rng))

    notes = {"random_sentence": "the rejected response of a held-out record (another than other_test's when "
                                f"possible), closest in word count to chosen among {RANDOM_SENTENCE_CANDIDATES} "
                                "seeded candidates: fluent and unrelated to the prompt, but an answer to another one",
             "shuffled_chosen": "whitespace-split words of chosen in a seeded random order, joined by single spaces",
             "shuffled_other": "the same for the chosen response of a training record other than the prompt's "
                               "(and than other_train's when possible)"}
    ordered = {f: tuple(responses[f]) for f in PROBE_FAMILIES if f in responses}
    return ProbeTexts(tuple(r.example.prompt for r in probes), tuple(chosen_idx), ordered,
                      {f: tuple(v) for f, v in sources.items()}, dict(sorted(omitted.items())), origin, notes)


def probe_texts_from_jsonl(
    path: str | os.PathLike,
    format: _pref.Format = "auto",
    *,
    num_prompts: int,
    seed: int = 0,
    held_out_fraction: float = 0.1,
) -> ProbeTexts:
    """Probe families of a preference JSONL file, holding out its last records.

    The last ``floor(held_out_fraction · N)`` records are held out (the split of
    ``ldjax sft|dpo --data``: 10 %); probe prompts come from the others.
    """
    records = read_probe_records(path, format)
    n_test = int(len(records) * held_out_fraction)
    return probe_texts_from_records(records[: len(records) - n_test], records[len(records) - n_test:],
                                    num_prompts=num_prompts, seed=seed, origin=os.fspath(path))


def probe_texts_from_world(world, num_prompts: int | None = None) -> ProbeTexts:
    """The embedded world's probes (every family), the first ``num_prompts`` of ``world.probes``.

    Raises:
      ValueError: ``num_prompts`` larger than the world's ``num_probe``.
    """
    if num_prompts is not None and not 1 <= num_prompts <= len(world.probes):
        raise ValueError(f"num_prompts must be in [1, {len(world.probes)}] (WorldConfig.num_probe), got {num_prompts}")
    probes = world.probes if num_prompts is None else world.probes[:num_prompts]
    responses = {f: tuple(p.responses[f] for p in probes) for f in PROBE_FAMILIES}
    sources = {f: tuple(int(p.sources[f]) for p in probes) for f in ("other_train", "other_test", "shuffled_other")}
    notes = {"random_sentence": "a fresh sentence of the world's narrative generator, the closest in word count "
                                "to chosen among 20",
             "chosen_rephrase": "same slots and meanings, other template variants and synonyms",
             "chosen_format": "same slots, templates and word forms, every meaning replaced"}
    return ProbeTexts(tuple(p.prompt for p in probes), tuple(p.train_index for p in probes), responses, sources,
                      {}, "world", notes)


# ----------------------------------------------------------------------------- tokenisation


@dataclasses.dataclass(frozen=True)
class ProbeSet:
    """Tokenised probes: one ``{input_ids, attention_mask, loss_mask}`` batch per family.

    Attributes:
      texts: what was tokenised.
      arrays: family -> ``{input_ids, attention_mask, loss_mask}``, each ``np.int32 (P, T)``;
        every family has the same ``T`` (padded to ``max_length``), so one compiled pass
        scores them all. Conventions as :mod:`ldjax.losses.sequence`.
    """

    texts: ProbeTexts
    arrays: Mapping[str, Mapping[str, np.ndarray]]

    @property
    def families(self) -> tuple[str, ...]:
        return self.texts.families

    @property
    def num_prompts(self) -> int:
        return self.texts.num_prompts

    @property
    def length(self) -> int:
        return int(next(iter(self.arrays.values()))["input_ids"].shape[1])

    def lengths(self, family: str) -> np.ndarray:
        """(P,) scored response tokens of one family (after truncation, EOS included)."""
        return np.asarray(losses.response_lengths(self.arrays[family]["loss_mask"]))


def tokenize_probes(texts: ProbeTexts, tokenizer, *, max_length: int, max_prompt_length: int,
                    **kwargs: Any) -> ProbeSet:
    """Tokenises every family with :func:`ldjax.data.tokenize.tokenize_sft`, padded to ``max_length``.

    Use the training run's settings (``max_length``, ``max_prompt_length``, ``bos_id``, …) so
    that the probes are truncated and scored as training sequences are.

    Raises:
      TokenizationError: naming the family and the probe index (e.g. a response with no token
        left after truncation).
    """
    kwargs = {**kwargs, "pad_to_max_length": True, "on_empty": "raise"}
    arrays = {}
    for family in texts.families:
        rows = [SFTExample(p, r) for p, r in zip(texts.prompts, texts.responses[family])]
        try:
            arrays[family] = tokenize_sft(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                          **kwargs)
        except TokenizationError as err:
            raise TokenizationError(f"probe family {family!r}: {err.reason}", index=err.index) from None
    return ProbeSet(texts, arrays)


# ---------------------------------------------------------------------------------- scoring


class FamilyScores(NamedTuple):
    """Per-prompt scores of one family (arrays (P,)) and optionally per position (P, T).

    Per position ``t`` (aligned with ``input_ids`` as :func:`ldjax.losses.token_logps`: the
    distribution ``π_t = softmax(logits[t-1])`` that predicts token ``t``), zero where token
    ``t`` is not scored.

    Attributes:
      logps: ``Σ_t log π_t(y_t)``, the summed response log-probability.
      argmax_logps: ``Σ_t max_v log π_t(v)``, the teacher-forced argmax path ``y*`` along
        this response.
      off_argmax: ``Σ_t log(1 − max_v π_t(v))``, the log-mass off the argmax.
      a_norm: mean over scored positions of ``‖A_t‖_F = sqrt(V‖π_t‖² + V − 2)``.
      residual_norm: ``sqrt(Σ_t ‖π_t − e_{y_t}‖²)``, the Frobenius norm of the unit-coefficient
        residual ``G`` (SFT's; multiply by ``|c|`` for another loss).
      lengths: scored tokens.
      token_*: the per-position terms of the above (``token_residual_sq`` is ``‖π_t − e_{y_t}‖²``);
        ``None`` unless asked for.
    """

    logps: np.ndarray
    argmax_logps: np.ndarray
    off_argmax: np.ndarray
    a_norm: np.ndarray
    residual_norm: np.ndarray
    lengths: np.ndarray
    token_logps: np.ndarray | None = None
    token_argmax_logps: np.ndarray | None = None
    token_off_argmax: np.ndarray | None = None
    token_a_norm: np.ndarray | None = None
    token_residual_sq: np.ndarray | None = None


def a_frobenius_norm(logits: jax.Array) -> jax.Array:
    """``‖A‖_F`` of ``A = I − 1 πᵀ``, ``π = softmax(logits)``, over the last axis: (..., V) -> (...).

    Uses ``‖A‖_F² = Σ_ij (δ_ij − π_j)² = V‖π‖² + V − 2`` (never forms the V×V matrix).
    """
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.sqrt(vocab * jnp.sum(probs * probs, axis=-1) + (vocab - 2))


def token_diagnostics(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
    """Per-position probe diagnostics of one batch of sequences (pure, jit-able).

    Args:
      logits: (B, T, V) next-token logits.
      input_ids: (B, T) token ids.
      loss_mask: (B, T) scored-token mask (the convention of :mod:`ldjax.losses.sequence`).

    Returns:
      ``{token_logps, token_argmax_logps, token_off_argmax, token_a_norm, token_residual_sq}``,
      each (B, T) in float32 (float64 for float64 logits), entry ``t`` computed from row
      ``t - 1`` and zero where token ``t`` is not scored (see :class:`FamilyScores`).
    """
    logits, input_ids, loss_mask = jnp.asarray(logits), jnp.asarray(input_ids), jnp.asarray(loss_mask)
    token_logps = losses.token_logps(logits, input_ids, loss_mask)  # checks the shapes
    dtype = token_logps.dtype
    z = logits.astype(dtype)
    vocab = z.shape[-1]
    lse = jax.nn.logsumexp(z, axis=-1)
    top = jnp.argmax(z, axis=-1)
    argmax_logp = jnp.max(z, axis=-1) - lse
    # log(1 − max π) as the log-sum-exp of the other logits: no cancellation when max π ≈ 1.
    vocab_ids = jnp.arange(vocab)
    off = jax.nn.logsumexp(jnp.where(vocab_ids == top[..., None], -jnp.inf, z), axis=-1) - lse
    probs = jnp.exp(z - lse[..., None])
    a_norm = jnp.sqrt(vocab * jnp.sum(probs * probs, axis=-1) + (vocab - 2))
    next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    # ‖π − e_y‖² summed directly (π_y − 1 at the target), not as ‖π‖² − 2π_y + 1, which
    # cancels when π_y ≈ 1.
    diff = jnp.where(vocab_ids == next_ids[..., None], probs - 1, probs)
    residual_sq = jnp.sum(diff * diff, axis=-1)
    scored = jnp.asarray(loss_mask).astype(bool).at[:, 0].set(False)

    def to_positions(rows):
        shifted = jnp.concatenate([jnp.zeros_like(rows[:, :1]), rows[:, :-1]], axis=1)
        return jnp.where(scored, shifted, jnp.zeros((), dtype))

    return {"token_logps": token_logps, "token_argmax_logps": to_positions(argmax_logp),
            "token_off_argmax": to_positions(off), "token_a_norm": to_positions(a_norm),
            "token_residual_sq": to_positions(residual_sq)}


def _summaries(diag: Mapping[str, jax.Array], loss_mask: jax.Array) -> dict[str, jax.Array]:
    lengths = losses.response_lengths(loss_mask)
    dtype = diag["token_logps"].dtype
    return {"logps": diag["token_logps"].sum(-1), "argmax_logps": diag["token_argmax_logps"].sum(-1),
            "off_argmax": diag["token_off_argmax"].sum(-1),
            "a_norm": diag["token_a_norm"].sum(-1) / jnp.maximum(lengths, 1).astype(dtype),
            "residual_norm": jnp.sqrt(diag["token_residual_sq"].sum(-1)), "lengths": lengths}


LogitsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Logits:
    """``logits(params, input_ids, attention_mask)`` of an LM :class:`~ldjax.models.functional.ModuleApply`
    (``lm=True``) or of a functional ``apply_fn(params, input_ids)``; hashable, equal for equal ``apply``."""

    apply: Callable
    lm: bool

    def __call__(self, params, input_ids, attention_mask):
        if self.lm:
            return self.apply(params, {"input_ids": input_ids, "attention_mask": attention_mask})
        return self.apply(params, input_ids)


def _logits_fn(model) -> tuple[LogitsFn, Any]:
    """``(logits_fn(params, input_ids, attention_mask), default params)`` of a model.

    ``model`` is an NNX module (called as ``module(input_ids, attention_mask)``) or a
    functional ``apply_fn(params, input_ids)`` (:func:`ldjax.models.functional.functional`; the
    attention mask is not passed, which is exact for right-padded probes under a causal mask).
    Modules of one structure give equal ``logits_fn`` (one compiled pass for all of them).
    """
    from flax import nnx

    from ldjax.models.functional import ModuleApply

    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return _Logits(ModuleApply(graphdef, rest, lm_inputs=True), lm=True), params
    if callable(model):
        return _Logits(model, lm=False), None
    raise TypeError(f"model must be an nnx.Module or apply_fn(params, input_ids), got {type(model).__name__}")


@functools.partial(jax.jit, static_argnames=("logits_fn", "per_position"))
def _score_pass(params, input_ids, attention_mask, loss_mask, *, logits_fn: LogitsFn, per_position: bool):
    # Module level, keyed by the (hashable) logits_fn: every scorer of one model structure
    # shares the compiled pass.
    logits = logits_fn(params, input_ids, attention_mask)
    diag = token_diagnostics(logits, input_ids, loss_mask)
    out = _summaries(diag, loss_mask)
    if per_position:
        out.update(diag)
    return out


class ProbeScorer:
    """Scores a :class:`ProbeSet`: per family and chunk of prompts, or every family in one pass.

    Args:
      model: an NNX module, or ``apply_fn(params, input_ids) -> logits`` (functional view).
      batch_size: prompts per forward pass (default: all ``P``). A last, shorter chunk is
        padded with copies of its first row (then dropped), so every call has one shape and the
        pass compiles once for every family and chunk.
      per_position: also return the (P, T) per-position diagnostics (not with ``fused``).
      fused: stack the requested families into one (F·p, L) pass per chunk of ``p`` prompts,
        with the padding trimmed to ``L`` = the probe set's longest real sequence rounded up to
        ``length_multiple`` tokens. Exact for the right-padded probes of :func:`tokenize_probes`
        under a causal model (no position sees the padding after it); it saves the dispatches of
        one pass per family and the trimmed padding's compute.

    Call ``scorer(params, probe_set, families=None, prompts=None) -> {family: FamilyScores}``
    (numpy arrays); ``prompts`` (indices into the probe prompts) scores only those rows, in that
    order. ``params`` may be omitted for an NNX module (its current parameters).
    """

    def __init__(self, model, *, batch_size: int | None = None, per_position: bool = False, fused: bool = False,
                 length_multiple: int = 8):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if fused and per_position:
            raise ValueError("per_position diagnostics keep the full length: use fused=False")
        if length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
        self._logits_fn, self._default_params = _logits_fn(model)
        self.batch_size = batch_size
        self.per_position = per_position
        self.fused = fused
        self.length_multiple = length_multiple
        self._lengths: dict[int, int] = {}
        self._shapes: set[tuple[Any, ...]] = set()

    def _run(self, params, *batch):
        self._shapes.add(tuple((np.shape(x), np.result_type(x)) for x in batch))
        return _score_pass(params, *batch, logits_fn=self._logits_fn, per_position=self.per_position)

    def compiled_shapes(self) -> int:
        """How many input shapes (and dtypes) this scorer's pass has run at (1 after scoring any
        probe set). Each needs one compiled program, which every scorer of the same model
        structure shares (only the first to meet a shape compiles it)."""
        return len(self._shapes)

    def trimmed_length(self, probe_set: ProbeSet) -> int:
        """The fused pass's sequence length for ``probe_set`` (one value per probe set, so every
        subset of prompts shares one compiled shape)."""
        key = id(probe_set)
        if key not in self._lengths:
            longest = max(int(np.asarray(a["attention_mask"]).sum(axis=1).max()) for a in probe_set.arrays.values())
            self._lengths[key] = min(probe_set.length, -(-longest // self.length_multiple) * self.length_multiple)
        return self._lengths[key]

    def __call__(self, params, probe_set: ProbeSet, families: Sequence[str] | None = None,
                 prompts: Sequence[int] | None = None) -> dict[str, FamilyScores]:
        if params is None:
            params = self._default_params
            if params is None:
                raise ValueError("params are needed when the model is an apply_fn")
        families = probe_set.families if families is None else tuple(families)
        unknown = [f for f in families if f not in probe_set.arrays]
        if unknown:
            raise ValueError(f"families {unknown} are not in the probe set (present: {list(probe_set.families)}; "
                             f"omitted: {dict(probe_set.texts.omitted)})")
        rows = np.arange(probe_set.num_prompts) if prompts is None else np.asarray(prompts, dtype=np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= probe_set.num_prompts:
            raise ValueError(f"prompts must be a non-empty list of indices in [0, {probe_set.num_prompts}), got {prompts}")
        if self.fused:
            return self._fused(params, probe_set, families, rows)
        n = len(rows)
        chunk = min(n, self.batch_size or n)
        pending = {}  # every pass is dispatched before any result is fetched (no sync in between)
        for family in families:
            arrays = probe_set.arrays[family]
            pending[family] = []
            for start in range(0, n, chunk):
                idx = np.arange(start, start + chunk)
                valid = idx < n
                take = rows[np.where(valid, idx, start)]
                batch = [np.asarray(arrays[k])[take] for k in ("input_ids", "attention_mask", "loss_mask")]
                pending[family].append((valid, self._run(params, *batch)))
        fetched = jax.device_get(pending)  # (a dict pytree comes back with sorted keys)
        out = {}
        for family in families:
            parts = fetched[family]
            joined = {k: np.concatenate([np.asarray(r[k])[valid] for valid, r in parts]) for k in parts[0][1]}
            out[family] = FamilyScores(**joined)
        return out

    def _fused(self, params, probe_set: ProbeSet, families: tuple[str, ...], rows: np.ndarray) -> dict[str, FamilyScores]:
        length = self.trimmed_length(probe_set)
        n, f = len(rows), len(families)
        chunk = min(n, self.batch_size or n)
        pending = []
        for start in range(0, n, chunk):
            idx = np.arange(start, start + chunk)
            valid = idx < n
            take = rows[np.where(valid, idx, start)]
            batch = [np.concatenate([np.asarray(probe_set.arrays[fam][k])[take, :length] for fam in families])
                     for k in ("input_ids", "attention_mask", "loss_mask")]
            pending.append((valid, self._run(params, *batch)))
        fetched = jax.device_get([r for _, r in pending])
        out = {}
        for i, family in enumerate(families):
            joined = {k: np.concatenate([np.asarray(r[k]).reshape(f, chunk)[i][valid]
                                         for (valid, _), r in zip(pending, fetched)]) for k in fetched[0]}
            out[family] = FamilyScores(**joined)
        return out


def score_probes(model, probe_set: ProbeSet, params=None, *, batch_size: int | None = None,
                 per_position: bool = False, families: Sequence[str] | None = None) -> dict[str, FamilyScores]:
    """One-off :class:`ProbeScorer` call: ``{family: FamilyScores}`` for ``model`` at ``params``.

    Builds a new scorer each time (its compiled pass is shared by every scorer of the same model
    structure and shape; a functional ``apply_fn`` compiles once per function object).
    """
    return ProbeScorer(model, batch_size=batch_size, per_position=per_position)(params, probe_set, families)


def preference_diagnostics(
    chosen: FamilyScores,
    rejected: FamilyScores,
    ref_chosen_logps: np.ndarray | None,
    ref_rejected_logps: np.ndarray | None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **loss_kwargs: Any,
) -> dict[str, np.ndarray]:
    """DPO-family quantities of the probe pairs (SPEC §1.3), each (P,).

    Args:
      chosen, rejected: the scores of the two families at the current parameters.
      ref_chosen_logps, ref_rejected_logps: (P,) the reference model's summed log-probs of the
        same responses (``None`` for reference-free ``simpo``).
      loss_type, beta, label_smoothing, loss_kwargs: as the training objective
        (:func:`ldjax.losses.preference_loss`; response lengths are passed, as in training).

    Returns:
      ``margin``: ``d = r⁺ − r⁻`` with ``r± = log π(y±) − log π_ref(y±)`` (for ``simpo``
      ``log π(y⁺) − log π(y⁻)``), in nats; ``loss``: the per-pair loss; ``coef_chosen``,
      ``coef_rejected``: the residual coefficients ``c± = −∂L/∂log π(y±)``
      (:func:`ldjax.losses.residual_coefficients`; sigmoid: ``c⁺ = −c⁻ = β(1−a)``);
      ``G_chosen``, ``G_rejected``: ``‖G±‖_F = |c±| · residual_norm±``, the norm of the
      residual ``c±(π − e_y)`` over every scored position of each response.
    """
    c, r = np.asarray(chosen.logps), np.asarray(rejected.logps)
    kw = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
              chosen_lengths=np.asarray(chosen.lengths), rejected_lengths=np.asarray(rejected.lengths), **loss_kwargs)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        margin = c - r
    else:
        margin = (c - np.asarray(ref_chosen_logps)) - (r - np.asarray(ref_rejected_logps))
    per_pair, _, _ = losses.preference_loss(c, r, ref_chosen_logps, ref_rejected_logps, **kw)
    c_plus, c_minus = losses.residual_coefficients(c, r, ref_chosen_logps, ref_rejected_logps, **kw)
    c_plus, c_minus = np.asarray(c_plus), np.asarray(c_minus)
    return {"margin": margin, "loss": np.asarray(per_pair), "coef_chosen": c_plus, "coef_rejected": c_minus,
            "G_chosen": np.abs(c_plus) * np.asarray(chosen.residual_norm),
            "G_rejected": np.abs(c_minus) * np.asarray(rejected.residual_norm)}
