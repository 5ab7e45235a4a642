"""Preference/SFT loaders, TRL-style truncation, masks and deterministic batching."""
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from ldjax.data.preference import (
    DataFormatError,
    PreferenceExample,
    SFTExample,
    load_preference_jsonl,
    load_sft_jsonl,
    read_preference_jsonl,
    read_sft_jsonl,
    write_preference_jsonl,
    write_sft_jsonl,
)
from ldjax.data.tokenize import (
    PREFERENCE_KEYS,
    TokenizationError,
    batches,
    epoch_permutation,
    num_batches,
    tokenize_preference,
    tokenize_sft,
    truncate,
)

# --------------------------------------------------------------------------------- fixtures

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
WORDS = [f"w{i}" for i in range(40)]
PAD, EOS, UNK, BOS = 0, 1, 2, 3


def word_tokenizer():
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def wid(k):
    """Token id of word ``w{k}``."""
    return len(SPECIALS) + k


def text(*ks):
    return " ".join(f"w{k}" for k in ks)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


HH = {
    "chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
    "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away",
}
UF = {
    "prompt": "Name a colour.",
    "prompt_id": "abc",
    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}
PLAIN = {"prompt": "p", "chosen": "good", "rejected": "bad"}


# ---------------------------------------------------------------------------------- loaders


def test_hh_prompt_is_everything_up_to_the_last_assistant_marker(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [HH, HH])
    (example, _) = load_preference_jsonl(path)
    assert example.prompt == "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert example.chosen == " fine, thanks" and example.rejected == " go away"
    assert example.prompt + example.chosen == HH["chosen"]
    assert read_preference_jsonl(path).format == "hh"


def test_ultrafeedback_response_is_the_final_assistant_message(tmp_path):
    path = write_lines(tmp_path / "uf.jsonl", [UF])
    assert load_preference_jsonl(path) == [PreferenceExample("Name a colour.", "Blue.", "No.")]
    assert read_preference_jsonl(path).format == "ultrafeedback"
    # Without a prompt field, the prompt comes from the messages before the response.
    no_prompt = {k: v for k, v in UF.items() if k != "prompt"}
    path = write_lines(tmp_path / "uf2.jsonl", [no_prompt])
    assert load_preference_jsonl(path)[0].prompt == "Name a colour."
    multi = {
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "no"}],
    }
    path = write_lines(tmp_path / "uf3.jsonl", [multi])
    (example,) = load_preference_jsonl(path)
    assert example.prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert (example.chosen, example.rejected) == ("yes", "no")


def test_plain_round_trip_and_blank_lines(tmp_path):
    examples = [PreferenceExample(f"prompt {i} é", f"yes {i}", f"no {i}") for i in range(5)]
    path = tmp_path / "plain.jsonl"
    write_preference_jsonl(examples, path)
    path.write_text("\n\n" + path.read_text().replace("\n", "\n\n  \n"))
    assert load_preference_jsonl(path) == examples
    assert load_preference_jsonl(path, format="plain") == examples


def test_sft_records_and_round_trip(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "chosen": "d", "rejected": "e"}])
    assert load_sft_jsonl(path) == [SFTExample("a", "b"), SFTExample("c", "d")]
    examples = [SFTExample(f"q{i}", f"r{i}") for i in range(3)]
    write_sft_jsonl(examples, tmp_path / "rt.jsonl")
    assert load_sft_jsonl(tmp_path / "rt.jsonl") == examples


@pytest.mark.parametrize(
    "record, fmt, fragment",
    [
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"}, "hh", "differ"),
        ({"chosen": "\n\nHuman: a b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh", "marker"),
        ({"chosen": "\n\nHuman: a\n\nAssistant:   ", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh", "empty"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "hh", "missing field 'rejected'"),
        ({**UF, "chosen": [{"role": "user", "content": "Name a colour."}]}, "ultrafeedback", "role 'assistant'"),
        ({**UF, "chosen": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "ultrafeedback", "role must be"),
        ({**UF, "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "No."}]}, "ultrafeedback", "differ"),
        ({**UF, "chosen": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "ultrafeedback", "content must be a string"),
        ({**UF, "chosen": "text"}, "ultrafeedback", "list of messages"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "plain", "empty"),
        ({"prompt": "p", "chosen": 5, "rejected": "b"}, "plain", "must be a string"),
        ({"prompt": "p", "chosen": "a"}, "plain", "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "\ud800", "rejected": "b"}, "plain", "Unicode"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, record, fmt, fragment):
    path = write_lines(tmp_path / "bad.jsonl", [PLAIN if fmt == "plain" else (HH if fmt == "hh" else UF), record])
    with pytest.raises(DataFormatError, match=fragment) as info:
        load_preference_jsonl(path, format=fmt)
    assert info.value.line == 2 and info.value.path == str(path)
    assert f"{path}:2:" in str(info.value)


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "cho', 2, "truncated last line"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n[1, 2]\n', 3, "must be a JSON object"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n', 2, "not UTF-8"),
        (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json}\n', 2, "invalid JSON"),
        (b'{"weird": 1}\n', 1, "cannot tell the record format"),
    ],
)
def test_unreadable_lines(tmp_path, content, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=fragment) as info:
        load_preference_jsonl(path)
    assert info.value.line == line


def test_empty_file_and_bad_arguments(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n")
    with pytest.raises(DataFormatError, match="no valid"):
        load_preference_jsonl(path)
    with pytest.raises(ValueError, match="format"):
        load_preference_jsonl(path, format="csv")
    with pytest.raises(ValueError, match="on_error"):
        load_preference_jsonl(path, on_error="ignore")


def test_skip_policy_counts_logs_and_returns_every_skipped_record(tmp_path, caplog):
    lines = [PLAIN, {"prompt": "p", "chosen": ""}, "not json", PLAIN, [1], PLAIN]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(DataFormatError):
        load_preference_jsonl(path)
    with caplog.at_level(logging.WARNING, logger="ldjax.data.preference"):
        result = read_preference_jsonl(path, on_error="skip")
    assert len(result.examples) == 3
    assert [e.line for e in result.skipped] == [2, 3, 5]
    assert "skipped 3 malformed preference record(s) of 6" in caplog.text
    sft = read_sft_jsonl(write_lines(tmp_path / "sft.jsonl", [{"prompt": "a"}, {"prompt": "a", "response": "b"}]), on_error="skip")
    assert len(sft.examples) == 1 and [e.line for e in sft.skipped] == [1]


# ---------------------------------------------------------------------------- truncation


def test_truncation_hand_computed_cases():
    prompt, responses = list(range(10)), [[100, 101, 102], [200, 201, 202, 203, 204]]
    # Fits: untouched.
    assert truncate(prompt, responses, max_length=15, max_prompt_length=4) == (prompt, responses)
    # 10 + 5 > 14: prompt cut to its last 4 (keep_end), responses fit afterwards.
    assert truncate(prompt, responses, max_length=14, max_prompt_length=4) == ([6, 7, 8, 9], responses)
    assert truncate(prompt, responses, max_length=14, max_prompt_length=4, truncation_mode="keep_start") == (
        [0, 1, 2, 3], responses)
    # 4 + 5 > 7 even after the prompt cut: each response cut to 7 - 4 = 3 tokens.
    assert truncate(prompt, responses, max_length=7, max_prompt_length=4) == (
        [6, 7, 8, 9], [[100, 101, 102], [200, 201, 202]])
    # A prompt already shorter than max_prompt_length is not cut; TRL cuts the responses to
    # max_length - max_prompt_length = 4 - 3 = 1 token whatever the prompt's length ...
    assert truncate([1, 2], [[5, 6, 7, 8]], max_length=4, max_prompt_length=3) == ([1, 2], [[5]])
    # ... while "fill" uses the room the short prompt left: 4 - 2 = 2 tokens.
    assert truncate([1, 2], [[5, 6, 7, 8]], max_length=4, max_prompt_length=3, response_truncation="fill") == (
        [1, 2], [[5, 6]])
    # Both responses are cut once the longer one overflows, even one that fits alone (TRL).
    assert truncate([1, 2], [[5, 6, 7, 8], [9]], max_length=5, max_prompt_length=3) == ([1, 2], [[5, 6], [9]])
    assert truncate([1, 2], [[5, 6, 7, 8], [9, 10, 11]], max_length=5, max_prompt_length=3) == (
        [1, 2], [[5, 6], [9, 10]])
    with pytest.raises(TokenizationError, match="max_prompt_length"):
        truncate(prompt, responses, max_length=4, max_prompt_length=4)
    with pytest.raises(TokenizationError, match="truncation_mode"):
        truncate(prompt, responses, max_length=8, max_prompt_length=4, truncation_mode="middle")
    with pytest.raises(TokenizationError, match="response_truncation"):
        truncate(prompt, responses, max_length=8, max_prompt_length=4, response_truncation="tight")


def _tokenize_row_truncation(prompt, chosen, rejected, *, max_length, max_prompt_length, truncation_mode):
    """TRL 0.9-0.12 ``DPOTrainer.tokenize_row``'s two truncation steps, transcribed as written."""
    longer_response_length = max(len(chosen), len(rejected))
    if len(prompt) + longer_response_length > max_length:
        if truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif truncation_mode == "keep_end":
            prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer_response_length > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    return prompt, [chosen, rejected]


@settings(max_examples=60, deadline=None)
@given(
    prompt_len=st.integers(1, 30), chosen_len=st.integers(1, 30), rejected_len=st.integers(1, 30),
    max_length=st.integers(3, 50), data=st.data(),
)
def test_truncation_invariants(prompt_len, chosen_len, rejected_len, max_length, data):
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    mode = data.draw(st.sampled_from(["keep_end", "keep_start"]))
    prompt = list(range(prompt_len))
    responses = [list(range(100, 100 + chosen_len)), list(range(200, 200 + rejected_len))]
    new_prompt, (chosen, rejected) = truncate(
        prompt, responses, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
    for response, original in [(chosen, responses[0]), (rejected, responses[1])]:
        assert len(new_prompt) + len(response) <= max_length
        assert response == original[: len(response)]  # responses keep their start
    # The prompt is a contiguous end (keep_end) or start (keep_start) piece, cut only if needed.
    expected_end = prompt[-len(new_prompt):] if mode == "keep_end" else prompt[: len(new_prompt)]
    assert new_prompt == expected_end
    if prompt_len + max(chosen_len, rejected_len) <= max_length:
        assert new_prompt == prompt and [chosen, rejected] == responses
    elif prompt_len > max_prompt_length:
        assert len(new_prompt) == max_prompt_length
    # The default is exactly TRL's rule; "fill" differs from it only in the response budget.
    assert (new_prompt, [chosen, rejected]) == _tokenize_row_truncation(
        prompt, *responses, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
    fill_prompt, fill = truncate(prompt, responses, max_length=max_length, max_prompt_length=max_prompt_length,
                                 truncation_mode=mode, response_truncation="fill")
    assert fill_prompt == new_prompt
    for kept, longer, original in zip([chosen, rejected], fill, responses):
        assert kept == longer[: len(kept)]
        assert len(new_prompt) + len(longer) <= max_length
        assert len(longer) == min(len(original), max_length - len(new_prompt))


# ------------------------------------------------------------------------ token arrays


def test_tokenize_preference_layout_and_loss_mask_exactness():
    tokenizer = word_tokenizer()
    examples = [
        PreferenceExample(text(1, 2, 3), text(4, 5), text(6)),
        PreferenceExample(text(7), text(8, 9, 10, 11), text(12, 13)),
    ]
    out = tokenize_preference(examples, tokenizer, max_length=32, max_prompt_length=16)
    assert set(out) == set(PREFERENCE_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (2, 6) for v in out.values())
    np.testing.assert_array_equal(out["chosen_input_ids"], [
        [wid(1), wid(2), wid(3), wid(4), wid(5), EOS],
        [wid(7), wid(8), wid(9), wid(10), wid(11), EOS]])
    np.testing.assert_array_equal(out["chosen_loss_mask"], [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out["chosen_attention_mask"], [[1] * 6, [1] * 6])
    np.testing.assert_array_equal(out["rejected_input_ids"], [
        [wid(1), wid(2), wid(3), wid(6), EOS, PAD],
        [wid(7), wid(12), wid(13), EOS, PAD, PAD]])
    np.testing.assert_array_equal(out["rejected_loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["rejected_attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    padded = tokenize_preference(examples, tokenizer, max_length=9, max_prompt_length=4, pad_to_max_length=True)
    assert padded["chosen_input_ids"].shape == (2, 9)
    np.testing.assert_array_equal(padded["chosen_loss_mask"][:, :6], out["chosen_loss_mask"])


def test_tokenize_applies_trl_truncation_with_eos_counted():
    tokenizer = word_tokenizer()
    example = PreferenceExample(text(*range(6)), text(20, 21, 22), text(30))
    out = tokenize_preference([example], tokenizer, max_length=6, max_prompt_length=3)
    # chosen = 3 words + EOS = 4 tokens; 6 + 4 > 6: prompt -> last 3 words, chosen -> 6 - 3 = 3 tokens (EOS cut).
    np.testing.assert_array_equal(out["chosen_input_ids"][0], [wid(3), wid(4), wid(5), wid(20), wid(21), wid(22)])
    np.testing.assert_array_equal(out["rejected_input_ids"][0], [wid(3), wid(4), wid(5), wid(30), EOS, PAD])
    np.testing.assert_array_equal(out["chosen_loss_mask"][0], [0, 0, 0, 1, 1, 1])
    start = tokenize_preference([example], tokenizer, max_length=6, max_prompt_length=3, truncation_mode="keep_start")
    np.testing.assert_array_equal(start["chosen_input_ids"][0, :3], [wid(0), wid(1), wid(2)])
    # BOS survives a keep_end cut of the prompt.
    bos = tokenize_preference([example], tokenizer, max_length=6, max_prompt_length=3, bos_id=BOS)
    np.testing.assert_array_equal(bos["chosen_input_ids"][0], [BOS, wid(4), wid(5), wid(20), wid(21), wid(22)])
    # A short prompt: TRL still cuts the responses to 6 - 3 = 3 tokens; "fill" to 6 - 1 = 5.
    short = PreferenceExample(text(9), text(*range(20, 26)), text(30))
    out = tokenize_preference([short], tokenizer, max_length=6, max_prompt_length=3)
    np.testing.assert_array_equal(out["chosen_input_ids"][0], [wid(9), wid(20), wid(21), wid(22)])
    np.testing.assert_array_equal(out["rejected_input_ids"][0], [wid(9), wid(30), EOS, PAD])
    fill = tokenize_sft([short], tokenizer, max_length=6, max_prompt_length=3, response_truncation="fill")
    np.testing.assert_array_equal(fill["input_ids"][0], [wid(9), wid(20), wid(21), wid(22), wid(23), wid(24)])
    np.testing.assert_array_equal(fill["loss_mask"][0], [0, 1, 1, 1, 1, 1])


def test_tokenize_sft_plain_keys_and_empty_prompt_rules():
    tokenizer = word_tokenizer()
    out = tokenize_sft([SFTExample(text(1), text(2, 3)), PreferenceExample(text(4, 5), text(6), text(7))],
                       tokenizer, max_length=8, max_prompt_length=4, add_eos=False)
    assert set(out) == {"input_ids", "attention_mask", "loss_mask"}
    np.testing.assert_array_equal(out["input_ids"], [[wid(1), wid(2), wid(3)], [wid(4), wid(5), wid(6)]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1], [0, 0, 1]])
    with pytest.raises(TokenizationError, match="example 1: the prompt has no token"):
        tokenize_sft([SFTExample(text(1), text(2)), SFTExample("", text(2))], tokenizer, max_length=8, max_prompt_length=4)
    out = tokenize_sft([SFTExample("", text(2))], tokenizer, max_length=8, max_prompt_length=4, bos_id=BOS)
    np.testing.assert_array_equal(out["input_ids"][0], [BOS, wid(2), EOS])
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 1, 1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 39), min_size=1, max_size=8),
                          st.lists(st.integers(0, 39), min_size=1, max_size=8),
                          st.lists(st.integers(0, 39), min_size=1, max_size=8)), min_size=1, max_size=5))
def test_loss_mask_marks_exactly_the_response_tokens(triples):
    """Property: unpadding each row recovers prompt + response + EOS, scored exactly on response + EOS."""
    tokenizer = word_tokenizer()
    examples = [PreferenceExample(text(*p), text(*c), text(*r)) for p, c, r in triples]
    out = tokenize_preference(examples, tokenizer, max_length=64, max_prompt_length=32)
    for side, index in (("chosen", 1), ("rejected", 2)):
        ids, attn, loss = (out[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
        assert not loss[:, 0].any()
        assert ((loss == 1) <= (attn == 1)).all()
        for b, triple in enumerate(triples):
            n = int(attn[b].sum())
            assert attn[b, :n].all() and not attn[b, n:].any()  # right padding
            assert (ids[b, n:] == PAD).all()
            expected = [wid(k) for k in triple[0]] + [wid(k) for k in triple[index]] + [EOS]
            assert ids[b, :n].tolist() == expected
            assert loss[b].tolist() == [0] * len(triple[0]) + [1] * (len(triple[index]) + 1) + [0] * (ids.shape[1] - n)


def test_vocabulary_and_empty_response_errors(caplog):
    tokenizer = word_tokenizer()
    examples = [PreferenceExample(text(1), text(2), text(3)), PreferenceExample(text(1), text(39), text(3))]
    with pytest.raises(TokenizationError, match=r"example 1: response 0 has token id 43 outside the model vocabulary \[0, 40\)"):
        tokenize_preference(examples, tokenizer, max_length=8, max_prompt_length=4, vocab_size=40)
    # Truncation always leaves a response >= 1 token (max_prompt_length < max_length), so an
    # empty response can only come from an empty text without EOS.
    no_token = [PreferenceExample(text(1), "", text(3)), PreferenceExample(text(1), text(2), text(3))]
    with pytest.raises(TokenizationError, match="example 0: a response has no token left"):
        tokenize_preference(no_token, tokenizer, max_length=8, max_prompt_length=4, add_eos=False)
    with caplog.at_level(logging.WARNING, logger="ldjax.data.tokenize"):
        out = tokenize_preference(no_token, tokenizer, max_length=8, max_prompt_length=4, add_eos=False,
                                  on_empty="drop")
    assert out["chosen_input_ids"].shape[0] == 1 and "dropped 1 of 2" in caplog.text
    np.testing.assert_array_equal(out["chosen_input_ids"][0], [wid(1), wid(2)])
    with pytest.raises(TokenizationError, match="pad_id"):
        tokenize_preference(examples[:1], tokenizer, max_length=8, max_prompt_length=4, vocab_size=40, pad_id=40)


# ------------------------------------------------------------------------------ batches


def test_batches_are_deterministic_resumable_and_cover_the_epoch():
    arrays = {"x": np.arange(23, dtype=np.int32), "y": np.arange(23, dtype=np.int32) * 10}
    first = list(batches(arrays, 5, seed=3, epoch=1))
    again = list(batches(arrays, 5, seed=3, epoch=1))
    assert len(first) == num_batches(23, 5) == 4
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x"], b["x"])
    for batch in first:
        np.testing.assert_array_equal(batch["y"], batch["x"] * 10)  # rows stay aligned across keys
    resumed = list(batches(arrays, 5, seed=3, epoch=1, start=2))
    for a, b in zip(first[2:], resumed):
        np.testing.assert_array_equal(a["x"], b["x"])
    full = list(batches(arrays, 5, seed=3, epoch=1, drop_last=False))
    assert len(full) == 5 and len(full[-1]["x"]) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate([b["x"] for b in full])), np.arange(23))
    other_epoch = np.concatenate([b["x"] for b in batches(arrays, 5, seed=3, epoch=2, drop_last=False)])
    assert not np.array_equal(other_epoch, np.concatenate([b["x"] for b in full]))
    np.testing.assert_array_equal(epoch_permutation(23, seed=3, epoch=1)[:5], first[0]["x"])


def test_batches_bad_input():
    with pytest.raises(ValueError, match="share their first axis"):
        next(batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0, epoch=0))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches({"a": np.zeros(3)}, 0, seed=0, epoch=0))
    with pytest.raises(ValueError, match="start"):
        next(batches({"a": np.zeros(3)}, 1, seed=0, epoch=0, start=5))
