"""Probe curves during SFT (SPEC §3) and the per-step A·K·G decomposition of a few steps.

For each seed the shared pipeline (:mod:`experiments.lm_pipeline`) pretrains (or reuses) a base
model and runs SFT on (prompt, chosen) with probe tracking: every family of SPEC §3 (chosen,
rejected, rephrases, format-kept, other_train, other_test, random, shuffled) and the argmax
path ``y*``, with ‖A‖_F and the off-argmax log-mass along chosen. At every
``decompose_every``-th tracked step, the tracker's ``decompose_fn`` takes the parameters before
and after that step: the first-order change ``A J_o u`` of every probe family along the update
``u`` really taken (:func:`ldjax.sequence_dynamics.predict_for_update`) against the actual
change (:func:`ldjax.sequence_dynamics.actual_change`).

Outputs in ``--out``: ``sft_curves.png`` (one panel per family, spread over seeds),
``sft_decomposition.png`` (predicted vs actual per family and step), ``results.json``,
``claims.json`` (the paper's SFT claims, kind "paper"; the first-order check, kind "check"),
``report.md``.

Run: ``python -m experiments.sft_dynamics --out results/sft_dynamics`` (CPU, a few minutes);
``--quick true`` (seconds); ``--data FILE.jsonl`` (HH / UltraFeedback / plain pairs);
``--model DIR`` (a local Hugging Face model: no pretraining); ``--preset paper --model PYTHIA_DIR
--data HH.jsonl`` (Pythia-410M, RMSprop 5e-7, for a GPU/TPU).
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
from experiments.lm_pipeline import (ExperimentConfig, open_experiment, Pipeline, PipelineConfig, Stage, decomposition_hook, plot_curves, read_curves, rise_then_fall, rising_fraction)
from ldjax.config import parse_config, to_dict
from ldjax.sequence_dynamics import SFTObjective

EXPERIMENT = "sft_dynamics"
TOL = 0.1  # nats: a rise or fall smaller than this is not counted
UP_THEN_DOWN = ("rejected", "chosen_rephrase", "rejected_rephrase", "other_test")
FALLING = ("shuffled_chosen", "shuffled_other", "random_sentence")
CHECK_MIN_CORRELATION = 0.95
CHECK_MAX_RELATIVE_GAP = 0.25


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """SFT probe dynamics over seeds (SPEC §3) with a per-step first-order decomposition."""

    out: str = dataclasses.field(default="results/sft_dynamics", metadata={"help": "output directory"})
    decompose_every: int = dataclasses.field(default=4, metadata={"help": "decompose every k-th tracked step"})

    def __post_init__(self):
        super().__post_init__()
        if self.decompose_every < 1:
            raise ValueError("Config.decompose_every must be >= 1")


def sft_stage(pipeline: Pipeline, seed: int, decompose_every: int) -> tuple[Stage, Stage]:
    """``(base, sft)`` of one seed: the SFT run with per-step decomposition records (cached)."""
    base = pipeline.base(seed)
    hook = decomposition_hook(SFTObjective(), every=decompose_every, split_families=())
    sft = pipeline.sft(seed, base, tag=f"decompose:every={decompose_every}", tracker_hook=hook)
    return base, sft


def sft_claims(curves: list[dict[str, Any]], seeds: list[int]) -> tuple[list[Claim], dict[str, Any]]:
    """The SPEC §3 SFT claims from each seed's probe curves, and the numbers behind them."""
    rows: list[Claim] = []
    numbers: dict[str, Any] = {}

    def add(claim: str, per_seed: list[float], passed: bool, **extra: Any) -> None:
        rows.append(Claim(EXPERIMENT, claim, "paper", bool(passed), effect(per_seed, **extra), tuple(seeds)))
        numbers[claim] = rows[-1].value

    logps = [c["logps"] for c in curves]
    delta = {f: [float(l[f][-1] - l[f][0]) for l in logps] for f in logps[0]}
    add("SFT: chosen log-prob rises (end - start, nats)", delta["chosen"], min(delta["chosen"]) > TOL)
    for family in UP_THEN_DOWN:
        if family not in logps[0]:
            continue
        rf = [rise_then_fall(l[family]) for l in logps]
        rises, falls = [r for r, _ in rf], [f for _, f in rf]
        add(f"SFT: {family} rises early then falls (peak - start, nats; end - peak in 'fall')", rises,
            all(r > TOL and f < -TOL for r, f in rf), fall=effect(falls), end_minus_start=effect(delta[family]))
    if "other_train" in logps[0]:
        frac = [rising_fraction(l["other_train"]) for l in logps]
        add("SFT: other_train rises near-monotonically (end - start, nats)", delta["other_train"],
            min(delta["other_train"]) > TOL and min(frac) >= 0.7, rising_fraction=effect(frac))
    if "other_train" in logps[0] and "other_test" in logps[0]:
        gap = [a - b for a, b in zip(delta["other_train"], delta["other_test"])]
        add("SFT: other_train ends higher than other_test, relative to start (difference of end - start, nats)", gap,
            min(gap) > TOL)
    for family in FALLING:
        if family in logps[0]:
            add(f"SFT: {family} falls (end - start, nats)", delta[family], max(delta[family]) < -TOL)
    add("SFT: argmax path y* along chosen rises (end - start, nats)", delta["argmax_chosen"],
        min(delta["argmax_chosen"]) > TOL)
    a_norm = [c["a_norm"][-1] - c["a_norm"][0] for c in curves]
    off = [c["off_argmax"][-1] - c["off_argmax"][0] for c in curves]
    add("SFT: the model grows peakier along chosen (end - start of mean ||A||_F)", a_norm, min(a_norm) > 0,
        off_argmax_change=effect(off))
    numbers["end_minus_start"] = {f: effect(v) for f, v in delta.items()}
    return rows, numbers


def first_order_check(records: list[tuple[int, int, dict]], seeds: list[int], experiment: str = EXPERIMENT,
                      what: str = "SFT") -> tuple[Claim, dict[str, Any]]:
    """The kind="check" row: the first-order prediction along the real update tracks the actual change
    (per-response correlation and relative gap of every decomposed step, worst over steps and seeds)."""
    by_seed: dict[int, list[dict]] = {}
    for seed, _, r in records:
        by_seed.setdefault(seed, []).append(r)
    corr = [min(r["correlation"] for r in rs) for rs in by_seed.values()]
    gap = [max(r["relative_gap"] for r in rs) for rs in by_seed.values()]
    passed = bool(by_seed) and min(corr) >= CHECK_MIN_CORRELATION and max(gap) <= CHECK_MAX_RELATIVE_GAP
    value = effect(corr, worst_relative_gap=effect(gap), steps_per_seed=[len(rs) for rs in by_seed.values()],
                   thresholds={"min_correlation": CHECK_MIN_CORRELATION, "max_relative_gap": CHECK_MAX_RELATIVE_GAP})
    claim = Claim(experiment, f"{what}: first-order A·J·u prediction tracks the actual one-step change of every probe "
                              "response (worst per-response correlation over decomposed steps)", "check", passed, value,
                  tuple(seeds))
    return claim, value


def plot_decomposition(records: list[tuple[int, int, dict]], path: pathlib.Path, title: str) -> None:
    """Predicted vs actual one-step change (mean over prompts) of every family, every decomposed step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    families = sorted({f for _, _, r in records for f in r["predicted"]})
    for i, f in enumerate(families):
        xs = [r["actual"][f] for _, _, r in records]
        ys = [r["predicted"][f] for _, _, r in records]
        ax.scatter(xs, ys, s=12, color=f"C{i % 10}", label=f)
    lim = max([abs(v) for _, _, r in records for v in list(r["actual"].values()) + list(r["predicted"].values())] + [1e-6])
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.6)
    ax.set_xlabel("actual one-step change (nats)")
    ax.set_ylabel("first-order prediction A·J·u (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: Config) -> dict[str, Any]:
    """Runs the pipeline for every seed and writes figures, results.json, claims.json and report.md."""
    start = time.perf_counter()
    out, pcfg, pipeline = open_experiment(config)
    seeds = list(config.seeds)
    curves, stages, records = [], {}, []
    for seed in seeds:
        base, sft = sft_stage(pipeline, seed, config.decompose_every)
        stages[seed] = {"base": {"dir": str(base.out), "reused": base.reused, "seconds": base.seconds},
                        "sft": {"dir": str(sft.out), "reused": sft.reused, "seconds": sft.seconds}}
        c = read_curves(sft)
        curves.append(c)
        records += [(seed, step, r) for step, r in c["decompose"]]
        print(f"[sft_dynamics] seed {seed}: chosen {c['logps']['chosen'][0]:.1f} -> {c['logps']['chosen'][-1]:.1f}, "
              f"argmax {c['logps']['argmax_chosen'][0]:.1f} -> {c['logps']['argmax_chosen'][-1]:.1f}", file=sys.stderr)

    rows, numbers = sft_claims(curves, seeds)
    check, check_value = first_order_check(records, seeds)
    rows.append(check)
    write_claims(out, rows)
    plot_curves(curves, out / "sft_curves.png", "SFT probe log-probs")
    if records:
        plot_decomposition(records, out / "sft_decomposition.png", "SFT: one step, predicted vs actual")
    wall = time.perf_counter() - start
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "seeds": seeds, "stages": stages,
               "curves": curves, "claims": numbers, "first_order": check_value,
               "decompositions": [{"seed": s, "step": st, **r} for s, st, r in records], "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, rows, numbers, records, wall, curves))
    return results


def explanation(curves: list[dict[str, Any]], records: list[tuple[int, int, dict]], rows: list[Claim]) -> list[str]:
    """Why each SFT claim that failed did, from the per-step decomposition and the curves (computed).

    For a family that should rise then fall (or fall) but did not: the first-order push the SFT
    update put on it at the decomposed steps, early half vs late half of the run, and as a share of
    the push on chosen (how similar the eNTK finds it to the responses being learned). For y* and
    peakedness: the gap between the argmax path and chosen, and the off-argmax log-mass.
    """
    failed = [r.claim for r in rows if r.kind == "paper" and not r.passed]
    if not failed:
        return []
    lines = []
    steps = sorted({st for _, st, _ in records})
    cut = steps[(len(steps) - 1) // 2] if steps else 0  # the first half of the decomposed steps (rounded up)
    early = [r for _, st, r in records if st <= cut]
    late = [r for _, st, r in records if st > cut]

    def push(rs, family):
        vals = [r["predicted"][family] for r in rs if family in r["predicted"]]
        return float(np.mean(vals)) if vals else float("nan")

    for family in UP_THEN_DOWN + FALLING:
        if not any(c.startswith(f"SFT: {family} ") for c in failed) or not records:
            continue
        e, l_ = push(early, family), push(late, family)
        share = [r["predicted"][family] / r["predicted"]["chosen"] for _, _, r in records
                 if family in r["predicted"] and abs(r["predicted"].get("chosen", 0.0)) > 1e-12]
        positive = float(np.mean([r["predicted"][family] > 0 for _, _, r in records if family in r["predicted"]]))
        end = float(np.mean([c["logps"][family][-1] - c["logps"][family][0] for c in curves]))
        head = (f"- `{family}` (end − start {end:+.1f} nats): the SFT update's first-order push on it was "
                f"{e:+.3f} nats/step in the first half of the decomposed steps and {l_:+.3f} in the second, "
                f"positive at {positive:.0%} of them, {np.mean(share):.2f}× the push on chosen (median "
                f"{np.median(share):.2f}).")
        if np.median(share) >= 0.3:
            tail = (" The eNTK couples it to the chosen responses being learned (they share the answer's template "
                    "words and slots), so each step lifts it with chosen"
                    + (" and no turn-down comes within this run." if l_ > 0 else
                       "; the push turned negative late, but too little to bring it below its peak."))
        else:
            tail = (" Its rise came early, while the model learned the answers' vocabulary; afterwards the eNTK sees "
                    "it as nearly unrelated to the chosen updates (push ≈ 0), so nothing pulls it back down within "
                    "this run.")
        lines.append(head + tail)
    if any("argmax path" in c or "peakier" in c for c in failed):
        gap0 = float(np.mean([c["logps"]["argmax_chosen"][0] - c["logps"]["chosen"][0] for c in curves]))
        gap1 = float(np.mean([c["logps"]["argmax_chosen"][-1] - c["logps"]["chosen"][-1] for c in curves]))
        off = float(np.mean([c["off_argmax"][-1] - c["off_argmax"][0] for c in curves]))
        a = float(np.mean([c["a_norm"][-1] - c["a_norm"][0] for c in curves]))
        lines.append(f"- y* and peakedness: the argmax path along chosen was {gap0:.1f} nats above chosen at the start "
                     f"and {gap1:.1f} at the end; ‖A‖_F changed {a:+.3f} and the off-argmax log-mass "
                     f"Σ log(1 − max π) {off:+.2f}. SFT here teaches a stochastic grammar with many interchangeable "
                     "phrases per slot (SPEC §3's world design): matching it spreads the next-token mass over the "
                     "slot's alternatives, so the base model's peaks (its neutral answer style) flatten and y* falls "
                     "while chosen rises — the opposite of the paper's peakier models, by design of the data.")
    return lines


def report(config: Config, pcfg: PipelineConfig, rows: list[Claim], numbers: dict, records: list, wall: float,
           curves: list[dict[str, Any]] | None = None) -> str:
    """report.md: setting, claims table, the per-family end-start changes, the decomposition check."""
    source = pcfg.data or "the embedded world"
    model = pcfg.model or f"tiny {pcfg.arch} (d={pcfg.d_model}, {pcfg.num_layers} layers) pretrained here"
    ends = numbers["end_minus_start"]
    lines = [f"# SFT probe dynamics ({'quick' if config.quick else config.preset})", "",
             f"Data: {source}. Model: {model}. SFT: {pcfg.optimizer} lr {pcfg.sft_lr}, {pcfg.sft_steps} steps, batch "
             f"{pcfg.batch_size}; probes every {pcfg.track_every} steps on {pcfg.track_prompts} prompts; seeds "
             f"{list(config.seeds)}. Wall time {wall:.0f} s.", "",
             "![curves](sft_curves.png)", "", "## Claims (SPEC §3, SFT)", "",
             claims_table([r.to_json() for r in rows]), "",
             "## End − start per family (nats, mean ± std over seeds)", "",
             "| family | end − start |", "|---|---|"]
    lines += [f"| {f} | {v['mean']:+.2f} ± {v['std']:.2f} |" for f, v in ends.items()]
    lines += ["", "## Per-step decomposition", "",
              f"{len(records)} decomposed steps: the first-order change `A J_o u` along the update really taken "
              "(the optimizer's, SPEC §1.4) against the change after the step, for every probe response.", ""]
    if records:
        lines += ["![decomposition](sft_decomposition.png)", "", "| seed | step | correlation | relative gap | ‖u‖ |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s} | {st} | {r['correlation']:.4f} | {r['relative_gap']:.3f} | {r['update_norm']:.3g} |"
                  for s, st, r in records]
    failed = [r.claim for r in rows if r.kind == "paper" and not r.passed]
    lines += ["", "## Verdict", ""]
    lines += ([f"Not reproduced as measured: {', '.join(failed)}. These rows stay in claims.json as measured."]
              if failed else ["Every SFT claim of SPEC §3 reproduced on every seed."])
    why = explanation(curves or [], records, rows) if curves else []
    if why:
        lines += ["", "## Explanation", "", "What the per-step decomposition says about the claims that did not "
                  "reproduce (means over seeds and decomposed steps):", ""] + why
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.sft_dynamics"))
