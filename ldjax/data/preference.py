"""Preference and SFT examples read from JSON-lines files.

Three preference record formats are understood (SPEC §3, "Data formats"):

- ``"hh"`` — Anthropic-HH: ``{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": …}``.
  The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` of each
  side; both sides must give the same prompt.
- ``"ultrafeedback"`` — UltraFeedback-binarized: ``chosen`` / ``rejected`` are lists of
  ``{"role", "content"}`` messages whose last one is the assistant's response; the prompt
  is the ``prompt`` field if present, otherwise the messages before the response.
- ``"plain"`` — ``{"prompt": str, "chosen": str, "rejected": str}``.

``format="auto"`` decides once per file, from its first record.

SFT records are ``{"prompt", "response"}`` or ``{"prompt", "chosen"}`` (extra keys ignored).

Every malformed record raises :class:`DataFormatError` naming the file and the 1-based line.
With ``on_error="skip"`` malformed records are left out instead, and how many were left out
(with the reasons) is logged and returned by :func:`read_preference_jsonl` /
:func:`read_sft_jsonl`: nothing disappears silently.

The tokenisation and batching half lives in :mod:`ldjax.data.tokenize` and is re-exported here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Literal, Sequence

from ldjax.data.tokenize import (  # noqa: F401  (re-exported: the documented data API)
    PREFERENCE_KEYS,
    SFT_KEYS,
    TokenizationError,
    batches,
    num_batches,
    tokenize_preference,
    tokenize_sft,
)

logger = logging.getLogger(__name__)

HH_ASSISTANT_MARKER = "\n\nAssistant:"
HH_HUMAN_MARKER = "\n\nHuman:"
PREFERENCE_FORMATS = ("hh", "ultrafeedback", "plain")
MESSAGE_ROLES = ("system", "user", "assistant")

Format = Literal["auto", "hh", "ultrafeedback", "plain"]
OnError = Literal["raise", "skip"]


class DataFormatError(ValueError):
    """A record of a data file is malformed.

    Attributes:
      path: the file (``None`` for in-memory records).
      line: 1-based line number in that file (``None`` when the whole file is at fault).
      reason: what is wrong, without the location.
    """

    def __init__(self, reason: str, *, path: str | os.PathLike | None = None, line: int | None = None):
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        self.line = line
        where = self.path if self.path is not None else "<records>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: a prompt and two responses, the first preferred."""

    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One supervised example: a prompt and the response to learn."""

    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a reader found in one file.

    Attributes:
      examples: the well-formed records, in file order.
      skipped: one :class:`DataFormatError` per record left out (only with ``on_error="skip"``).
      format: the record format used (the detected one for ``format="auto"``).
    """

    examples: list
    skipped: list[DataFormatError]
    format: str


# --------------------------------------------------------------------------------------------
# Field validation. Each raises a plain ``ValueError`` message; the line reader adds the place.


class _RecordError(Exception):
    """Internal: a record is malformed; the reader turns it into a located DataFormatError."""


def _require_text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise _RecordError(f"missing field {key!r} (fields present: {sorted(record)[:10]})")
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    _require_encodable(value, key)
    if not allow_empty and not value.strip():
        raise _RecordError(f"field {key!r} is empty")
    return value


def _require_encodable(text: str, what: str) -> None:
    # JSON may carry lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RecordError(f"{what} is not valid Unicode text ({err.reason})") from None


def _require_nonempty_response(text: str, what: str) -> str:
    if not text.strip():
        raise _RecordError(f"{what} response is empty")
    return text


def _split_hh(text: str, side: str) -> tuple[str, str]:
    cut = text.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        raise _RecordError(f"{side!r} has no {HH_ASSISTANT_MARKER!r} marker")
    cut += len(HH_ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def parse_hh_record(record: dict) -> PreferenceExample:
    """Anthropic-HH record -> example (prompt up to and including the last assistant marker)."""
    chosen = _require_text(record, "chosen")
    rejected = _require_text(record, "rejected")
    prompt, chosen_response = _split_hh(chosen, "chosen")
    rejected_prompt, rejected_response = _split_hh(rejected, "rejected")
    if prompt != rejected_prompt:
        raise _RecordError(
            "chosen and rejected dialogues differ before their last assistant turn "
            f"(prompt lengths {len(prompt)} and {len(rejected_prompt)} characters)"
        )
    return PreferenceExample(
        prompt,
        _require_nonempty_response(chosen_response, "chosen"),
        _require_nonempty_response(rejected_response, "rejected"),
    )


def _require_messages(record: dict, key: str) -> list[dict]:
    if key not in record:
        raise _RecordError(f"missing field {key!r}")
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise _RecordError(f"field {key!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RecordError(f"{key}[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise _RecordError(f"{key}[{i}].role must be one of {MESSAGE_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise _RecordError(f"{key}[{i}].content must be a string, got {type(content).__name__}")
        _require_encodable(content, f"{key}[{i}].content")
    if messages[-1]["role"] != "assistant":
        raise _RecordError(f"the last message of {key!r} must have role 'assistant', got {messages[-1]['role']!r}")
    return messages


def render_messages(messages: Sequence[dict]) -> str:
    """Prompt text for the messages before a response.

    A single user message is its content (as in UltraFeedback's ``prompt`` field); longer
    conversations are written in the Anthropic-HH layout ending with the assistant marker.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"system": "\n\nSystem:", "user": HH_HUMAN_MARKER, "assistant": HH_ASSISTANT_MARKER}
    return "".join(f"{names[m['role']]} {m['content']}" for m in messages) + HH_ASSISTANT_MARKER


def parse_ultrafeedback_record(record: dict) -> PreferenceExample:
    """UltraFeedback-binarized record -> example (response = the final assistant message)."""
    chosen = _require_messages(record, "chosen")
    rejected = _require_messages(record, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _RecordError("chosen and rejected conversations differ before their final assistant message")
    if "prompt" in record:
        prompt = _require_text(record, "prompt")
    else:
        if len(chosen) < 2 or not any(m["role"] == "user" for m in chosen[:-1]):
            raise _RecordError("no 'prompt' field and no user message before the response")
        prompt = render_messages(chosen[:-1])
    return PreferenceExample(
        prompt,
        _require_nonempty_response(chosen[-1]["content"], "chosen"),
        _require_nonempty_response(rejected[-1]["content"], "rejected"),
    )


def parse_plain_record(record: dict) -> PreferenceExample:
    """``{"prompt", "chosen", "rejected"}`` record -> example."""
    return PreferenceExample(
        _require_text(record, "prompt", allow_empty=True),
        _require_text(record, "chosen"),
        _require_text(record, "rejected"),
    )


def parse_sft_record(record: dict) -> SFTExample:
    """``{"prompt", "response"}`` or ``{"prompt", "chosen"}`` record -> example."""
    prompt = _require_text(record, "prompt", allow_empty=True)
    key = "response" if "response" in record else "chosen"
    if key not in record:
        raise _RecordError(f"missing field 'response' (or 'chosen'); fields present: {sorted(record)[:10]}")
    return SFTExample(prompt, _require_text(record, key))


_PREFERENCE_PARSERS: dict[str, Callable[[dict], PreferenceExample]] = {
    "hh": parse_hh_record,
    "ultrafeedback": parse_ultrafeedback_record,
    "plain": parse_plain_record,
}


def detect_format(record: dict) -> str:
    """The preference format a record is written in: ``"hh"``, ``"ultrafeedback"`` or ``"plain"``."""
    chosen = record.get("chosen")
    if isinstance(chosen, list):
        return "ultrafeedback"
    if "prompt" in record:
        return "plain"
    if isinstance(chosen, str) and HH_ASSISTANT_MARKER in chosen:
        return "hh"
    raise _RecordError(
        "cannot tell the record format: expected 'chosen' as a message list (ultrafeedback), "
        "a 'prompt' field (plain) or an Anthropic-HH dialogue with '\\n\\nAssistant:'"
    )


# --------------------------------------------------------------------------------------------
# The line reader.


def _iter_records(path: str | os.PathLike):
    """Yields (line_number, record dict); raises DataFormatError for unreadable lines."""
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    last_unterminated = not data.endswith(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, DataFormatError(f"line is not UTF-8 (byte {err.start}: {err.reason})", path=path, line=number)
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            hint = " (truncated last line?)" if is_last and last_unterminated else ""
            yield number, DataFormatError(f"invalid JSON{hint}: {err}", path=path, line=number)
            continue
        if not isinstance(record, dict):
            yield number, DataFormatError(
                f"a record must be a JSON object, got {type(record).__name__}", path=path, line=number
            )
            continue
        yield number, record


def _read(path, parse_for: Callable[[dict], Callable[[dict], Any]], on_error: OnError, what: str):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    examples, skipped = [], []
    parse = None
    for number, record in _iter_records(path):
        try:
            if isinstance(record, DataFormatError):
                raise record
            if parse is None:
                parse = parse_for(record)
            examples.append(parse(record))
        except _RecordError as err:
            error = DataFormatError(str(err), path=path, line=number)
            if on_error == "raise":
                raise error from None
            skipped.append(error)
        except DataFormatError as error:
            if on_error == "raise":
                raise
            skipped.append(error)
    if skipped:
        logger.warning(
            "%s: skipped %d malformed %s record(s) of %d; first: %s",
            os.fspath(path), len(skipped), what, len(skipped) + len(examples), skipped[0],
        )
    if not examples:
        raise DataFormatError(f"no valid {what} records in the file", path=path)
    return examples, skipped


def read_preference_jsonl(
    path: str | os.PathLike, format: Format = "auto", *, on_error: OnError = "raise"
) -> LoadResult:
    """Reads preference pairs from a JSON-lines file, reporting what was skipped.

    Args:
      path: the ``.jsonl`` file; blank lines are ignored.
      format: ``"hh"``, ``"ultrafeedback"``, ``"plain"`` or ``"auto"`` (decided from the first
        well-formed record of the file; later records must follow the same format).
      on_error: ``"raise"`` stops at the first malformed record; ``"skip"`` leaves malformed
        records out, logs their count and returns them in ``LoadResult.skipped``.

    Raises:
      DataFormatError: a malformed record (with ``on_error="raise"``), or no valid record.
    """
    if format != "auto" and format not in PREFERENCE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {PREFERENCE_FORMATS}, got {format!r}")
    chosen_format: list[str] = []

    def parse_for(record: dict):
        name = detect_format(record) if format == "auto" else format
        chosen_format.append(name)
        return _PREFERENCE_PARSERS[name]

    examples, skipped = _read(path, parse_for, on_error, "preference")
    return LoadResult(examples, skipped, chosen_format[0])


def load_preference_jsonl(
    path: str | os.PathLike, format: Format = "auto", *, on_error: OnError = "raise"
) -> list[PreferenceExample]:
    """The :class:`PreferenceExample` list of a JSON-lines file (see :func:`read_preference_jsonl`)."""
    return read_preference_jsonl(path, format, on_error=on_error).examples


def read_sft_jsonl(path: str | os.PathLike, *, on_error: OnError = "raise") -> LoadResult:
    """Reads ``{"prompt", "response"|"chosen"}`` records; see :func:`read_preference_jsonl`."""
    examples, skipped = _read(path, lambda record: parse_sft_record, on_error, "SFT")
    return LoadResult(examples, skipped, "sft")


def load_sft_jsonl(path: str | os.PathLike, *, on_error: OnError = "raise") -> list[SFTExample]:
    """The :class:`SFTExample` list of a JSON-lines file."""
    return read_sft_jsonl(path, on_error=on_error).examples


def write_preference_jsonl(examples: Sequence[PreferenceExample], path: str | os.PathLike) -> None:
    """Writes examples as plain ``{"prompt", "chosen", "rejected"}`` JSON lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(dataclasses.asdict(example), ensure_ascii=False) + "\n")


def write_sft_jsonl(examples: Sequence[SFTExample], path: str | os.PathLike) -> None:
    """Writes examples as ``{"prompt", "response"}`` JSON lines."""
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(dataclasses.asdict(example), ensure_ascii=False) + "\n")
