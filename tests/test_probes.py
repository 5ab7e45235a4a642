"""Probe sets (SPEC §3): every family from the world and from JSONL files; scores against hand computations."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from ldjax import losses, probes
from ldjax.data.preference import DataFormatError, PreferenceExample
from ldjax.data.tokenize import TokenizationError
from ldjax.data.world import PROBE_FAMILIES, WorldConfig, build_tokenizer, build_world
from ldjax.models.functional import functional
from ldjax.models.transformer import CausalLM, TransformerConfig

WORLD = WorldConfig(seed=3, num_entities=10, num_train=12, num_test=5, num_probe=6, num_pretrain_answers=8,
                    num_pretrain_narrative=4, shakespeare_fraction=0.0)
OPTIONAL = ("chosen_rephrase", "rejected_rephrase", "chosen_format", "rejected_format")


@pytest.fixture(scope="module")
def world():
    return build_world(WORLD)


# ------------------------------------------------------------------------------ world


def test_world_probe_texts_are_the_world_probes(world):
    texts = probes.probe_texts_from_world(world)
    assert texts.families == PROBE_FAMILIES and not texts.omitted and texts.origin == "world"
    assert texts.prompts == tuple(e.prompt for e in world.probe_examples("chosen"))
    assert texts.train_indices == tuple(p.train_index for p in world.probes)
    for family in PROBE_FAMILIES:
        assert texts.responses[family] == tuple(e.response for e in world.probe_examples(family))
    first = probes.probe_texts_from_world(world, 4)
    assert first.prompts == texts.prompts[:4] and first.responses["other_test"] == texts.responses["other_test"][:4]
    with pytest.raises(ValueError, match="num_probe"):
        probes.probe_texts_from_world(world, 7)


def test_probe_count_leaves_the_world_data_unchanged():
    # The CLI builds the world with num_probe = --track-prompts: training data must not move.
    a, b = build_world(WORLD), build_world(dataclasses.replace(WORLD, num_probe=11))
    assert (a.train, a.test, a.pretrain_texts) == (b.train, b.test, b.pretrain_texts)


# ------------------------------------------------------------------------------ files


def hh(prompt_words, response):
    return f"\n\nHuman: {prompt_words}\n\nAssistant: {response}"


def hh_rows(n, *, extras=(), dialogue_extras=False):
    rows = []
    for i in range(n):
        q = f"tell me fact {i} about the sea ?"
        row = {"chosen": hh(q, f"the sea holds fish number {i} and salt ."),
               "rejected": hh(q, f"no {i} .")}
        for key in extras:
            text = f"{key.replace('_', ' ')} answer {i} here ."
            row[key] = hh(q, text) if dialogue_extras else text
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_file_families(texts, train, held):
    """Every family's defining property, for texts built from a file."""
    chosen = [train[u].example.chosen for u in texts.train_indices]
    assert list(texts.responses["chosen"]) == chosen
    assert list(texts.responses["rejected"]) == [train[u].example.rejected for u in texts.train_indices]
    for p, u in enumerate(texts.train_indices):
        j = texts.sources["other_train"][p]
        assert j != u and texts.responses["other_train"][p] == train[j].example.chosen
        k = texts.sources["shuffled_other"][p]
        assert k not in (u, j) and sorted(texts.responses["shuffled_other"][p].split()) == sorted(train[k].example.chosen.split())
        assert sorted(texts.responses["shuffled_chosen"][p].split()) == sorted(chosen[p].split())
        assert texts.responses["shuffled_chosen"][p] != chosen[p]
        t = texts.sources["other_test"][p]
        assert texts.responses["other_test"][p] == held[t].example.chosen
        assert held[t].example not in {r.example for r in train}
        s = texts.sources["random_sentence"][p]
        assert s != t and texts.responses["random_sentence"][p] == held[s].example.rejected


@pytest.mark.parametrize("dialogue_extras", [False, True])
def test_hh_file_with_optional_fields_gives_every_family(tmp_path, dialogue_extras):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(20, extras=OPTIONAL, dialogue_extras=dialogue_extras))
    records = probes.read_probe_records(path)
    assert [r.line for r in records] == list(range(1, 21))
    texts = probes.probe_texts_from_jsonl(path, num_prompts=5, seed=1)
    assert texts.families == PROBE_FAMILIES and not texts.omitted
    train, held = records[:18], records[18:]  # the last 10 % held out, as the CLI
    check_file_families(texts, train, held)
    for key in OPTIONAL:
        # The response only (a dialogue's prompt part is stripped), with HH's leading space.
        assert list(texts.responses[key]) == [train[u].extras[key] for u in texts.train_indices]
        assert all(r.strip() == f"{key.replace('_', ' ')} answer {u} here ." for r, u in
                   zip(texts.responses[key], texts.train_indices))
    assert texts.responses["chosen"][0].startswith(" the sea")  # HH keeps the space after the marker
    # Deterministic in the seed.
    assert probes.probe_texts_from_jsonl(path, num_prompts=5, seed=1) == texts
    assert probes.probe_texts_from_jsonl(path, num_prompts=5, seed=2) != texts


def test_hh_file_without_optional_fields_omits_and_lists_them(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(30))
    texts = probes.probe_texts_from_jsonl(path, num_prompts=8)
    assert set(texts.omitted) == set(OPTIONAL)
    assert all("no probe record has the optional field" in why for why in texts.omitted.values())
    assert texts.families == tuple(f for f in PROBE_FAMILIES if f not in OPTIONAL)
    records = probes.read_probe_records(path)
    check_file_families(texts, records[:27], records[27:])


def test_families_a_file_cannot_give_are_omitted_not_faked():
    train = [PreferenceExample(f"q {i}", f"yes {i} indeed", f"no {i}") for i in range(3)]
    # The only "held-out" example is a training one: not held out.
    texts = probes.probe_texts_from_records(train, train[:1], num_prompts=2)
    assert {"other_test", "random_sentence"} <= set(texts.omitted)
    assert "other_train" in texts.families and "other_test" not in texts.responses
    single = probes.probe_texts_from_records(train[:1], [], num_prompts=1)
    assert set(single.families) == {"chosen", "rejected", "shuffled_chosen"}
    assert "single record" in single.omitted["other_train"] and "single record" in single.omitted["shuffled_other"]
    with pytest.raises(ValueError, match=r"num_prompts must be in \[1, 3\]"):
        probes.probe_texts_from_records(train, [], num_prompts=4)


def test_plain_and_ultrafeedback_optional_fields(tmp_path):
    plain = [{"prompt": f"p {i}", "chosen": f"c {i} x", "rejected": f"r {i}", "chosen_rephrase": f"cc {i}"}
             for i in range(4)]
    texts = probes.probe_texts_from_records(probes.read_probe_records(write_jsonl(tmp_path / "p.jsonl", plain)), [],
                                            num_prompts=4)
    assert texts.responses["chosen_rephrase"] == tuple(f"cc {i}" for i in range(4))
    assert set(texts.omitted) == {"rejected_rephrase", "chosen_format", "rejected_format", "other_test",
                                  "random_sentence"}

    def conv(i, answer):
        return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]

    uf = [{"chosen": conv(i, f"good {i}"), "rejected": conv(i, f"bad {i}"),
           "chosen_format": conv(i, f"formatted {i}") if i % 2 else f"formatted {i}"} for i in range(4)]
    records = probes.read_probe_records(write_jsonl(tmp_path / "uf.jsonl", uf))
    assert [r.extras["chosen_format"] for r in records] == [f"formatted {i}" for i in range(4)]
    uf[2]["chosen_format"] = conv(99, "other conversation")
    with pytest.raises(DataFormatError, match=r"uf2.jsonl:3: field 'chosen_format'.*differ"):
        probes.read_probe_records(write_jsonl(tmp_path / "uf2.jsonl", uf))


def test_bad_optional_fields_name_the_file_line_and_field(tmp_path):
    rows = hh_rows(6, extras=("chosen_rephrase",))
    rows[3]["chosen_rephrase"] = "   "
    with pytest.raises(DataFormatError, match=r"e.jsonl:4: field 'chosen_rephrase': response is empty"):
        probes.read_probe_records(write_jsonl(tmp_path / "e.jsonl", rows))
    rows[3]["chosen_rephrase"] = hh("another question entirely", "text")
    with pytest.raises(DataFormatError, match=r"d.jsonl:4: field 'chosen_rephrase': its dialogue differs"):
        probes.read_probe_records(write_jsonl(tmp_path / "d.jsonl", rows))
    rows[3]["chosen_rephrase"] = 7
    with pytest.raises(DataFormatError, match=r"t.jsonl:4: field 'chosen_rephrase' must be a string"):
        probes.read_probe_records(write_jsonl(tmp_path / "t.jsonl", rows))
    del rows[3]["chosen_rephrase"]  # present on the others, missing here: a data bug, not an omission
    with pytest.raises(DataFormatError, match=r"m.jsonl:4: optional field 'chosen_rephrase' is missing here"):
        probes.probe_texts_from_records(probes.read_probe_records(write_jsonl(tmp_path / "m.jsonl", rows)), [],
                                        num_prompts=6)
    with pytest.raises(DataFormatError, match=r"x.jsonl:2: missing field 'rejected'"):
        probes.read_probe_records(write_jsonl(tmp_path / "x.jsonl", [hh_rows(1)[0], {"chosen": hh("a", "b")}]))


# ------------------------------------------------------------------------------ tokenisation and scores

MAX_LENGTH, MAX_PROMPT = 40, 16


def tiny_model(vocab, seed=0, dtype=jnp.float64):
    cfg = TransformerConfig.tiny("qwen2", vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                 intermediate_size=32)
    return CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype)


@pytest.fixture(scope="module")
def model(world):
    return tiny_model(world.vocab_size)


@pytest.fixture(scope="module")
def probe_set(world):
    texts = probes.probe_texts_from_world(world, 5)
    return probes.tokenize_probes(texts, world.tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                                  bos_id=3)


def test_tokenized_probe_set_has_one_shape_for_every_family(probe_set, world):
    assert probe_set.families == PROBE_FAMILIES
    for family in PROBE_FAMILIES:
        arrays = probe_set.arrays[family]
        assert {k: v.shape for k, v in arrays.items()} == {k: (5, MAX_LENGTH) for k in
                                                           ("input_ids", "attention_mask", "loss_mask")}
        assert (arrays["input_ids"][:, 0] == 3).all()  # the BOS
        assert (probe_set.lengths(family) > 0).all()
    texts = dataclasses.replace(probe_set.texts, responses={**probe_set.texts.responses,
                                                             "other_test": ("",) + probe_set.texts.responses["other_test"][1:]})
    with pytest.raises(TokenizationError, match="example 0: probe family 'other_test'"):
        probes.tokenize_probes(texts, world.tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                               bos_id=3, add_eos=False)


forward = nnx.jit(lambda m, ids, att: m(ids, att))


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def by_hand(logits, ids, mask):
    """Per sequence, loops over scored positions t (predicted by row t - 1) in float64 NumPy."""
    out = {k: [] for k in ("logps", "argmax_logps", "off_argmax", "a_norm", "residual_norm")}
    vocab = logits.shape[-1]
    for b in range(ids.shape[0]):
        acc = {k: 0.0 for k in out}
        n = 0
        for t in range(1, ids.shape[1]):
            if not mask[b, t]:
                continue
            lp = log_softmax(logits[b, t - 1])
            pi = np.exp(lp)
            acc["logps"] += lp[ids[b, t]]
            acc["argmax_logps"] += max(lp)
            acc["off_argmax"] += np.log(1 - pi.max())
            a = np.eye(vocab) - np.outer(np.ones(vocab), pi)  # A = I − 1 πᵀ, formed
            acc["a_norm"] += np.linalg.norm(a, "fro")
            acc["residual_norm"] += np.sum((pi - np.eye(vocab)[ids[b, t]]) ** 2)
            n += 1
        acc["a_norm"] /= n
        acc["residual_norm"] = np.sqrt(acc["residual_norm"])
        for k in out:
            out[k].append(acc[k])
    return {k: np.array(v) for k, v in out.items()}


def test_fused_pass_and_prompt_subsets_equal_the_per_family_passes(world, model):
    """One stacked pass with trimmed padding gives every family's per-family scores (float64, exact
    for right-padded probes under a causal model); a subset of prompts gives those rows, in order,
    and every subset of one size shares one compiled shape."""
    probe_set = probes.tokenize_probes(probes.probe_texts_from_world(world, 5), world.tokenizer,
                                       max_length=MAX_LENGTH + 24, max_prompt_length=MAX_PROMPT, bos_id=3)
    reference = probes.ProbeScorer(model)(None, probe_set)
    fused = probes.ProbeScorer(model, fused=True, batch_size=2)  # 5 prompts: chunks 2, 2, 1 (padded)
    assert fused.trimmed_length(probe_set) < probe_set.length  # there is padding to trim here
    for family, got in fused(None, probe_set).items():
        for key in ("logps", "argmax_logps", "off_argmax", "a_norm", "residual_norm", "lengths"):
            np.testing.assert_allclose(getattr(got, key), getattr(reference[family], key), rtol=1e-12, atol=1e-12,
                                       err_msg=f"{family} {key}")
    shapes = []
    for rows in ([3, 0], [4, 1]):
        for scorer in (fused, probes.ProbeScorer(model)):
            sub = scorer(None, probe_set, ("chosen", "rejected"), prompts=rows)
            for family in ("chosen", "rejected"):
                np.testing.assert_allclose(sub[family].logps, reference[family].logps[rows], rtol=1e-12)
        shapes.append(fused.compiled_shapes())
    assert shapes[0] == shapes[1]  # another window of the same size: no new compilation
    with pytest.raises(ValueError, match="prompts must be"):
        fused(None, probe_set, prompts=[5])
    with pytest.raises(ValueError, match="per_position"):
        probes.ProbeScorer(model, fused=True, per_position=True)


def test_scores_equal_hand_computation_and_compile_once(probe_set, model):
    scorer = probes.ProbeScorer(model, batch_size=2, per_position=True)  # 5 prompts: chunks 2, 2, 1 (padded)
    scores = scorer(None, probe_set)
    assert scorer.compiled_shapes() == 1  # every family and chunk: one shape
    # A scorer of another model of the same structure (other weights) reuses the compiled pass,
    # and scores its own weights, not those the pass was compiled with.
    compiled = probes._score_pass._cache_size()
    other_model = tiny_model(model.config.vocab_size, seed=1)
    other = probes.ProbeScorer(other_model, batch_size=2, per_position=True)(None, probe_set, ("chosen",))
    assert probes._score_pass._cache_size() == compiled
    arrays = probe_set.arrays["chosen"]
    want = by_hand(np.asarray(forward(other_model, arrays["input_ids"], arrays["attention_mask"])),
                   arrays["input_ids"], arrays["loss_mask"])
    np.testing.assert_allclose(other["chosen"].logps, want["logps"], rtol=1e-10)
    assert not np.allclose(other["chosen"].logps, scores["chosen"].logps)
    for family in ("chosen", "shuffled_other"):
        arrays = probe_set.arrays[family]
        logits = np.asarray(forward(model, arrays["input_ids"], arrays["attention_mask"]))
        want = by_hand(logits, arrays["input_ids"], arrays["loss_mask"])
        got = scores[family]
        for key, value in want.items():
            np.testing.assert_allclose(getattr(got, key), value, rtol=1e-10, atol=1e-12, err_msg=f"{family} {key}")
        np.testing.assert_array_equal(got.lengths, arrays["loss_mask"][:, 1:].sum(1))
        np.testing.assert_allclose(got.token_logps, np.asarray(losses.token_logps(logits, arrays["input_ids"],
                                                                                  arrays["loss_mask"])), atol=1e-12)
        # The unit residual's norm is that of ldjax.losses.sequence_residual (G with c = 1), formed.
        g = np.asarray(losses.sequence_residual(logits, arrays["input_ids"], arrays["loss_mask"], np.ones(5)))
        np.testing.assert_allclose(got.residual_norm, np.sqrt((g ** 2).sum((1, 2))), rtol=1e-10)
    # The argmax path lies above every response of the same prompt, position by position.
    assert (scores["chosen"].argmax_logps >= scores["chosen"].logps).all()
    # The functional view of the same model gives the same numbers.
    apply_fn, params = functional(model)
    other = probes.score_probes(apply_fn, probe_set, params, families=("chosen",))
    np.testing.assert_allclose(other["chosen"].logps, scores["chosen"].logps, rtol=1e-12)
    assert other["chosen"].token_logps is None  # per-position terms only when asked for


@settings(max_examples=40)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(0.1, 30.0))
def test_a_frobenius_identity_equals_the_formed_matrix(vocab, seed, scale):
    logits = scale * np.random.default_rng(seed).normal(size=(3, vocab))
    got = np.asarray(probes.a_frobenius_norm(logits))
    for row, value in zip(logits, got):
        pi = np.exp(log_softmax(row))
        a = np.eye(vocab) - np.outer(np.ones(vocab), pi)
        np.testing.assert_allclose(value, np.linalg.norm(a, "fro"), rtol=1e-12)


def test_off_argmax_mass_stays_finite_on_peaked_rows():
    # max π = 1 − 2e-30: 1 − max π is 0 in float64, the log-sum-exp of the other logits is not.
    logits = np.zeros((1, 3, 4))
    logits[0, 0] = [0.0, -69.0, -69.0, -np.inf]
    ids = np.array([[0, 0, 0]])
    mask = np.array([[0, 1, 0]])
    diag = probes.token_diagnostics(logits, ids, mask)
    expected = np.logaddexp(-69.0, -69.0) - np.logaddexp(0.0, np.logaddexp(-69.0, -69.0))
    np.testing.assert_allclose(diag["token_off_argmax"][0, 1], expected, rtol=1e-12)
    assert np.asarray(diag["token_off_argmax"])[0, [0, 2]].tolist() == [0.0, 0.0]


def test_preference_diagnostics_are_the_dpo_coefficients(probe_set, model):
    scores = probes.score_probes(model, probe_set, families=("chosen", "rejected"))
    c, r = scores["chosen"], scores["rejected"]
    ref_c, ref_r = c.logps - 0.3, r.logps + np.linspace(-1, 1, 5)
    beta = 0.2
    got = probes.preference_diagnostics(c, r, ref_c, ref_r, loss_type="sigmoid", beta=beta)
    margin = (c.logps - ref_c) - (r.logps - ref_r)
    a = 1 / (1 + np.exp(-beta * margin))
    np.testing.assert_allclose(got["margin"], margin, rtol=1e-12)
    np.testing.assert_allclose(got["coef_chosen"], beta * (1 - a), rtol=1e-10)
    np.testing.assert_allclose(got["coef_rejected"], -beta * (1 - a), rtol=1e-10)
    np.testing.assert_allclose(got["loss"], -np.log(a), rtol=1e-10)
    np.testing.assert_allclose(got["G_chosen"], beta * (1 - a) * c.residual_norm, rtol=1e-10)
    np.testing.assert_allclose(got["G_rejected"], beta * (1 - a) * r.residual_norm, rtol=1e-10)
    # Other loss types go through residual_coefficients (IPO: c⁺ = 1/β − 2h, length-normalised h).
    ipo = probes.preference_diagnostics(c, r, ref_c, ref_r, loss_type="ipo", beta=beta)
    h = (c.logps - ref_c) / c.lengths - (r.logps - ref_r) / r.lengths
    np.testing.assert_allclose(ipo["coef_chosen"], -2 * (h - 1 / (2 * beta)) / c.lengths, rtol=1e-10)


def test_word_tokenizer_of_a_file_covers_its_probe_fields(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(10, extras=OPTIONAL))
    texts = probes.probe_texts_from_jsonl(path, num_prompts=3)
    tokenizer = build_tokenizer(sorted({w for f in texts.families for t in texts.responses[f] + texts.prompts
                                        for w in t.split()}))
    probe_set = probes.tokenize_probes(texts, tokenizer, max_length=48, max_prompt_length=24)
    unk = tokenizer.token_to_id("<unk>")
    assert all((probe_set.arrays[f]["input_ids"] != unk).all() for f in probe_set.families)


def test_partner_draws_are_uniform_over_the_other_records():
    from ldjax.probes import _draw_excluding
    rng = np.random.default_rng(0)
    for exclude in ([1, 4], [4, 1], [0], [5]):
        draws = np.array([_draw_excluding(rng, 6, exclude) for _ in range(6000)])
        allowed = sorted(set(range(6)) - set(exclude))
        assert sorted(set(draws.tolist())) == allowed
        counts = np.bincount(draws, minlength=6)[allowed]
        assert abs(counts / len(draws) - 1 / len(allowed)).max() < 0.03
