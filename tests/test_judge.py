"""The offline judges (ldjax.judge): the world likelihood is exact, the judge prefers chosen to
rejected on held-out pairs, the LM judge scores like a plain forward pass, and win rates carry
the binomial intervals scipy computes.

Exactness is checked on a *tiny grammar* (the world module's lexicon and slots swapped for a
handful of words, so every response the generators can write is enumerable): the judge's
probability of every text equals an independent enumeration of ``answer`` / ``rejected``, the
probabilities sum to one, and Monte-Carlo frequencies of the world's own samplers match them
(chi-square).
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from ldjax.data import world as W
from ldjax.judge import LOG_FLOOR, LMJudge, WinRate, WorldJudge, binomial_interval, pool_win_rates, win_rate

# ------------------------------------------------------------------------- tiny grammar

TINY_LEXICON = {
    "color": (("red", "crimson"), ("blue", "azure"), ("green", "verdant"), ("grey", "ashen"),
              ("golden", "gilded"), ("white", "pale")),
    "animal": (("dog", "hound"), ("horse", "steed"), ("goat", "ram"), ("crow", "raven"),
               ("fox", "vixen"), ("ox", "bull")),
    "weather": (("rain", "drizzle"), ("snow", "sleet")),
    "town": (("market", "bazaar"),),
}
TINY_SLOTS = {
    "opener_history": W._slot("as the records tell it ,", "the chronicles say that"),
    "home": W._slot("it lived near the {color} hill", "its home stood by the {color} hill today"),
    "friend": W._slot("with a {animal}", "together with one {animal} friend"),
    # "." ignores the slot's hole, and "with a {animal} ." re-reads friend + ".": texts with two parses.
    "close": W._slot("with a {animal} .", "."),
    "scene": W._slot("{weather} fell on the {town} ,", "early {weather} reached the {town} ,"),
    "ending": W._slot("until dark .", "as night came ."),
}
TINY = dict(LEXICON=TINY_LEXICON, SLOTS=TINY_SLOTS, TOPICS=("history",), ANSWER_BODY=("home", "friend", "close"),
            ANSWER_REQUIRED=frozenset({"home"}), NARRATIVE_BODY=("scene", "ending"),
            NARRATIVE_REQUIRED=frozenset({"scene"}))
PROMPT = "question : tell me about the history of zuba . answer :"
OPENER = "opener_history"


@pytest.fixture
def tiny_grammar(monkeypatch):
    """Function-scoped, so the real grammar is back before any other test builds a world (and no
    world of the tiny grammar stays in the process-wide caches)."""
    from ldjax import judge
    W.shared_world.cache_clear()
    monkeypatch.setattr(judge, "_STYLE_JUDGES", {})
    for name, value in TINY.items():
        monkeypatch.setattr(W, name, value)
    yield
    W.shared_world.cache_clear()


def tiny_config(style, divergence=0.5):
    return W.WorldConfig(seed=3, num_entities=10, num_train=3, num_test=1, num_probe=1, min_response_words=12,
                         max_response_words=18, rejected_style=style, divergence=divergence, shakespeare_fraction=0.0)


# An independent enumeration of the generators, read off world.py.

def _probs(order, cdf):
    p = np.zeros(len(order))
    p[np.asarray(order)] = np.diff(np.concatenate([[0.0], cdf[:-1], [1.0]]))
    return p


def _fills(g, slot, template):
    """(Phrase, P(holes)) for every meaning/form assignment of a chosen-law phrase."""
    holes = W.SLOTS[slot].holes
    per_hole = []
    for h in holes:
        pm = _probs(g.meaning_order[h], g.meaning_cdf[h])
        per_hole.append([(m, f, pm[m] * (g.form_bias if f == 0 else 1 - g.form_bias))
                         for m in range(len(W.LEXICON[h])) for f in (0, 1)])
    for combo in itertools.product(*per_hole):
        yield (W.Phrase(slot, template, tuple(m for m, _, _ in combo), tuple(f for _, f, _ in combo)),
               math.prod(p for _, _, p in combo))


def _layouts(g, slots, required):
    p_opt = g.config.optional_slot_probability
    for keep in itertools.product(*[[True] if s in required else [False, True] for s in slots]):
        kept = [s for s, k in zip(slots, keep) if k]
        p_keep = math.prod(1.0 if s in required else (p_opt if k else 1 - p_opt) for s, k in zip(slots, keep))
        for templates in itertools.product(*[range(len(W.SLOTS[s].templates)) for s in kept]):
            tp = math.prod(_probs(g.template_order[s], g.template_cdf[s])[t] for s, t in zip(kept, templates))
            yield list(zip(kept, templates)), p_keep * tp


def _fill_all(g, layout, p):
    for combo in itertools.product(*[list(_fills(g, s, t)) for s, t in layout]):
        yield tuple(ph for ph, _ in combo), p * math.prod(q for _, q in combo)


def enumerate_answers(g):
    """{phrases: probability} of ``g.answer(OPENER, rng)`` (redraws = conditioning on the window)."""
    lo, hi = g.config.min_response_words, g.config.max_response_words
    accepted = []
    for t0 in range(len(W.SLOTS[OPENER].templates)):
        p0 = _probs(g.template_order[OPENER], g.template_cdf[OPENER])[t0]
        for layout, p in _layouts(g, W.ANSWER_BODY, W.ANSWER_REQUIRED):
            full = [(OPENER, t0), *layout]
            if lo <= sum(W.template_length(s, t) for s, t in full) <= hi:
                accepted.append((full, p0 * p))
    z = sum(p for _, p in accepted)
    return {ph: p / z for layout, p in accepted for ph, p in _fill_all(g, layout, p)}


def enumerate_rejected(g, answers):
    """{text: probability} of ``g.rejected(g.answer(OPENER, rng), rng)``."""
    out = defaultdict(float)
    if g.config.rejected_style == "foreign":
        narratives = defaultdict(float)
        for layout, p in _layouts(g, W.NARRATIVE_BODY, W.NARRATIVE_REQUIRED):
            for ph, q in _fill_all(g, layout, p):
                narratives[W.render(ph)] += q
        prefixes = defaultdict(float)
        for chosen, p in answers.items():
            n = len(chosen) - 1
            shared = 1 + min(n - 1, max(1, int(round(g.config.divergence * n))))
            prefixes[W.render(chosen[:shared])] += p
        for prefix, p in prefixes.items():
            for tail, q in narratives.items():
                out[f"{prefix} {tail}"] += p * q
        return dict(out)
    for chosen, p in answers.items():
        n = len(chosen) - 1
        shared = 1 + min(n - 1, max(1, int(round(g.config.divergence * n))))
        options = []
        for ph in chosen[shared:]:
            order = g.template_order[ph.slot]
            template = int([t for t in order[::-1] if t != ph.template][0])
            per_hole = []
            for k, h in enumerate(W.SLOTS[ph.slot].holes):
                ranked = g.meaning_order[h]
                tail = [int(m) for m in ranked[-max(1, len(ranked) // 3):] if m != ph.meanings[k]]
                per_hole.append([(m, 1 / len(tail)) for m in tail])
            options.append([(W.Phrase(ph.slot, template, tuple(m for m, _ in c), (1,) * len(c)),
                             math.prod(q for _, q in c)) for c in itertools.product(*per_hole)])
        for combo in itertools.product(*options):
            text = W.render((*chosen[:shared], *(ph for ph, _ in combo)))
            out[text] += p * math.prod(q for _, q in combo)
    return dict(out)


def texts_of(phrase_law):
    out = defaultdict(float)
    for ph, p in phrase_law.items():
        out[W.render(ph)] += p
    return dict(out)


@pytest.mark.parametrize("style,divergence", [("rare_slots", 0.5), ("foreign", 0.3)])
def test_world_likelihood_equals_exact_enumeration_on_a_tiny_grammar(tiny_grammar, style, divergence):
    config = tiny_config(style, divergence)
    g = W._Grammar(config, W._rng(config, "grammar"))
    judge = WorldJudge(config)
    answers = enumerate_answers(g)
    chosen_law = texts_of(answers)
    rejected_law = enumerate_rejected(g, answers)
    assert len(chosen_law) < len(answers)  # some texts have two parses ("with a dog ." ...)
    for law, which in ((chosen_law, "chosen"), (rejected_law, "rejected")):
        got = {text: judge.probability(PROMPT, text, which) for text in law}
        np.testing.assert_allclose([got[t] for t in law], list(law.values()), rtol=1e-9, atol=0)
        total = sum(got.values())
        print(f"{style} {which}: {len(law)} texts, judge probabilities sum to {total!r}")
        assert abs(total - 1.0) < 1e-9
    # Texts the generators cannot write: outside the window, a word off, the other style.
    text = next(iter(chosen_law))
    assert judge.probability(PROMPT, text + " .", "chosen") == 0.0 or text + " ." in chosen_law
    assert judge.log_likelihood(PROMPT, text.replace("hill", "mountain"), "chosen") == -math.inf
    foreign_only = [t for t in rejected_law if t not in chosen_law]
    assert foreign_only and all(judge.probability(PROMPT, t, "chosen") == 0.0 for t in foreign_only[:50])


def _chi_square(judge, sampled, style):
    """Pearson chi-square p-value of sampled texts against the judge's probabilities: texts with
    an expected count >= 5 are bins of their own, the rest one pooled bin."""
    counts = defaultdict(int)
    for t in sampled:
        counts[t] += 1
    n = len(sampled)
    probs = {t: judge.probability(PROMPT, t, style) for t in counts}
    assert all(p > 0 for p in probs.values())
    big = [t for t in counts if n * probs[t] >= 5]
    observed = [counts[t] for t in big] + [n - sum(counts[t] for t in big)]
    expected = [n * probs[t] for t in big] + [n * (1 - sum(probs[t] for t in big))]
    return stats.chisquare(observed, expected).pvalue, len(big)


@pytest.mark.parametrize("style", ["rare_slots", "foreign"])
def test_world_likelihood_matches_monte_carlo_frequencies_of_the_world_samplers(tiny_grammar, style):
    config = tiny_config(style)
    g = W._Grammar(config, W._rng(config, "grammar"))
    judge = WorldJudge(config)
    rng = np.random.default_rng(7)
    chosen, rejected = [], []
    for _ in range(20_000):
        c = g.answer(OPENER, rng)
        chosen.append(W.render(c))
        rejected.append(W.render(g.rejected(c, rng)))
    for sampled, which in ((chosen, "chosen"), (rejected, "rejected")):
        p, bins = _chi_square(judge, sampled, which)
        print(f"{style} {which}: chi-square p = {p:.3f} over {bins + 1} bins, 20,000 samples")
        assert p > 1e-3  # fixed seed: deterministic; a wrong law gives p ~ 0 at this sample size


# ---------------------------------------------------------------------------- real world


@pytest.fixture(scope="module", params=["rare_slots", "foreign"])
def world(request):
    return W.build_world(W.WorldConfig(num_train=40, num_test=300, num_probe=1, num_pretrain_answers=1,
                                       num_pretrain_narrative=1, shakespeare_fraction=0.0,
                                       rejected_style=request.param))


def test_world_judge_prefers_chosen_on_held_out_pairs(world):
    judge = WorldJudge(world)
    pairs = world.test
    assert len(pairs) >= 200
    preferred = [judge.prefers(e.prompt, e.chosen, e.rejected) for e in pairs]
    rate = float(np.mean(preferred))
    print(f"{world.config.rejected_style}: the judge prefers chosen on {rate:.1%} of {len(pairs)} held-out pairs")
    assert rate >= 0.95
    # The same through win_rate: chosen against rejected.
    result = win_rate(judge, [e.prompt for e in pairs], [e.chosen for e in pairs], [e.rejected for e in pairs])
    assert result.wins == sum(preferred) and result.low > 0.9


def test_generated_texts_have_finite_likelihoods_well_above_the_floor(world):
    judge = WorldJudge(world)
    g = W._Grammar(world.config, W._rng(world.config, "grammar"))
    rng = np.random.default_rng(0)
    for e, (c, r) in zip(world.test[:50], world.test_phrases[:50]):
        assert W.render(c) == e.chosen and W.render(r) == e.rejected  # the judge rebuilds this grammar
        assert -300 < judge.log_likelihood(e.prompt, e.chosen, "chosen") < 0
        assert -300 < judge.log_likelihood(e.prompt, e.rejected, "rejected") < 0
    for topic in W.TOPICS:
        prompt = f"question : describe the {topic} of kabo . answer :"
        for _ in range(20):
            c = g.answer(f"opener_{topic}", rng)
            assert math.isfinite(judge.log_likelihood(prompt, W.render(c), "chosen"))
            assert math.isfinite(judge.log_likelihood(prompt, W.render(g.rejected(c, rng)), "rejected"))
    # Another topic's opener: the chosen style for this prompt cannot write it.
    e = world.test[0]
    other = next(t for t in W.TOPICS if t not in e.prompt.split())
    assert judge.log_likelihood(e.prompt.replace(next(t for t in W.TOPICS if t in e.prompt.split()), other),
                                e.chosen, "chosen") == -math.inf


def test_log_ratio_floor_and_prompt_errors(world):
    judge = WorldJudge(world)
    e = world.test[0]
    garbage = "the the the"
    assert judge.log_ratio(e.prompt, garbage) == LOG_FLOOR
    assert judge.log_ratio(e.prompt, e.chosen) > 0 > judge.log_ratio(e.prompt, e.rejected) > LOG_FLOOR
    assert judge.prefers(e.prompt, e.rejected, garbage) and not judge.prefers(e.prompt, garbage, garbage)
    with pytest.raises(ValueError, match="topic"):
        judge.log_likelihood("tell me something", e.chosen)
    with pytest.raises(ValueError, match="style"):
        judge.log_likelihood(e.prompt, e.chosen, "neutral")


# ------------------------------------------------------------------------------ win rates


@pytest.mark.parametrize("k,n", [(0, 10), (8, 10), (10, 10), (57, 100), (180, 200), (1, 600)])
@pytest.mark.parametrize("method,scipy_method", [("wilson", "wilson"), ("clopper-pearson", "exact")])
def test_binomial_interval_matches_scipy(k, n, method, scipy_method):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method=scipy_method)
    np.testing.assert_allclose(binomial_interval(k, n, method=method), (expected.low, expected.high), atol=1e-10)
    ninety = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method=scipy_method)
    np.testing.assert_allclose(binomial_interval(k, n, confidence=0.9, method=method), (ninety.low, ninety.high),
                               atol=1e-10)


def test_binomial_interval_known_values():
    # 8 of 10 at 95 %: Wilson 0.4902-0.9433, Clopper-Pearson 0.4439-0.9748 (textbook values).
    np.testing.assert_allclose(binomial_interval(8, 10), (0.4902, 0.9433), atol=1e-4)
    np.testing.assert_allclose(binomial_interval(8, 10, method="clopper-pearson"), (0.4439, 0.9748), atol=1e-4)
    with pytest.raises(ValueError):
        binomial_interval(3, 0)
    with pytest.raises(ValueError):
        binomial_interval(1, 10, method="wald")


class _TableJudge:
    def __init__(self, table):
        self.table = table

    def scores(self, prompts, responses):
        return np.array([self.table[r] for r in responses], float)


def test_win_rate_counts_ties_half_and_pools_seeds():
    judge = _TableJudge({"good": 2.0, "bad": -1.0, "meh": 0.0})
    prompts = ["p"] * 5
    a = ["good", "good", "meh", "bad", "meh"]
    b = ["bad", "meh", "meh", "good", "good"]
    r = win_rate(judge, prompts, a, b)
    assert (r.wins, r.ties, r.losses, r.n) == (2, 1, 2, 5)
    assert r.rate == pytest.approx(0.5)
    assert (r.low, r.high) == pytest.approx(binomial_interval(2.5, 5))
    assert r.low < 0.5 < r.high and "2 wins, 1 ties, 2 losses of 5" in str(r)
    pooled = pool_win_rates([r, WinRate.from_counts(9, 0, 1), WinRate.from_counts(5, 2, 3)])
    assert (pooled.wins, pooled.ties, pooled.losses) == (16, 3, 6)
    assert pooled.rate == pytest.approx(17.5 / 25)
    assert (pooled.low, pooled.high) == pytest.approx(binomial_interval(17.5, 25))
    with pytest.raises(ValueError, match="one response per prompt"):
        win_rate(judge, prompts, a, b[:3])


# ------------------------------------------------------------------------------- LM judge


def test_lm_judge_scores_like_a_plain_forward_pass(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ldjax.models import CausalLM, TransformerConfig, save_pretrained

    tokenizer = W.build_tokenizer(["zuba"])
    config = TransformerConfig.tiny("qwen2", vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                                    intermediate_size=64, initializer_range=0.2)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    save_pretrained(model, tokenizer, tmp_path / "judge")
    other = CausalLM(config, rngs=nnx.Rngs(1))
    save_pretrained(other, tokenizer, tmp_path / "reference")

    prompts = [PROMPT, "question : describe the habits of zuba . answer :", PROMPT]
    responses = ["it lived near the red hill .", "", "so the story goes . that is all i know ."]
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")

    forward = nnx.jit(lambda m, ids: m(ids))

    def by_hand(m, prompt, response):  # one unpadded sequence, zero-padded at the end to 40 tokens
        p = [bos] + tokenizer.encode(prompt, add_special_tokens=False).ids
        r = tokenizer.encode(response, add_special_tokens=False).ids + [eos]
        ids = p + r + [0] * (40 - len(p) - len(r))
        logp = jax.nn.log_softmax(forward(m, jnp.asarray([ids]))[0].astype(jnp.float64))
        return [float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(r)]

    total = LMJudge(tmp_path / "judge", reduction="sum", batch_size=2)
    mean = LMJudge(tmp_path / "judge")
    ratio = LMJudge(tmp_path / "judge", reference_dir=tmp_path / "reference", reduction="sum")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens = by_hand(model, p, r)
        np.testing.assert_allclose(total.scores(prompts, responses)[i], sum(tokens), rtol=1e-5)
        np.testing.assert_allclose(mean.score(p, r), np.mean(tokens), rtol=1e-5)
    reference = LMJudge(tmp_path / "reference", reduction="sum")
    np.testing.assert_allclose(ratio.scores(prompts, responses),
                               total.scores(prompts, responses) - reference.scores(prompts, responses), atol=1e-5)
    assert np.all(ratio.scores(prompts, responses) != 0)
    a, b = responses[0], responses[2]
    assert total.prefers(PROMPT, a, b) == (sum(by_hand(model, PROMPT, a)) > sum(by_hand(model, PROMPT, b)))
    r = win_rate(mean, prompts, responses, responses)
    assert (r.ties, r.rate) == (3, 0.5)


# ------------------------------------------------------------------ the smoothed style judge


@pytest.mark.parametrize("style", ["rare_slots", "foreign"])
def test_style_ngram_judge_is_normalised_and_prefers_held_out_chosen(style):
    from ldjax.data.world import WorldConfig, build_world
    from ldjax.judge import StyleNgramJudge
    world = build_world(WorldConfig(num_entities=60, num_train=40, num_test=200, rejected_style=style,
                                    num_pretrain_answers=10, num_pretrain_narrative=5, shakespeare_fraction=0.0))
    judge = StyleNgramJudge(world, samples=400)
    for style_ in ("chosen", "rejected"):  # every conditional law sums to one over the vocabulary
        for history in ("<s>", "the", "zzz-unseen"):
            total = sum(judge.conditional(style_, history, w) for w in judge.vocab)
            assert total == pytest.approx(1.0, abs=1e-12)
    prompts = [e.prompt for e in world.test]
    chosen = judge.scores(prompts, [e.chosen for e in world.test])
    rejected = judge.scores(prompts, [e.rejected for e in world.test])
    rate = float(np.mean(chosen > rejected))
    print(f"{style}: style judge prefers held-out chosen in {rate:.3f} of {len(prompts)}")
    assert rate >= 0.95
    # A text outside the grammar still gets a finite, graded score (the exact judge floors it).
    odd = "here its home stood beside the purple road and each spring went cooking a chime proudly"
    assert np.isfinite(judge.log_ratio(prompts[0], odd))
    assert judge.log_ratio(prompts[0], world.test[0].chosen) == pytest.approx(
        judge.log_likelihood(world.test[0].chosen) - judge.log_likelihood(world.test[0].chosen, "rejected"))


def test_style_judge_of_world_is_fitted_once_and_equals_a_fresh_fit():
    from ldjax.data.world import WorldConfig, build_world, shared_world
    from ldjax.judge import StyleNgramJudge
    config = WorldConfig(num_entities=40, num_train=40, num_test=30, num_pretrain_answers=5,
                         num_pretrain_narrative=3, shakespeare_fraction=0.0)
    shared = StyleNgramJudge.of_world(shared_world(config))
    assert StyleNgramJudge.of_world(build_world(config)) is shared  # keyed by the world's config
    fresh = StyleNgramJudge(build_world(config))
    texts = [e.chosen for e in build_world(config).test[:5]] + [e.rejected for e in build_world(config).test[:5]]
    np.testing.assert_array_equal(shared.scores([""] * len(texts), texts), fresh.scores([""] * len(texts), texts))


def test_token_judge_scores_equal_the_text_judge():
    """token_judge_scores (tables over token ids, inside jit) = StyleNgramJudge.scores on the decoded
    texts: world responses, random token strings with specials and EOS mid-way, empty responses."""
    import jax
    from ldjax.data.world import SPECIAL_TOKENS, WorldConfig, build_world
    from ldjax.judge import StyleNgramJudge, token_judge_scores
    world = build_world(WorldConfig(num_entities=40, num_train=40, num_test=30, num_pretrain_answers=5,
                                    num_pretrain_narrative=3, shakespeare_fraction=0.0))
    tok = world.tokenizer
    judge = StyleNgramJudge(world, samples=100)
    vocab = world.vocab_size
    tables = judge.token_tables(tok.get_vocab(), vocab, SPECIAL_TOKENS)
    eos = tok.token_to_id("<eos>")
    rng = np.random.default_rng(0)
    rows, masks = [], []
    texts = [e.chosen for e in world.test[:10]] + [e.rejected for e in world.test[:10]]
    length = 48
    for text in texts:  # prompt of 3 random tokens, the response, EOS, padding
        ids = [int(i) for i in rng.integers(4, vocab, 3)] + tok.encode(text).ids + [eos]
        mask = [0, 0, 0] + [1] * (len(ids) - 3)
        rows.append(ids + [0] * (length - len(ids)))
        masks.append(mask + [0] * (length - len(mask)))
    for n in (0, 1, 5, 20, 44):  # random strings: specials inside, EOS mid-way or none, empty
        ids = [int(i) for i in rng.integers(0, vocab, 3 + n)]
        rows.append(ids + [0] * (length - len(ids)))
        masks.append([0, 0, 0] + [1] * n + [0] * (length - 3 - n))
    ids, mask = np.asarray(rows), np.asarray(masks)
    got = np.asarray(jax.jit(lambda i, m: token_judge_scores(tables, i, m, eos))(ids, mask))

    def decoded(i, m):
        response = [int(t) for t, s in zip(i, m) if s]
        if eos in response:
            response = response[:response.index(eos)]
        return tok.decode(response, skip_special_tokens=True)

    want = judge.scores([""] * len(ids), [decoded(i, m) for i, m in zip(ids, mask)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
    assert np.ptp(want) > 1.0  # the cases differ: the comparison is not vacuous
