"""Sharper start, stronger squeeze (SPEC §3): off-policy DPO after a short vs a long SFT.

The paper: DPO from a model SFT'd longer (10 vs 1 epochs) makes chosen fall sooner and further and
the argmax path y* rise faster. Here, per seed, two starts from the same base model: a **short**
SFT of ``short_epochs`` epoch(s) and the **long** SFT of :mod:`experiments.sft_dynamics` (the
pipeline's, 8 epochs on the embedded world; the same cached stage), then the same full-parameter
off-policy DPO from each (:func:`experiments.dpo_dynamics.dpo_stage`, so the long start's DPO is
dpo_dynamics' own cached job). The "sharpness" of each start is measured on the probes at DPO
start: mean ‖A‖_F along chosen (``‖A‖_F² = V‖π‖² + V − 2`` per position) and the off-argmax
log-mass ``Σ log(1 − max π)`` (more negative = peakier).

Claims (kind="paper", ≥ 3 seeds): the long start is sharper; from it chosen falls further
(end − start of DPO) and sooner (the step where chosen first drops 1 nat below its start, as a
fraction of the run); y* along chosen rises more. kind="check": the first-order prediction tracks
the actual one-step change at the decomposed DPO steps of both runs.

Run: ``python -m experiments.sharpness --out results/sharpness`` (CPU, shares the pipeline cache of
sft_dynamics/dpo_dynamics in ``--run-dir``); ``--quick true``; ``--data FILE``; ``--model DIR``;
``--preset paper --model PYTHIA_DIR --data HH.jsonl`` (GPU/TPU).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

from experiments.claims import Claim, claims_table, effect, write_claims
from experiments.dpo_dynamics import dpo_overrides, dpo_stage
from experiments.lm_pipeline import DPOExperimentConfig, open_experiment, Pipeline, read_curves, seed_band
from experiments.sft_dynamics import first_order_check, sft_stage
from ldjax.config import parse_config, to_dict

EXPERIMENT = "sharpness"
TOL = 0.1  # nats
STARTS = ("short", "long")


@dataclasses.dataclass(frozen=True)
class Config(DPOExperimentConfig):
    """DPO from a short vs a long SFT: does the sharper start squeeze harder?"""

    out: str = dataclasses.field(default="results/sharpness", metadata={"help": "output directory"})
    short_epochs: float = dataclasses.field(default=1.0, metadata={"help": "epochs of the short SFT (the long one is the pipeline's)"})

    def __post_init__(self):
        super().__post_init__()
        if self.short_epochs <= 0:
            raise ValueError(f"Config.short_epochs must be > 0, got {self.short_epochs}")


def epoch_steps(pipeline: Pipeline, data_rows: int) -> int:
    """Optimizer steps of one SFT epoch over ``data_rows`` training pairs."""
    return max(1, data_rows // pipeline.config.batch_size)


def training_rows(stage) -> int:
    """Training examples of a finished SFT stage (``num_train_examples`` of its summary)."""
    return int(stage.summary["num_train_examples"])


def first_drop(y, drop: float = 1.0) -> float:
    """Fraction of the run before the curve first lies ``drop`` nats below its start (1 if never)."""
    y = np.asarray(y, float) - y[0]
    below = np.nonzero(y <= -drop)[0]
    return float(below[0] / max(1, len(y) - 1)) if len(below) else 1.0


def start_sharpness(curves: dict[str, Any]) -> dict[str, float]:
    """‖A‖_F and off-argmax log-mass along chosen at step 0 of a DPO run (its starting model)."""
    return {"a_norm": float(curves["a_norm"][0]), "off_argmax": float(curves["off_argmax"][0]),
            "argmax_minus_chosen": float(curves["logps"]["argmax_chosen"][0] - curves["logps"]["chosen"][0])}


def outcome(curves: dict[str, Any]) -> dict[str, float]:
    lp = curves["logps"]
    return {"d_chosen": float(lp["chosen"][-1] - lp["chosen"][0]), "d_rejected": float(lp["rejected"][-1] - lp["rejected"][0]),
            "d_argmax": float(lp["argmax_chosen"][-1] - lp["argmax_chosen"][0]),
            "chosen_drop_at": first_drop(lp["chosen"]), **start_sharpness(curves)}


def claims(per_seed: dict[str, list[dict[str, float]]], seeds: list[int]) -> list[Claim]:
    s, l_ = per_seed["short"], per_seed["long"]

    def diff(key):
        return [b[key] - a[key] for a, b in zip(s, l_)]  # long − short

    rows = [
        Claim(EXPERIMENT, "the longer SFT starts DPO sharper: higher ‖A‖_F along chosen (long − short)", "paper",
              min(diff("a_norm")) > 0, effect(diff("a_norm"), off_argmax_long_minus_short=effect(diff("off_argmax"))),
              tuple(seeds)),
        Claim(EXPERIMENT, "from the sharper start chosen falls further during DPO (Δchosen long − short, nats)", "paper",
              max(diff("d_chosen")) < -TOL, effect(diff("d_chosen"), short=effect([o["d_chosen"] for o in s]),
                                                   long=effect([o["d_chosen"] for o in l_])), tuple(seeds)),
        Claim(EXPERIMENT, "from the sharper start chosen falls sooner (fraction of the run before chosen is 1 nat below "
                          "its start, long − short)", "paper", max(diff("chosen_drop_at")) < 0,
              effect(diff("chosen_drop_at"), short=effect([o["chosen_drop_at"] for o in s]),
                     long=effect([o["chosen_drop_at"] for o in l_])), tuple(seeds)),
        Claim(EXPERIMENT, "from the sharper start the argmax path y* rises more (Δy* long − short, nats)", "paper",
              min(diff("d_argmax")) > TOL, effect(diff("d_argmax"), short=effect([o["d_argmax"] for o in s]),
                                                  long=effect([o["d_argmax"] for o in l_])), tuple(seeds)),
    ]
    return rows


def plot(curves: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
    """Δ from DPO start of chosen, rejected and y* along chosen, short vs long start (mean, min–max band)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, family in zip(axes, ("chosen", "rejected", "argmax_chosen")):
        for i, start in enumerate(STARTS):
            ys = [np.asarray(c["logps"][family], float) - c["logps"][family][0] for c in curves[start]]
            seed_band(ax, curves[start][0]["steps"], ys, color=f"C{i}", label=f"{start} SFT")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{family} (change from DPO start)", fontsize=9)
        ax.set_xlabel("DPO step", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: Config) -> dict[str, Any]:
    """Short and long SFT, DPO from each, per seed; writes sharpness.png, results.json, claims.json, report.md."""
    t0 = time.perf_counter()
    out, pcfg, pipeline = open_experiment(config)
    overrides = dpo_overrides(config)
    seeds = list(config.seeds)
    curves: dict[str, list] = {s: [] for s in STARTS}
    per_seed: dict[str, list] = {s: [] for s in STARTS}
    records, sft_steps = [], {}
    for seed in seeds:
        base, long_sft = sft_stage(pipeline, seed, config.sft_decompose_every)
        steps = max(1, int(round(config.short_epochs * epoch_steps(pipeline, training_rows(long_sft)))))
        sft_steps = {"short": steps, "long": pcfg.sft_steps}
        short_sft = pipeline.sft(seed, base, name=f"sft_{steps}steps", num_steps=steps)
        for start, origin in (("short", short_sft), ("long", long_sft)):
            # the long start's DPO is dpo_dynamics' job from its SFT model ("dpo_sft_full")
            stage = dpo_stage(pipeline, seed, origin, "sft" if start == "long" else f"sft{steps}", "full", overrides,
                              config.decompose_every)
            c = read_curves(stage)
            curves[start].append(c)
            per_seed[start].append(outcome(c))
            records += [(seed, step, r) for step, r in c["decompose"]]
            o = per_seed[start][-1]
            print(f"[sharpness] seed {seed} {start}: ‖A‖ {o['a_norm']:.2f}, Δchosen {o['d_chosen']:+.2f}, "
                  f"Δy* {o['d_argmax']:+.2f}", file=sys.stderr, flush=True)
    rows = claims(per_seed, seeds)
    check, check_value = first_order_check(records, seeds, EXPERIMENT, "DPO from both starts")
    rows.append(check)
    write_claims(out, rows)
    plot(curves, out / "sharpness.png")
    wall = time.perf_counter() - t0
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "dpo_overrides": overrides, "seeds": seeds,
               "sft_steps": sft_steps, "per_seed": per_seed, "curves": curves, "first_order": check_value,
               "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, overrides, sft_steps, per_seed, rows, wall))
    return results


def report(config, pcfg, overrides, sft_steps, per_seed, rows, wall) -> str:
    def fmt(start, key):
        v = [o[key] for o in per_seed[start]]
        return f"{np.mean(v):+.3g} ± {np.std(v):.2g}"

    opt = overrides or {"optimizer": pcfg.optimizer, "learning_rate": pcfg.dpo_lr}
    lines = [f"# Sharper start, stronger squeeze ({'quick' if config.quick else config.preset})", "",
             f"Data: {pcfg.data or 'the embedded world'}. SFT: short {sft_steps.get('short')} steps "
             f"({config.short_epochs:g} epoch) vs long {sft_steps.get('long')} steps (the pipeline's), "
             f"{pcfg.optimizer} lr {pcfg.sft_lr}; then full-parameter off-policy DPO, {opt['optimizer']} lr "
             f"{opt['learning_rate']}, {pcfg.dpo_steps} steps, β {pcfg.beta}. Seeds {list(config.seeds)}. "
             f"Wall time {wall:.0f} s.", "", "![sharpness](sharpness.png)", "",
             "| start | ‖A‖_F at DPO start | off-argmax log-mass | y* − chosen at start | Δ chosen | chosen 1 nat down at | Δ y* | Δ rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for start in STARTS:
        lines.append(f"| {start} | {fmt(start, 'a_norm')} | {fmt(start, 'off_argmax')} | "
                     f"{fmt(start, 'argmax_minus_chosen')} | {fmt(start, 'd_chosen')} | {fmt(start, 'chosen_drop_at')} | "
                     f"{fmt(start, 'd_argmax')} | {fmt(start, 'd_rejected')} |")
    lines += ["", "## Claims", "", claims_table([r.to_json() for r in rows]), ""]
    failed = [r for r in rows if r.kind == "paper" and not r.passed]
    if failed:
        s, l_ = per_seed["short"], per_seed["long"]
        d_a = float(np.mean([b["a_norm"] - a["a_norm"] for a, b in zip(s, l_)]))
        d_gap = float(np.mean([b["argmax_minus_chosen"] - a["argmax_minus_chosen"] for a, b in zip(s, l_)]))
        premise = ("the longer start is *flatter* along chosen, not sharper (sft_dynamics: SFT on the world's "
                   "interchangeable phrases spreads the next-token mass), so the paper's premise does not hold here"
                   if d_a < 0 else "the longer start is the sharper one, so the premise holds")
        lines += ["## Explanation", "",
                  f"Not reproduced as measured: {'; '.join(r.claim for r in failed)}. The long SFT changed the DPO start "
                  f"by ‖A‖_F {d_a:+.3f} and the gap y* − chosen by {d_gap:+.1f} nats: {premise}. dpo_dynamics' "
                  "per-step decomposition (its report) says which term and which parameters move chosen and y*.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.sharpness"))
