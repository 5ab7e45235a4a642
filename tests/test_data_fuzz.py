"""Fuzz: malformed JSONL into every loader gives success or DataFormatError, nothing else."""
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldjax.data.preference import (
    DataFormatError,
    PreferenceExample,
    SFTExample,
    read_preference_jsonl,
    read_sft_jsonl,
)

LOADERS = {
    "preference-auto": lambda path, on_error: read_preference_jsonl(path, "auto", on_error=on_error),
    "hh": lambda path, on_error: read_preference_jsonl(path, "hh", on_error=on_error),
    "ultrafeedback": lambda path, on_error: read_preference_jsonl(path, "ultrafeedback", on_error=on_error),
    "plain": lambda path, on_error: read_preference_jsonl(path, "plain", on_error=on_error),
    "sft": lambda path, on_error: read_sft_jsonl(path, on_error=on_error),
}

# JSON values of any type, with the keys the loaders look at over-represented.
KEYS = st.sampled_from(["prompt", "chosen", "rejected", "response", "role", "content", "x", ""])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["\n\nHuman: hi\n\nAssistant: yo", "user", "assistant", "\ud800", "  "]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 1]),
                                 "content": st.one_of(st.text(max_size=8), st.integers())})
NEAR_VALID = st.one_of(
    st.fixed_dictionaries({"prompt": SCALARS, "chosen": SCALARS, "rejected": SCALARS}),
    st.fixed_dictionaries({"chosen": st.lists(MESSAGE, max_size=3), "rejected": st.lists(MESSAGE, max_size=3)},
                          optional={"prompt": SCALARS}),
    st.fixed_dictionaries({"chosen": SCALARS, "rejected": SCALARS}),
    st.fixed_dictionaries({"prompt": SCALARS}, optional={"response": SCALARS, "chosen": SCALARS}),
)


def _line(value) -> bytes:
    return json.dumps(value).encode()


LINES = st.one_of(
    NEAR_VALID.map(_line),
    JSON_VALUES.map(_line),
    st.binary(max_size=40),                                   # random bytes, non-UTF-8 included
    NEAR_VALID.map(_line).map(lambda b: b[: max(1, len(b) // 2)]),  # truncated records
    st.just(b"[" * 5000),                                     # deep nesting
    st.just(b""),
)
FILES = st.tuples(st.lists(LINES, max_size=6), st.booleans()).map(
    lambda parts: b"\n".join(parts[0]) + (b"\n" if parts[1] else b"")
)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield directory


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=FILES, loader=st.sampled_from(sorted(LOADERS)), on_error=st.sampled_from(["raise", "skip"]))
def test_only_documented_errors(scratch, content, loader, on_error):
    path = os.path.join(scratch, "fuzz.jsonl")
    with open(path, "wb") as handle:
        handle.write(content)
    try:
        result = LOADERS[loader](path, on_error)
    except DataFormatError as error:
        assert error.path == path
        assert str(error).startswith(path)
        assert error.line is None or 1 <= error.line <= content.count(b"\n") + 1
        return
    # Success: every example is well formed, and nothing vanished without a count.
    kind = SFTExample if loader == "sft" else PreferenceExample
    for example in result.examples:
        assert isinstance(example, kind)
        fields = [example.prompt, example.response] if loader == "sft" else [example.prompt, example.chosen, example.rejected]
        assert all(isinstance(f, str) for f in fields) and all(f.strip() for f in fields[1:])
    records = sum(1 for line in content.split(b"\n") if line.strip())
    assert len(result.examples) + len(result.skipped) == records
    if on_error == "raise":
        assert not result.skipped
