"""The ``claims.json`` convention every experiment follows (collected by the main job).

Each experiment writes ``OUT/claims.json``: a list of rows

    {"experiment": str, "claim": str, "kind": "check" | "paper", "passed": bool,
     "value": {...effect size and its spread...}, "seeds": [int, ...]}

- ``kind="check"``: something ldjax guarantees (exactness, a theorem where its premise holds,
  a first-order gap ratio). It must pass; a failing check is a bug.
- ``kind="paper"``: a claim of the paper (SPEC §3) measured on the data. It passes or fails as
  measured; a failing one stays in the file and the experiment's report explains it.

``value`` holds the effect size: for a per-seed quantity use :func:`effect`, which keeps every
seed's number with the mean, standard deviation, min and max, so the spread over seeds is
always visible next to the verdict.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Iterable, Sequence

KINDS = ("check", "paper")


class ClaimError(ValueError):
    """A claim row that does not follow the convention."""


@dataclasses.dataclass(frozen=True)
class Claim:
    experiment: str
    claim: str
    kind: str
    passed: bool
    value: Any
    seeds: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ClaimError(f"claim {self.claim!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.experiment or not self.claim:
            raise ClaimError("a claim needs a non-empty experiment name and claim text")
        if not isinstance(self.passed, bool):
            raise ClaimError(f"claim {self.claim!r}: passed must be a bool, got {self.passed!r}")
        if not self.seeds:
            raise ClaimError(f"claim {self.claim!r}: list the seeds it was measured on")

    def to_json(self) -> dict:
        return {"experiment": self.experiment, "claim": self.claim, "kind": self.kind,
                "passed": self.passed, "value": _jsonable(self.value), "seeds": list(self.seeds)}


def effect(per_seed: Sequence[float], **extra: Any) -> dict:
    """An effect size over seeds: ``{"per_seed", "mean", "std", "min", "max", **extra}``."""
    values = [float(v) for v in per_seed]
    if not values:
        raise ClaimError("effect() needs at least one value")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) if len(values) > 1 else 0.0
    return {"per_seed": values, "mean": mean, "std": std, "min": min(values), "max": max(values), **extra}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_claims(out: str | pathlib.Path, claims: Iterable[Claim]) -> pathlib.Path:
    """Writes ``out/claims.json`` and returns its path."""
    path = pathlib.Path(out) / "claims.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.to_json() for c in claims], indent=2) + "\n")
    return path


def read_claims(path: str | pathlib.Path) -> list[dict]:
    """Reads and validates a ``claims.json`` (raises :class:`ClaimError` naming the row)."""
    rows = json.loads(pathlib.Path(path).read_text())
    if not isinstance(rows, list):
        raise ClaimError(f"{path}: expected a list of claim rows")
    for i, row in enumerate(rows):
        missing = {"experiment", "claim", "kind", "passed", "value", "seeds"} - set(row)
        if missing:
            raise ClaimError(f"{path}: row {i} lacks {sorted(missing)}")
        Claim(**{k: row[k] for k in ("experiment", "claim", "kind", "passed", "value")}, seeds=tuple(row["seeds"]))
    return rows


def claims_table(rows: Sequence[dict]) -> str:
    """A Markdown table of claim rows: verdict, kind, claim, effect (mean ± std), seeds."""
    lines = ["| | kind | experiment | claim | value | seeds |", "|---|---|---|---|---|---|"]
    for row in rows:
        value = row["value"]
        if isinstance(value, dict) and "mean" in value:
            shown = f"{value['mean']:.4g} ± {value['std']:.2g}"
        else:
            shown = json.dumps(value)[:80]
        lines.append(f"| {'PASS' if row['passed'] else 'FAIL'} | {row['kind']} | {row['experiment']} | "
                     f"{row['claim']} | {shown} | {len(row['seeds'])} |")
    return "\n".join(lines)
