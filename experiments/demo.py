"""The main job (``make demo``): every CPU-scale result of ldjax on the embedded data, one report.

Runs, each into its own subfolder of ``--out``:

- ``squeeze_logreg``: the squeezing effect of a negative gradient on linear softmax regression
  (SPEC §2), and whether the lemma's threshold predicts the rising classes exactly;
- ``first_order``: the gap between the first-order prediction and the real step as a function
  of η, for SGD and Adam (slope 2 on log-log, ratio ≈ 4 per halving);
- ``mnist_dynamics``: the per-step A·K·G decomposition while a LeNet learns MNIST.

then writes ``out/report.md`` linking every sub-report with its headline numbers. An experiment
that fails is reported (with its traceback) and the others still run; the command then exits
with status 1.

Run: ``python -m experiments.demo --out results``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import sys
import time
import traceback
from typing import Any, Callable

from tqdm.auto import tqdm

from ldjax.config import parse_config, to_dict

EXPERIMENTS = ("squeeze_logreg", "first_order", "mnist_dynamics")

# Small settings for a smoke run (``--quick true``); fields a Config does not have are skipped.
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    # The V=1000, d=50 panel is kept at full size: it is a must-show panel and takes ~4 s.
    "squeeze_logreg": dict(sweep_samples=40),
    # first_order's defaults already take ~10 s, and its halving ratios need the small-η end of the grid.
    "first_order": {},
    "mnist_dynamics": dict(model="mlp", mlp_hidden=(32,), train_per_class=40, observed_per_class=3,
                           steps=24, batch_size=16, analyse_every=6, checkpoints=2, ntk_per_class=2,
                           ntk_batch_size=20),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Runs every CPU-scale ldjax experiment and writes one summary report."""

    out: str = dataclasses.field(default="results", metadata={"help": "output directory (one subfolder each)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed passed to every experiment"})
    only: tuple[str, ...] = dataclasses.field(
        default=EXPERIMENTS, metadata={"help": f"experiments to run, a subset of {list(EXPERIMENTS)}"})
    quick: bool = dataclasses.field(
        default=False, metadata={"help": "tiny settings (seconds each) for a smoke test, not for results"})

    def __post_init__(self):
        unknown = [name for name in self.only if name not in EXPERIMENTS]
        if unknown:
            raise ValueError(f"Config.only has unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
        if not self.only:
            raise ValueError("Config.only is empty: name at least one experiment")


# ----------------------------------------------------------------------------- headlines


def _fmt(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _headline_squeeze(r: dict) -> list[str]:
    panels = r["panels"]
    lines = [f"threshold rule predicted the rising classes exactly in all {len(panels)} panels: "
             f"**{r['all_panels_rule_exact']}**"]
    for p in panels:
        lines.append(f"{p['name']}: {p['n_risers']} classes rose, gain of y* {_fmt(p.get('argmax_gain'))}, "
                     f"rule exact {p['rule_holds_exact']}")
    return lines


def _headline_first_order(r: dict) -> list[str]:
    lines = [f"every halving ratio of the gap in [3, 5]: **{r['all_ratios_in_3_5']}**"]
    for s in r["results"]:
        lines.append(f"{s['optimizer']}: log-log slope {s['loglog_slope']:.3f}, ratios for η → η/2 "
                     + ", ".join(f"{q:.2f}" for q in s["halving_ratios"]))
    return lines


def _headline_mnist(r: dict) -> list[str]:
    pairs = lambda items: ", ".join(f"{p['pair'][0]}↔{p['pair'][1]}" for p in items[:3])
    return [
        f"held-out accuracy {r['final_heldout_accuracy']:.3f} after {r['config']['steps']} SGD steps",
        f"predicted vs actual Δ log π: Pearson r = **{r['pearson_predicted_actual']:.4f}** over "
        f"{r['num_analysed_steps']} decomposed steps; gap ratio for η → η/2 at the end "
        + ", ".join(f"{q:.2f}" for q in r["final_gap_ratios_halving_lr"]),
        f"explicit A·K·G = implicit route to {r['decompose_vs_implicit_max_abs']:.1e}",
        f"top class pairs: per-step influence {pairs(r['top_influence_pairs'])}; accumulated "
        f"{pairs(r['top_accumulated_pairs'])}; eNTK (normalised) {pairs(r['top_ntk_pairs_normalized'])}",
    ]


def _headline_generic(r: dict) -> list[str]:
    return [f"{k}: {_fmt(v)}" for k, v in r.items() if isinstance(v, (bool, int, float, str))][:8]


HEADLINES: dict[str, Callable[[dict], list[str]]] = {
    "squeeze_logreg": _headline_squeeze,
    "first_order": _headline_first_order,
    "mnist_dynamics": _headline_mnist,
}


def headline(name: str, result: dict) -> list[str]:
    """Bullet lines of the numbers that matter; falls back to top-level scalars if keys moved."""
    try:
        return HEADLINES[name](result)
    except (KeyError, TypeError, IndexError) as e:
        return [f"(headline keys not found: {e!r})"] + _headline_generic(result)


# ----------------------------------------------------------------------------- running


def experiment_config(name: str, out: pathlib.Path, seed: int, quick: bool) -> Any:
    """The experiment's own ``Config`` with ``out``, ``seed`` and (if quick) the small settings."""
    module = importlib.import_module(f"experiments.{name}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values: dict[str, Any] = {"out": str(out / name)}
    if "seed" in fields:
        values["seed"] = seed
    if quick:
        values.update({k: v for k, v in QUICK_OVERRIDES.get(name, {}).items() if k in fields})
    return module.Config(**values)


def run_one(name: str, out: pathlib.Path, seed: int, quick: bool) -> dict[str, Any]:
    """Runs one experiment; failures are caught and returned, never raised."""
    t0 = time.perf_counter()
    try:
        config = experiment_config(name, out, seed, quick)
        result = importlib.import_module(f"experiments.{name}").main(config)
        return {"status": "ok", "seconds": time.perf_counter() - t0, "headline": headline(name, result)}
    except Exception:  # noqa: BLE001 — one failing experiment must not lose the others' results
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": traceback.format_exc()}


def write_report(out: pathlib.Path, config: Config, summary: dict[str, dict[str, Any]]) -> pathlib.Path:
    lines = ["# ldjax demo: learning dynamics on the embedded data", "",
             "Each experiment wrote PNG figures, `results.json` and `report.md` into its own folder.",
             ""]
    if config.quick:
        lines += ["**Quick smoke settings (`--quick`): the numbers below are not results.**", ""]
    for name, s in summary.items():
        lines.append(f"## [{name}]({name}/report.md) — {s['status']}, {s['seconds']:.0f} s")
        lines.append("")
        if s["status"] == "ok":
            lines += [f"- {line}" for line in s["headline"]]
        else:
            lines += ["```", s["error"].rstrip(), "```"]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(config: Config) -> dict[str, Any]:
    """Runs the selected experiments into ``config.out/<name>/`` and writes ``config.out/report.md``."""
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, Any]] = {}
    for name in tqdm(config.only, desc="demo", unit="experiment"):
        tqdm.write(f"--- {name} ---")
        summary[name] = run_one(name, out, config.seed, config.quick)
        if summary[name]["status"] != "ok":
            tqdm.write(f"{name} FAILED:\n{summary[name]['error']}")
    report = write_report(out, config, summary)
    (out / "summary.json").write_text(json.dumps({"config": to_dict(config), "experiments": summary}, indent=1))
    failed = [n for n, s in summary.items() if s["status"] != "ok"]
    print(f"\nResults: {report.resolve()} (figures and numbers in {out.resolve()}/<experiment>/)"
          + (f"\nFAILED: {', '.join(failed)}" if failed else ""))
    return {"report": str(report), "failed": failed, "experiments": summary}


if __name__ == "__main__":
    sys.exit(1 if main(parse_config(Config))["failed"] else 0)
