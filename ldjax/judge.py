"""Offline judges of generations and pairwise win rates with binomial confidence intervals.

SPEC §3's "extend" mitigation is judged by pairwise comparisons of generations. Here the
judge needs no external LLM:

- :class:`WorldJudge` — for the embedded world (:mod:`ldjax.data.world`), whose own generative
  model is known exactly. It computes the probability that the world's *chosen-style*
  generator (``_Grammar.answer``) and its *rejected-style* generator (``_Grammar.answer``
  followed by ``_Grammar.rejected``) produce a given response text for a prompt, by dynamic
  programming over the words (every parse of the text into the generator's phrases is
  summed), and scores a response by the log-likelihood ratio ``log p₊ − log p₋``.
- :class:`StyleNgramJudge` — the same two generators as smoothed word-bigram models fitted to
  their own samples: a graded score for generations the exact grammar cannot parse.
- :class:`LMJudge` — for a user's data: a local Hugging Face causal LM (GPT-NeoX / Qwen2,
  loaded with :func:`ldjax.models.load_pretrained`) scores a response by its log-probability
  given the prompt (optionally minus a reference model's).

:func:`win_rate` compares two lists of responses to the same prompts with either judge and
reports wins / ties / losses, the rate (ties count half) and a 95 % binomial interval
(Wilson score by default, Clopper–Pearson on request); :func:`pool_win_rates` pools seeds.

What the world likelihood computes exactly, and what it approximates
-------------------------------------------------------------------
Chosen style (``answer(opener, rng)``): the opener template, the optional-slot coin flips and
every body slot's template are drawn — and *redrawn together* until the response length lies
in ``[min_response_words, max_response_words]`` — and then each hole gets a meaning (Zipf law
over a per-world ranking) and a surface form (``form_bias``). Redrawing until a condition
holds is exactly conditioning on it, so ``p₊(y) = q(y) · 1[len(y) in window] / Z`` where
``q`` is the probability of one unconditioned draw and ``Z`` = P(one draw's length lies in
the window), computed exactly by convolving the slots' length laws. (The loop gives up after
10,000 draws and raises; a returned answer is unaffected by the cap.)

Rejected style (``rejected(chosen, rng)`` on ``chosen = answer(...)``): ``y`` = the first
``shared(n)`` phrases of the chosen answer ``C`` (``n`` = its body phrases), then a tail. The
judge marginalises over ``C`` exactly: the prefix is parsed as chosen-style phrases; the
phrases of ``C`` that the tail replaces are summed over (their slots, templates, the length
window of ``C`` and the condition that ``shared(n)`` equals the prefix's phrase count are all
tracked by the dynamic program; their hole contents sum to one except where the tail depends
on them). ``rare_slots``: each replaced phrase of ``C`` becomes the same slot in its least
likely template other than ``C``'s (a function of ``C``'s template, summed over), with every
hole a uniform draw among the rarest third of meanings other than ``C``'s meaning (the
meaning of ``C`` is summed over with its Zipf law) in form 1. ``foreign``: the tail is a
narrative sentence, whose probability is computed like the chosen style's (no length window).

Meaning and template laws are taken from the grammar's own CDFs the way ``_draw`` reads them
(``P(rank r) = cdf[r] − cdf[r−1]``, the last rank absorbing ``1 − cdf[-2]``), so the only
approximations are float rounding and treating ``rng.random()`` (a multiple of 2⁻⁵³) as a
continuous uniform: relative errors around 1e-15. Tests check the probabilities against an
exact enumeration of the generator on a tiny grammar and against Monte-Carlo frequencies.

The prompt enters only through its topic, which picks the opener slot; a prompt must name
exactly one of the world's topics.
"""
from __future__ import annotations

import dataclasses
import math
import string
from collections import defaultdict
from typing import Any, Literal, Protocol, Sequence

import numpy as np

LOG_FLOOR = -1000.0
"""Floor of the log-likelihoods in :meth:`WorldJudge.log_ratio` (nats). Every text either world
generator can produce has a log-probability far above it (a 60-word response with every word at
the grammar's least likely choice is still above −500), so the floor only acts on impossible
texts."""


# --------------------------------------------------------------------------- world judge


def _rank_probs(cdf: np.ndarray) -> np.ndarray:
    """P(rank r) of ``ldjax.data.world._draw(rng, cdf)``: searchsorted(side="right") of a
    uniform draw, clamped to the last rank."""
    cdf = np.asarray(cdf, np.float64)
    return np.diff(np.concatenate([[0.0], cdf[:-1], [1.0]]))


@dataclasses.dataclass(frozen=True)
class _Template:
    index: int
    tokens: tuple[tuple[bool, str], ...]  # (is_hole, word or category)

    @property
    def length(self) -> int:
        return len(self.tokens)


def _compile_template(index: int, text: str) -> _Template:
    tokens = []
    for token in text.split():
        fields = list(string.Formatter().parse(token))
        if len(fields) == 1 and fields[0][0] == "" and fields[0][1]:
            tokens.append((True, fields[0][1]))
        elif all(field is None for _, field, _, _ in fields):
            tokens.append((False, token))
        else:
            raise ValueError(f"template {text!r}: a hole must be a whole word, got {token!r}")
    return _Template(index, tuple(tokens))


class WorldJudge:
    """The embedded world's own generative model as a judge (see the module docstring).

    Args:
      world: a :class:`ldjax.data.world.World` (or its :class:`~ldjax.data.world.WorldConfig`):
        the grammar's rankings are rebuilt from the config's seed exactly as ``build_world``
        draws them, and the rejected style is ``config.rejected_style``.
    """

    def __init__(self, world: Any):
        from ldjax.data import world as W

        config = getattr(world, "config", world)
        if not isinstance(config, W.WorldConfig):
            raise TypeError(f"WorldJudge needs a World or WorldConfig, got {type(world).__name__}")
        self.config = config
        self._W = W
        grammar = W._Grammar(config, W._rng(config, "grammar"))
        self.topics = tuple(W.TOPICS)
        self.body = tuple(W.ANSWER_BODY)
        self.required = frozenset(W.ANSWER_REQUIRED)
        self.narrative_body = tuple(W.NARRATIVE_BODY)
        self.narrative_required = frozenset(W.NARRATIVE_REQUIRED)
        self.lo, self.hi = config.min_response_words, config.max_response_words
        self.p_optional = float(config.optional_slot_probability)
        self.form_p = (float(config.form_bias), 1.0 - float(config.form_bias))
        # Slot -> templates, template probabilities (by template index) and the rare-tail template map.
        self.templates = {s: tuple(_compile_template(t, text) for t, text in enumerate(slot.templates))
                          for s, slot in W.SLOTS.items()}
        self.template_p: dict[str, np.ndarray] = {}
        self.rare_template: dict[str, dict[int, int]] = {}
        for s, order in grammar.template_order.items():
            probs = np.zeros(len(order))
            probs[np.asarray(order)] = _rank_probs(grammar.template_cdf[s])
            self.template_p[s] = probs
            # (A one-template slot has no rare variant: ``_Grammar.template(rare=True)`` fails on it.)
            self.rare_template[s] = {t: int(others[0]) for t in range(len(order))
                                     if (others := [u for u in order[::-1] if u != t])}
        # Category -> meaning probabilities (by meaning index), rare-tail meaning law, word lookup.
        self.meaning_p: dict[str, np.ndarray] = {}
        self.rare_meaning_p: dict[str, np.ndarray] = {}
        self.word_senses: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for c, meanings in W.LEXICON.items():
            order = np.asarray(grammar.meaning_order[c])
            probs = np.zeros(len(order))
            probs[order] = _rank_probs(grammar.meaning_cdf[c])
            self.meaning_p[c] = probs
            self.rare_meaning_p[c] = self._rare_law(order, probs)
            senses: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for m, forms in enumerate(meanings):
                for f, word in enumerate(forms):
                    senses[word].append((m, f))
            self.word_senses[c] = dict(senses)
        self._z = self._window_mass()
        self._continuations: dict[tuple[int, int, int], float] = {}

    # ---------------------------------------------------------------- generator laws

    @staticmethod
    def _rare_law(order: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """P(rare-tail meaning m'), marginal over the replaced phrase's meaning m ~ Zipf:
        m' is uniform over the rarest third of meanings other than m."""
        tail = [int(m) for m in order[-max(1, len(order) // 3):]]
        law = np.zeros(len(order))
        for m, pm in enumerate(probs):
            allowed = [u for u in tail if u != m]
            for u in allowed:
                law[u] += pm / len(allowed)
        return law

    def _shared(self, n_body: int) -> int:
        """Phrases (opener included) the rejected response keeps, as ``_Grammar.rejected``."""
        return 1 + min(n_body - 1, max(1, int(round(self.config.divergence * n_body))))

    def _slot_in(self, slot: str, required: frozenset) -> float:
        return 1.0 if slot in required else self.p_optional

    def _window_mass(self) -> dict[str, float]:
        """Per topic, Z = P(one unconditioned layout draw of ``answer`` (its opener template,
        optional slots and templates) has a length in the window)."""
        masses = {}
        for topic in self.topics:
            dist = defaultdict(float)
            opener = f"opener_{topic}"
            for tpl in self.templates[opener]:
                dist[tpl.length] += self.template_p[opener][tpl.index]
            for slot in self.body:
                p_in = self._slot_in(slot, self.required)
                new = defaultdict(float)
                for length, mass in dist.items():
                    if p_in < 1.0:
                        new[length] += mass * (1.0 - p_in)
                    for tpl in self.templates[slot]:
                        new[length + tpl.length] += mass * p_in * self.template_p[slot][tpl.index]
                dist = new
            masses[topic] = sum(m for length, m in dist.items() if self.lo <= length <= self.hi)
        return masses

    def _continuation(self, k: int, c: int, length: int) -> float:
        """Σ over the rest of C (body slots k.. : inclusion and templates; contents sum to one)
        of its probability, restricted to a total length in the window and to
        ``shared(n_body) == c`` (C's first c phrases, ``length`` words, are the prefix)."""
        key = (k, c, length)
        if key not in self._continuations:
            states = {(length, 0): 1.0}
            for slot in self.body[k:]:
                p_in = self._slot_in(slot, self.required)
                new = defaultdict(float)
                for (n_words, count), mass in states.items():
                    if p_in < 1.0:
                        new[(n_words, count)] += mass * (1.0 - p_in)
                    for tpl in self.templates[slot]:
                        new[(n_words + tpl.length, count + 1)] += mass * p_in * self.template_p[slot][tpl.index]
                states = new
            self._continuations[key] = sum(
                mass for (n_words, count), mass in states.items()
                if self.lo <= n_words <= self.hi and count >= 1 and self._shared(c - 1 + count) == c)
        return self._continuations[key]

    # ------------------------------------------------------------------------ parsing

    def _opener(self, prompt: str) -> str:
        found = [t for t in self.topics if t in prompt.split()]
        if len(found) != 1:
            raise ValueError(f"WorldJudge: the prompt must name exactly one topic of {self.topics}, "
                             f"found {found} in {prompt!r}")
        return f"opener_{found[0]}"

    def _hole_weight(self, category: str, word: str, law: str) -> float:
        senses = self.word_senses.get(category, {}).get(word)
        if not senses:
            return 0.0
        if law == "chosen":
            return sum(self.meaning_p[category][m] * self.form_p[f] for m, f in senses)
        return sum(self.rare_meaning_p[category][m] for m, f in senses if f == 1)

    def _match(self, words: Sequence[str], i: int, slot: str, tpl: _Template, law: str, cache: dict) -> float:
        """Probability of the hole contents that make ``tpl`` read ``words[i:i+len]`` (0: no match)."""
        key = (i, slot, tpl.index, law)
        if key in cache:
            return cache[key]
        weight = 0.0
        if i + tpl.length <= len(words):
            weight = 1.0
            for (is_hole, token), word in zip(tpl.tokens, words[i:i + tpl.length]):
                if is_hole:
                    weight *= self._hole_weight(token, word, law)
                elif token != word:
                    weight = 0.0
                if weight == 0.0:
                    break
        cache[key] = weight
        return weight

    def _answer_forward(self, words, opener, cache):
        """Forward pass over the chosen-style phrases. Returns (final, splits): ``final`` =
        mass of parsing all words; ``splits[k][(i, c)]`` = mass of parsing ``words[:i]`` as c
        phrases whose last one fills body slot k−1 (k=0: the opener), the next slot being k."""
        f = [defaultdict(float) for _ in range(len(self.body) + 1)]
        splits = [defaultdict(float) for _ in range(len(self.body) + 1)]
        for tpl in self.templates[opener]:
            w = self._match(words, 0, opener, tpl, "chosen", cache)
            if w:
                v = self.template_p[opener][tpl.index] * w
                f[0][(tpl.length, 1)] += v
                splits[0][(tpl.length, 1)] += v
        for k, slot in enumerate(self.body):
            p_in = self._slot_in(slot, self.required)
            for (i, c), mass in f[k].items():
                if p_in < 1.0:
                    f[k + 1][(i, c)] += mass * (1.0 - p_in)
                for tpl in self.templates[slot]:
                    w = self._match(words, i, slot, tpl, "chosen", cache)
                    if w:
                        v = mass * p_in * self.template_p[slot][tpl.index] * w
                        f[k + 1][(i + tpl.length, c + 1)] += v
                        splits[k + 1][(i + tpl.length, c + 1)] += v
        final = sum(mass for (i, _), mass in f[-1].items() if i == len(words))
        return final, splits

    def _narrative(self, words, start, cache) -> float:
        """Probability that one ``narrative()`` draw reads exactly ``words[start:]``."""
        states = {start: 1.0}
        for slot in self.narrative_body:
            p_in = self._slot_in(slot, self.narrative_required)
            new = defaultdict(float)
            for i, mass in states.items():
                if p_in < 1.0:
                    new[i] += mass * (1.0 - p_in)
                for tpl in self.templates[slot]:
                    w = self._match(words, i, slot, tpl, "chosen", cache)
                    if w:
                        new[i + tpl.length] += mass * p_in * self.template_p[slot][tpl.index] * w
            states = new
        return states.get(len(words), 0.0)

    def _rare_tail(self, words, start, k, c, prefix_len, cache) -> float:
        """Σ over the replaced phrases of C (body slots k..) of P(C's rest) · P(rare tail reads
        ``words[start:]`` | C's rest), with C's length in the window and shared(n) == c."""
        states = {(start, prefix_len, 0): 1.0}  # (position in y, words of C, replaced phrases)
        for slot in self.body[k:]:
            p_in = self._slot_in(slot, self.required)
            new = defaultdict(float)
            for (i, n_words, count), mass in states.items():
                if p_in < 1.0:
                    new[(i, n_words, count)] += mass * (1.0 - p_in)
                for tpl in self.templates[slot]:  # C's template; the tail's is a function of it
                    if tpl.index not in self.rare_template[slot]:
                        continue
                    rare = self.templates[slot][self.rare_template[slot][tpl.index]]
                    w = self._match(words, i, slot, rare, "rare", cache)
                    if w:
                        key = (i + rare.length, n_words + tpl.length, count + 1)
                        new[key] += mass * p_in * self.template_p[slot][tpl.index] * w
            states = new
        return sum(mass for (i, n_words, count), mass in states.items()
                   if i == len(words) and self.lo <= n_words <= self.hi and count >= 1
                   and self._shared(c - 1 + count) == c)

    # ---------------------------------------------------------------------- public API

    def probability(self, prompt: str, response: str, style: Literal["chosen", "rejected"] = "chosen") -> float:
        """P(the ``style`` generator writes exactly ``response``, compared word by word after
        whitespace splitting, for ``prompt``). See the module docstring."""
        opener = self._opener(prompt)
        words = response.split()
        cache: dict = {}
        z = self._z[opener[len("opener_"):]]
        if style == "chosen":
            if not self.lo <= len(words) <= self.hi:
                return 0.0
            final, _ = self._answer_forward(words, opener, cache)
            return final / z
        if style != "rejected":
            raise ValueError(f"style must be 'chosen' or 'rejected', got {style!r}")
        _, splits = self._answer_forward(words, opener, cache)
        foreign = self.config.rejected_style == "foreign"
        total, narrative = 0.0, {}
        for k, states in enumerate(splits):
            for (i, c), mass in states.items():
                if i >= len(words):
                    continue
                if foreign:
                    if i not in narrative:
                        narrative[i] = self._narrative(words, i, cache)
                    if narrative[i]:
                        total += mass * self._continuation(k, c, i) * narrative[i]
                else:
                    total += mass * self._rare_tail(words, i, k, c, i, cache)
        return total / z

    def log_likelihood(self, prompt: str, response: str, style: Literal["chosen", "rejected"] = "chosen") -> float:
        """``log`` of :meth:`probability` (nats); ``-inf`` when the generator cannot write it."""
        p = self.probability(prompt, response, style)
        return math.log(p) if p > 0 else -math.inf

    def log_ratio(self, prompt: str, response: str) -> float:
        """``max(log p₊, F) − max(log p₋, F)`` with ``F =`` :data:`LOG_FLOOR`; a text *neither*
        generator can write scores ``F`` itself, below every text either one can write (a
        rejected-only text scores ``F − log p₋ > F``). Higher = more chosen-like."""
        lp_c = self.log_likelihood(prompt, response, "chosen")
        lp_r = self.log_likelihood(prompt, response, "rejected")
        if lp_c == lp_r == -math.inf:
            return LOG_FLOOR
        return max(lp_c, LOG_FLOOR) - max(lp_r, LOG_FLOOR)

    score = log_ratio

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """:meth:`log_ratio` of each (prompt, response)."""
        _check_lengths(prompts, responses)
        return np.array([self.log_ratio(p, r) for p, r in zip(prompts, responses)], np.float64)

    def prefers(self, prompt: str, a: str, b: str) -> bool:
        """True when ``a`` scores strictly higher than ``b`` (a tie is not a preference)."""
        return self.log_ratio(prompt, a) > self.log_ratio(prompt, b)


# ------------------------------------------------------------------------------ LM judge


_SEQUENCE_LOGPS = None


def _sequence_logps(model, input_ids, attention_mask, loss_mask, average: bool):
    """Jitted (once per process) summed / mean response log-probs of a batch."""
    global _SEQUENCE_LOGPS
    if _SEQUENCE_LOGPS is None:
        from flax import nnx

        from ldjax import losses

        @nnx.jit(static_argnums=(4,))
        def forward(m, ids, attn, mask, avg):
            return losses.sequence_logps(m(ids, attn), ids, mask, average=avg)

        _SEQUENCE_LOGPS = forward
    return _SEQUENCE_LOGPS(model, input_ids, attention_mask, loss_mask, average)


class LMJudge:
    """A local Hugging Face causal LM as the judge of a user's data.

    Scores a response by its **mean per-token** log-probability given the prompt (default,
    ``reduction="mean"``: a per-token average, so a judge does not simply prefer the shorter
    of two responses) or by the summed log-probability (``reduction="sum"``, SPEC §3's probe
    metric). The EOS token is appended to the response and scored (it says "the response ends
    here"), and a BOS token starts the prompt when the tokenizer has one — the conventions of
    ``ldjax.cli.special_ids`` used in training. With ``reference_dir`` the score is the
    model's minus the reference model's (an implicit-reward ratio, e.g. an SFT-on-chosen model
    against the base model).

    A reward-model head (sequence classification) is out of scope: only causal LMs that
    :func:`ldjax.models.load_pretrained` reads (GPT-NeoX, Qwen2) are supported.

    Args:
      model_dir: directory with ``config.json``, safetensors weights and ``tokenizer.json``.
      reference_dir: optional second such directory (same tokenizer).
      reduction: ``"mean"`` or ``"sum"``.
      batch_size: sequences per forward pass.
    """

    def __init__(self, model_dir, *, reference_dir=None, reduction: Literal["mean", "sum"] = "mean",
                 batch_size: int = 16):
        from ldjax.models import load_pretrained

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model, self.tokenizer = load_pretrained(model_dir)
        if self.tokenizer is None:
            raise ValueError(f"LMJudge: {model_dir} has no tokenizer.json")
        self.reference = load_pretrained(reference_dir)[0] if reference_dir is not None else None
        self.reduction = reduction
        self.batch_size = int(batch_size)
        from ldjax.cli import special_ids

        ids = special_ids(self.tokenizer)
        self.bos_id, self.eos_id, self.pad_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        p = ([self.bos_id] if self.bos_id is not None else []) + list(
            self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        r = list(self.tokenizer.encode(response, add_special_tokens=False).ids) + [self.eos_id]
        if not p:
            raise ValueError("LMJudge: a prompt with no token (and no BOS) leaves the first response token unscored")
        return p + r, len(p)

    def _logps(self, model, input_ids, attention_mask, loss_mask) -> np.ndarray:
        import jax

        return np.asarray(jax.device_get(_sequence_logps(model, input_ids, attention_mask, loss_mask,
                                                         self.reduction == "mean")), np.float64)

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """The score of each (prompt, response) (see the class docstring)."""
        import jax.numpy as jnp

        _check_lengths(prompts, responses)
        rows = [self._encode(p, r) for p, r in zip(prompts, responses)]
        if not rows:
            return np.zeros(0)
        longest = max(len(ids) for ids, _ in rows)
        limit = self.model.config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"LMJudge: a prompt + response has {longest} tokens, more than the model's {limit}")
        length = min(limit, -(-longest // 16) * 16)  # few distinct shapes, few compilations
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            n = self.batch_size
            ids = np.full((n, length), self.pad_id, np.int32)
            attn = np.zeros((n, length), np.int32)
            mask = np.zeros((n, length), np.int32)
            for b, (seq, prompt_len) in enumerate(chunk):
                ids[b, :len(seq)] = seq
                attn[b, :len(seq)] = 1
                mask[b, prompt_len:len(seq)] = 1
            for b in range(len(chunk), n):  # filler rows: a copy of the first (discarded)
                ids[b], attn[b], mask[b] = ids[0], attn[0], mask[0]
            arrays = (jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(mask))
            s = self._logps(self.model, *arrays)
            if self.reference is not None:
                s = s - self._logps(self.reference, *arrays)
            out.append(s[:len(chunk)])
        return np.concatenate(out)

    def score(self, prompt: str, response: str) -> float:
        return float(self.scores([prompt], [response])[0])

    def prefers(self, prompt: str, a: str, b: str) -> bool:
        """True when ``a`` scores strictly higher than ``b``."""
        sa, sb = self.scores([prompt, prompt], [a, b])
        return bool(sa > sb)


# --------------------------------------------------------------------------- smoothed style judge


_STYLE_JUDGES: dict[Any, "StyleNgramJudge"] = {}  # StyleNgramJudge.of_world's fitted judges, by world config


class StyleNgramJudge:
    """The world's two generators as smoothed n-gram models: a graded judge for model generations.

    :class:`WorldJudge` is exact but all-or-nothing: a generation one word outside the grammar
    (a tiny LM mixing two templates) gets ``LOG_FLOOR`` from both generators, so two such
    generations tie. This judge samples ``samples`` responses per topic from the world's own
    chosen-style generator and as many from its rejected-style generator (the grammar of
    ``build_world``, an RNG of its own), fits one word bigram model per style with interpolated
    absolute discounting (discount ``discount``; backed off to an add-one unigram over the world
    tokenizer's words plus the end marker, so every word sequence has a positive probability), and
    scores a response by the log-likelihood ratio ``log p₊(y) − log p₋(y)`` of its words and end.

    The topic's opener is modelled like any other words (the models are shared over topics).
    Each conditional law sums to one over the vocabulary (tested), and the judge is tested like
    :class:`WorldJudge`: on held-out pairs it prefers chosen to rejected ≥ 95 % of the time.
    """

    END = "</s>"
    START = "<s>"

    def __init__(self, world: Any, *, samples: int = 1000, discount: float = 0.75, seed: int = 12345):
        from ldjax.data import world as W

        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        config = getattr(world, "config", world)
        tokenizer = getattr(world, "tokenizer", None)
        grammar = W._Grammar(config, W._rng(config, "grammar"))
        rng = np.random.default_rng(seed)
        texts: dict[str, list[list[str]]] = {"chosen": [], "rejected": []}
        for topic in W.TOPICS:
            for _ in range(samples):
                chosen = grammar.answer(f"opener_{topic}", rng)
                texts["chosen"].append(W.render(chosen).split())
                texts["rejected"].append(W.render(grammar.rejected(chosen, rng)).split())
        vocab = {w for style in texts.values() for t in style for w in t}
        if tokenizer is not None:
            vocab |= set(tokenizer.get_vocab())
        self.vocab = sorted(vocab | {self.END})
        self.discount = discount
        self._models = {style: self._fit(ts) for style, ts in texts.items()}

    @classmethod
    def of_world(cls, world: Any) -> "StyleNgramJudge":
        """The judge of ``world`` (a :class:`ldjax.data.world.World`) with the default settings,
        fitted once per process and world config and shared: fitting samples 12,000 responses
        (seconds of Python), and every judged job of a run asks for the same one. The judge is
        never modified after fitting; callers must not modify it either."""
        config = world.config
        if config not in _STYLE_JUDGES:
            while len(_STYLE_JUDGES) >= 4:  # a few worlds per process at most; drop the oldest
                _STYLE_JUDGES.pop(next(iter(_STYLE_JUDGES)))
            _STYLE_JUDGES[config] = cls(world)
        return _STYLE_JUDGES[config]

    def _fit(self, texts: list[list[str]]) -> dict[str, Any]:
        unigram: dict[str, int] = defaultdict(int)
        bigram: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for words in texts:
            seq = [self.START, *words, self.END]
            for a, b in zip(seq[:-1], seq[1:]):
                unigram[b] += 1
                bigram[a][b] += 1
        total = sum(unigram.values()) + len(self.vocab)
        return {"unigram": {w: (unigram.get(w, 0) + 1) / total for w in self.vocab}, "floor": 1 / total,
                "bigram": {a: (dict(nexts), sum(nexts.values())) for a, nexts in bigram.items()}}

    def conditional(self, style: str, history: str, word: str) -> float:
        """``p_style(word | previous word)`` (the start of a response is ``<s>``)."""
        model = self._models[style]
        base = model["unigram"].get(word, model["floor"])
        if history not in model["bigram"]:
            return base
        nexts, count = model["bigram"][history]
        return (max(nexts.get(word, 0) - self.discount, 0.0) + self.discount * len(nexts) * base) / count

    def log_likelihood(self, response: str, style: Literal["chosen", "rejected"] = "chosen") -> float:
        seq = [self.START, *response.split(), self.END]
        return float(sum(math.log(self.conditional(style, a, b)) for a, b in zip(seq[:-1], seq[1:])))

    def log_ratio(self, prompt: str, response: str) -> float:
        del prompt  # the styles do not depend on the prompt beyond the opener words
        return self.log_likelihood(response, "chosen") - self.log_likelihood(response, "rejected")

    score = log_ratio

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        _check_lengths(prompts, responses)
        return np.asarray([self.log_ratio(p, r) for p, r in zip(prompts, responses)])

    def prefers(self, prompt: str, a: str, b: str) -> bool:
        return self.log_ratio(prompt, a) > self.log_ratio(prompt, b)

    def token_tables(self, token_ids: dict[str, int], vocab_size: int,
                     special_tokens: Sequence[str] = ()) -> "TokenJudgeTables":
        """This judge's log-ratio as tables over a word-level tokenizer's ids, for
        :func:`token_judge_scores` (the same score, computed inside ``jit``).

        Args:
          token_ids: word → token id (``tokenizer.get_vocab()``).
          vocab_size: the model's vocabulary (ids beyond the tokenizer's are never words).
          special_tokens: tokens that ``decode(..., skip_special_tokens=True)`` drops: skipped.
        """
        ratio = {}
        for style in ("chosen", "rejected"):
            model = self._models[style]
            unigram = np.full(vocab_size + 1, model["floor"])  # column vocab_size = the end marker
            for word, i in token_ids.items():
                if i < vocab_size:
                    unigram[i] = model["unigram"].get(word, model["floor"])
            unigram[vocab_size] = model["unigram"].get(self.END, model["floor"])
            index = {w: i for w, i in token_ids.items() if i < vocab_size}
            index[self.END] = vocab_size

            def row(history: str) -> np.ndarray:
                if history not in model["bigram"]:
                    return unigram.copy()
                nexts, count = model["bigram"][history]
                out = self.discount * len(nexts) * unigram
                for word, n in nexts.items():
                    if word in index:
                        out[index[word]] += max(n - self.discount, 0.0)
                return out / count

            start = row(self.START)
            pairs = np.stack([unigram] * vocab_size)
            for word, i in index.items():
                if word != self.END:
                    pairs[i] = row(word)
            ratio[style] = (np.log(start), np.log(pairs))
        (s_c, p_c), (s_r, p_r) = ratio["chosen"], ratio["rejected"]
        is_word = np.zeros(vocab_size, bool)
        for word, i in token_ids.items():
            if i < vocab_size and word not in special_tokens:
                is_word[i] = True
        return TokenJudgeTables(start=(s_c - s_r)[:vocab_size].astype(np.float32),
                                pairs=(p_c - p_r)[:, :vocab_size].astype(np.float32),
                                end=(p_c - p_r)[:, vocab_size].astype(np.float32),
                                start_end=np.float32((s_c - s_r)[vocab_size]), is_word=is_word)


@dataclasses.dataclass(frozen=True)
class TokenJudgeTables:
    """A word-bigram judge's log-ratio over token ids (:meth:`StyleNgramJudge.token_tables`).

    Attributes:
      start: (V,) the ratio of a response's first word.
      pairs: (V, V) ``[a, b]``: the ratio of word ``b`` after word ``a``.
      end: (V,) the ratio of the end marker after word ``a``.
      start_end: the ratio of an empty response (the end marker first).
      is_word: (V,) False for the tokens decoding drops (specials), which are skipped.
    """

    start: np.ndarray
    pairs: np.ndarray
    end: np.ndarray
    start_end: np.float32
    is_word: np.ndarray


def token_judge_scores(tables: TokenJudgeTables, input_ids, loss_mask, eos_id: int | None):
    """The judge's log-ratio of every response of a token batch, jit-compatible.

    The response is the scored tokens of ``loss_mask`` (the sampler's convention) up to the
    first ``eos_id``; special tokens are skipped as ``decode(skip_special_tokens=True)`` drops
    them; the end marker closes it whether or not EOS was sampled. Equals
    ``judge.scores(prompts, decoded responses)`` (tested).

    Args:
      tables: :class:`TokenJudgeTables`.
      input_ids: (B, T) int.
      loss_mask: (B, T) the response tokens.
      eos_id: the end-of-sequence id, or None.

    Returns:
      (B,) float32 log-ratios (higher = more chosen-like).
    """
    import jax
    import jax.numpy as jnp

    start, pairs, end = jnp.asarray(tables.start), jnp.asarray(tables.pairs), jnp.asarray(tables.end)
    is_word = jnp.asarray(tables.is_word)
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    scored = jnp.asarray(loss_mask).astype(bool)
    b = ids.shape[0]

    def step(carry, column):
        prev, done, total = carry  # prev = -1: no word yet
        tok, live = column
        live = live & ~done
        closes = live & (tok == eos_id) if eos_id is not None else jnp.zeros_like(live)
        word = live & ~closes & is_word[tok]
        gain = jnp.where(prev < 0, start[tok], pairs[jnp.maximum(prev, 0), tok])
        total = total + jnp.where(word, gain, 0.0)
        prev = jnp.where(word, tok, prev)
        return (prev, done | closes, total), None

    init = (jnp.full((b,), -1, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
    (prev, _, total), _ = jax.lax.scan(step, init, (ids.T, scored.T))
    return total + jnp.where(prev < 0, tables.start_end, end[jnp.maximum(prev, 0)])


# ------------------------------------------------------------------------------ win rate


class Judge(Protocol):
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


def _check_lengths(prompts: Sequence[str], *responses: Sequence[str]) -> None:
    for r in responses:
        if len(r) != len(prompts):
            raise ValueError(f"need one response per prompt: {len(prompts)} prompts, {len(r)} responses")


def binomial_interval(successes: float, n: int, *, confidence: float = 0.95,
                      method: Literal["wilson", "clopper-pearson"] = "wilson") -> tuple[float, float]:
    """Two-sided binomial confidence interval for a proportion ``successes / n``.

    ``"wilson"``: the Wilson score interval (no continuity correction), as
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. ``"clopper-pearson"``: the
    exact (beta-quantile) interval, as ``proportion_ci(method="exact")``. Both formulas accept a
    non-integer count (ties counted half in :func:`win_rate`).
    """
    from scipy import stats

    if n <= 0:
        raise ValueError(f"need n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}, {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if method == "wilson":
        z = float(stats.norm.ppf(1 - alpha / 2))
        p = successes / n
        denom = 1 + z * z / n
        center = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return max(0.0, center - half), min(1.0, center + half)
    if method == "clopper-pearson":
        low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
        high = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
        return low, high
    raise ValueError(f"method must be 'wilson' or 'clopper-pearson', got {method!r}")


@dataclasses.dataclass(frozen=True)
class WinRate:
    """Outcome of pairwise comparisons of A against B.

    ``rate = (wins + ties / 2) / n``: a tie (equal scores — identical texts, or two texts
    neither world generator can write) counts as half a win, so A = B gives 0.5. The interval
    treats ``wins + ties / 2`` as a binomial count out of ``n`` (``method`` names the
    interval; ``confidence`` its level); with many ties it is somewhat too wide, since a tie
    carries less variance than a coin flip.
    """

    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95
    method: str = "wilson"

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @classmethod
    def from_counts(cls, wins: int, ties: int, losses: int, *, confidence: float = 0.95,
                    method: str = "wilson") -> "WinRate":
        n = wins + ties + losses
        successes = wins + 0.5 * ties
        low, high = binomial_interval(successes, n, confidence=confidence, method=method)
        return cls(int(wins), int(ties), int(losses), successes / n, low, high, confidence, method)

    def __str__(self) -> str:
        return (f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.method} {self.confidence:.0%}; "
                f"{self.wins} wins, {self.ties} ties, {self.losses} losses of {self.n})")


def win_rate(judge: Any, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
             confidence: float = 0.95, method: Literal["wilson", "clopper-pearson"] = "wilson") -> WinRate:
    """How often ``responses_a[i]`` beats ``responses_b[i]`` for ``prompts[i]`` under ``judge``
    (a :class:`WorldJudge`, :class:`LMJudge` or anything with ``scores(prompts, responses)``):
    a win when A's score is strictly higher, a tie when equal. See :class:`WinRate`."""
    _check_lengths(prompts, responses_a, responses_b)
    if not prompts:
        raise ValueError("win_rate needs at least one prompt")
    sa = np.asarray(judge.scores(prompts, responses_a), np.float64)
    sb = np.asarray(judge.scores(prompts, responses_b), np.float64)
    wins, losses = int(np.sum(sa > sb)), int(np.sum(sa < sb))
    return WinRate.from_counts(wins, len(prompts) - wins - losses, losses, confidence=confidence, method=method)


def pool_win_rates(results: Sequence[WinRate], *, confidence: float | None = None,
                   method: str | None = None) -> WinRate:
    """One :class:`WinRate` over several seeds' comparisons: counts summed, the interval over
    the pooled n. It treats every comparison as independent, so it reflects prompt-sampling
    noise, not seed-to-seed variation of training; report the per-seed rates beside it."""
    if not results:
        raise ValueError("pool_win_rates needs at least one WinRate")
    return WinRate.from_counts(sum(r.wins for r in results), sum(r.ties for r in results),
                               sum(r.losses for r in results),
                               confidence=results[0].confidence if confidence is None else confidence,
                               method=results[0].method if method is None else method)


__all__ = ["LOG_FLOOR", "WorldJudge", "StyleNgramJudge", "TokenJudgeTables", "token_judge_scores", "LMJudge", "WinRate", "win_rate", "pool_win_rates", "binomial_interval"]
