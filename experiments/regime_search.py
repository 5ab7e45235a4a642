"""A recorded search for the regime where a small LM's full-parameter DPO squeezes (SPEC §2–3).

SPEC §3 measured a tiny tied LM whose full-parameter off-policy DPO *flattened* (chosen, the
argmax path y* and peakedness all fell) while head-only DPO squeezed exactly as the theorem
says. Whether a small model squeezes with every parameter trainable is a research question;
this script is the search, kept with the commands that reproduce each row.

Each *regime* changes one thing of the reference setting — the DPO of
:mod:`experiments.dpo_dynamics` (tiny GPT-NeoX, untied head, d=64, 2 layers, pretrained 600
steps, SFT 160 Adam steps, off-policy DPO from the SFT model, SGD lr 2e-3, 120 steps, β 0.1) —
along the axes SPEC §3 lists: width and depth, tied vs untied head, pretraining length, DPO from
the base model vs from SFT, the optimizer (Adam as in SPEC's first look), a learning rate small
enough that the DPO margin keeps growing for many more steps, and rejected responses in a deeper
valley (the world's ``foreign`` style). Head-only DPO is the identity-K control.

Per regime and seed, from the tracked probes (end − start of the DPO run): Δ chosen (and its
early rise), Δ y* along chosen and along rejected, Δ rejected, Δ‖A‖_F (peakedness), the final
DPO loss; **squeezes** = y* along chosen rises and chosen falls. From the per-step decomposition
(:func:`experiments.lm_pipeline.decomposition_hook`, SGD: the term split is exact) the mean
first-order push per step on log π(chosen) and on y* of the rejected term's body and head parts
(and the chosen term's), which says *which* part of the update did what.

Not run here: sub-word tokens on real text needs a sub-word model and corpus (no downloads in
the embedded default); the command for a local Hugging Face model and an HH file is in the
report (``--data HH.jsonl --model DIR``: every regime then runs on that data and model; the
width/depth/tying regimes need the tiny model and are skipped).

Run: ``python -m experiments.regime_search --out results/regime_search`` (CPU, one seed, ~30 min
on 2 cores; ``--seeds 0,1,2`` for three); ``--regimes a,b`` for some rows; ``--quick true`` is the
test's smoke run.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Mapping

import numpy as np

from experiments.claims import Claim, claims_table, effect, write_claims
from experiments.dpo_dynamics import dpo_stage
from experiments.sft_dynamics import sft_stage
from experiments.lm_pipeline import (Pipeline, PipelineConfig, enable_compile_cache,
                                     read_curves, rise_then_fall)
from ldjax.config import parse_config, to_dict
from ldjax.tracking import read_tracking

EXPERIMENT = "regime_search"
TOL = 0.1  # nats
TERMS = ("rejected/body", "rejected/head", "chosen/body", "chosen/head")
SFT_DECOMPOSE_EVERY = 4  # sft_dynamics' default: the same SFT stage


@dataclasses.dataclass(frozen=True)
class Regime:
    """One row of the search: what changes with respect to the reference setting."""

    name: str
    varied: str
    pipeline: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # PipelineConfig overrides
    dpo: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # DPO job overrides
    start: str = "sft"  # "sft" | "base"
    head_only: bool = False
    tiny_only: bool = False  # changes the tiny model: skipped with --model
    lr_scale: float = 1.0  # × the reference DPO learning rate
    steps_scale: int = 1  # × the reference DPO steps

    @property
    def own_dpo(self) -> bool:
        """Whether its DPO job differs from the reference's on the same pipeline (then it is named apart)."""
        return bool(self.dpo) or self.lr_scale != 1.0 or self.steps_scale != 1


REGIMES = (
    Regime("reference", "— (dpo_dynamics' setting)"),
    Regime("head_only", "only `lm_head` trainable (identity-K control)", head_only=True),
    Regime("from_base", "DPO from the base model (no SFT; the paper's Pythia setting)", start="base"),
    Regime("adam", "Adam lr 1e-5 instead of SGD (SPEC §3's first look)", dpo={"optimizer": "adam", "learning_rate": 1e-5}),
    Regime("adam_fast", "Adam lr 5e-5 (SPEC §3's flattening runs)", dpo={"optimizer": "adam", "learning_rate": 5e-5}),
    Regime("sgd_fast", "SGD lr 1e-2 (SPEC §3's flattening SGD run)", dpo={"learning_rate": 1e-2}),
    Regime("small_lr_long", "SGD at a quarter of the learning rate for 4× the steps (the margin still grows at the end)",
           lr_scale=0.25, steps_scale=4),
    Regime("foreign_rejected", "rejected = narrative text after the shared prefix (deeper valley)",
           pipeline={"world_rejected_style": "foreign"}),
    Regime("narrow_d32", "width d=32", pipeline={"d_model": 32}, tiny_only=True),
    Regime("wide_d128", "width d=128", pipeline={"d_model": 128}, tiny_only=True),
    Regime("deep_L4", "4 layers", pipeline={"num_layers": 4}, tiny_only=True),
    Regime("tied_qwen2", "tied head (qwen2 architecture)", pipeline={"arch": "qwen2"}, tiny_only=True),
    Regime("long_pretrain", "pretraining 2400 steps instead of 600", pipeline={"pretrain_steps": 2400}, tiny_only=True),
)
BY_NAME = {r.name: r for r in REGIMES}


@dataclasses.dataclass(frozen=True)
class Config:
    """Search for a setting where full-parameter DPO squeezes on a small LM."""

    out: str = dataclasses.field(default="results/regime_search", metadata={"help": "output directory"})
    run_dir: str = dataclasses.field(default="runs/regime_search", metadata={"help": "pipeline cache (one sub-directory per pipeline setting)"})
    seeds: tuple[int, ...] = dataclasses.field(default=(0,), metadata={"help": "model seeds"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "seconds-long smoke run (tests)"})
    regimes: tuple[str, ...] = dataclasses.field(default=tuple(r.name for r in REGIMES), metadata={"help": "rows to run: " + ", ".join(BY_NAME)})
    data: str = dataclasses.field(default="", metadata={"help": "preference JSONL; empty = embedded world"})
    data_format: str = dataclasses.field(default="auto", metadata={"help": "format of --data"})
    model: str = dataclasses.field(default="", metadata={"help": "local Hugging Face model directory (skips pretraining and the tiny-model rows)"})
    dpo_lr: float = dataclasses.field(default=2e-3, metadata={"help": "reference DPO: SGD learning rate (dpo_dynamics' default)"})
    dpo_steps: int = dataclasses.field(default=0, metadata={"help": "reference DPO steps (0 = the pipeline preset's)"})
    decompose_every: int = dataclasses.field(default=3, metadata={"help": "decompose every k-th tracked DPO step (as dpo_dynamics: its jobs are reused)"})
    compile_cache: str = dataclasses.field(default="", metadata={"help": "JAX compilation cache dir (default run_dir/jax_cache; 'off' = none)"})

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("Config.seeds: at least one seed")
        unknown = [r for r in self.regimes if r not in BY_NAME]
        if unknown or not self.regimes:
            raise ValueError(f"Config.regimes: unknown {unknown}; choose from {list(BY_NAME)}")


QUICK_PIPELINE = dict(pretrain_steps=30, sft_steps=12, dpo_steps=8, track_every=4, track_prompts=6)
QUICK_REGIMES = ("reference", "head_only", "tied_qwen2")


def pipeline_for(config: Config, regime: Regime) -> PipelineConfig:
    """The pipeline of a regime: its own cache directory per distinct pipeline setting."""
    overrides = dict(regime.pipeline)
    # The reference pipeline lives in run_dir itself: pointed at the run directory of
    # sft_dynamics/dpo_dynamics (as `ldjax reproduce` does), it reuses their base and SFT models.
    tag = "_".join(f"{k}-{v}" for k, v in sorted(overrides.items()))
    common = dict(run_dir=str(pathlib.Path(config.run_dir) / tag) if tag else config.run_dir, data=config.data,
                  data_format=config.data_format, model=config.model, **overrides)
    if config.dpo_steps:
        common["dpo_steps"] = config.dpo_steps
    if config.quick:
        return PipelineConfig.quick_preset(**{**QUICK_PIPELINE, **common})
    return PipelineConfig(**common)


def outcome(stage) -> dict[str, Any]:
    """End − start of the tracked probes of a DPO run, and the per-step decomposition's term means."""
    c = read_curves(stage)
    d = {f: float(v[-1] - v[0]) for f, v in c["logps"].items()}
    rise, _ = rise_then_fall(c["logps"]["chosen"])
    records = read_tracking(stage.tracking_file)
    loss = [r["dpo"]["loss"]["mean"] for r in records if "dpo" in r]
    margin = [r["dpo"]["margin"]["mean"] for r in records if "dpo" in r]
    terms: dict[str, list[float]] = {}
    for _, rec in c["decompose"]:
        for part, (dy, dstar) in rec.get("terms", {}).get("chosen", {}).items():
            terms.setdefault(part, []).append((dy, dstar))
    term_means = {p: [float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))]
                  for p, vals in terms.items()}
    corr = [rec["correlation"] for _, rec in c["decompose"] if np.isfinite(rec.get("correlation", np.nan))]
    return {"d_chosen": d["chosen"], "chosen_early_rise": float(rise), "d_rejected": d["rejected"],
            "d_argmax_chosen": d["argmax_chosen"], "d_argmax_rejected": d.get("argmax_rejected", float("nan")),
            "d_a_norm": float(c["a_norm"][-1] - c["a_norm"][0]),
            "d_off_argmax": float(c["off_argmax"][-1] - c["off_argmax"][0]),
            "loss_start": loss[0] if loss else float("nan"), "loss_end": loss[-1] if loss else float("nan"),
            "margin_end": margin[-1] if margin else float("nan"),
            "margin_still_growing": bool(len(margin) >= 3 and margin[-1] - margin[-2] > 0.05 * abs(margin[-1] - margin[0])),
            "squeezes": bool(d["argmax_chosen"] > TOL and d["chosen"] < -TOL),
            "paper_shape": bool(d["argmax_chosen"] > TOL and d["chosen"] < -TOL and rise > TOL),
            "terms": term_means, "first_order_correlation": float(min(corr)) if corr else float("nan"),
            "steps": c["steps"][-1]}


def run_regime(config: Config, regime: Regime, seed: int) -> dict[str, Any]:
    """Builds (or reuses) base → SFT → DPO for one regime and seed; returns its :func:`outcome`."""
    pcfg = pipeline_for(config, regime)
    pipeline = Pipeline(pcfg)
    base, sft = sft_stage(pipeline, seed, SFT_DECOMPOSE_EVERY)  # sft_dynamics' stage (shared cache key)
    origin = sft if regime.start == "sft" else base
    # The reference's DPO job is dpo_dynamics' (same name, settings and hook: one cached job);
    # head_only and from_base are its sft/head and base/full jobs.
    dpo = {"optimizer": "sgd", "learning_rate": config.dpo_lr * regime.lr_scale, **regime.dpo}
    if regime.steps_scale != 1:
        dpo["num_steps"] = pcfg.dpo_steps * regime.steps_scale
    stage = dpo_stage(pipeline, seed, origin, regime.start, "head" if regime.head_only else "full", dpo,
                      config.decompose_every, variant=regime.name if regime.own_dpo else "")
    o = outcome(stage)
    o.update(seed=seed, seconds=stage.seconds, reused=stage.reused, dpo=dpo, start=regime.start,
             pipeline={k: v for k, v in to_dict(pcfg).items() if k in regime.pipeline})
    return o


def command(config: Config, regime: Regime) -> str:
    seeds = ",".join(map(str, config.seeds))
    extra = (f" --data {config.data}" if config.data else "") + (f" --model {config.model}" if config.model else "")
    return f"python -m experiments.regime_search --regimes {regime.name} --seeds {seeds}{extra}"


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def table(config: Config, results: dict[str, list[dict]]) -> list[str]:
    """The search table (means over seeds; 'squeezes' counts seeds) with each row's command."""
    lines = ["| regime | what changes | Δ chosen (early rise) | Δ y* chosen | Δ y* rejected | Δ rejected | Δ‖A‖_F | "
             "DPO loss start→end | squeezes | push on chosen /step: rej body, rej head, cho body | "
             "push on y* /step: rej body, rej head, cho body |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        r = BY_NAME[name]
        if not runs:
            continue
        m = {k: _mean([o[k] for o in runs]) for k in ("d_chosen", "chosen_early_rise", "d_argmax_chosen",
                                                      "d_argmax_rejected", "d_rejected", "d_a_norm", "loss_start",
                                                      "loss_end")}
        t = {p: [_mean([o["terms"].get(p, [np.nan, np.nan])[i] for o in runs]) for i in (0, 1)]
             for p in ("rejected/body", "rejected/head", "chosen/body")}
        sq = sum(o["squeezes"] for o in runs)
        lines.append(
            f"| `{name}` | {r.varied} | {m['d_chosen']:+.2f} ({m['chosen_early_rise']:+.2f}) | "
            f"{m['d_argmax_chosen']:+.2f} | {m['d_argmax_rejected']:+.2f} | {m['d_rejected']:+.2f} | "
            f"{m['d_a_norm']:+.3f} | {m['loss_start']:.3f}→{m['loss_end']:.3f} | **{sq}/{len(runs)}** | "
            + ", ".join(f"{t[p][0]:+.3f}" for p in t) + " | " + ", ".join(f"{t[p][1]:+.3f}" for p in t) + " |")
    lines += ["", "Commands (each row alone; the pipeline stages are cached in `--run-dir`, so rows sharing a "
                  "pipeline setting reuse its base and SFT models):", "", "```"]
    lines += [command(config, BY_NAME[n]) for n in results] + ["```"]
    return lines


def claims(results: dict[str, list[dict]], seeds: list[int]) -> list[Claim]:
    """kind="paper" rows: does full-parameter DPO squeeze in some regime; does the head-only control."""
    rows = []
    full = {n: runs for n, runs in results.items() if runs and not BY_NAME[n].head_only}
    squeezing = [n for n, runs in full.items() if all(o["squeezes"] for o in runs)]
    rows.append(Claim(EXPERIMENT, "a full-parameter regime exists where off-policy DPO squeezes on the embedded world "
                                  "(y* along chosen rises and chosen falls, every seed)", "paper", bool(squeezing),
                      effect([sum(o["squeezes"] for o in runs) / len(runs) for runs in full.values()],
                             squeezing=squeezing, searched=list(full)), tuple(seeds)))
    for n, runs in full.items():
        rows.append(Claim(EXPERIMENT, f"regime {n}: full-parameter DPO squeezes (Δ y* along chosen, nats; passes when "
                                      f"y* rises and chosen falls in every seed)", "paper",
                          all(o["squeezes"] for o in runs), effect([o["d_argmax_chosen"] for o in runs],
                                                                   d_chosen=effect([o["d_chosen"] for o in runs])),
                          tuple(seeds)))
    if results.get("head_only"):
        runs = results["head_only"]
        rows.append(Claim(EXPERIMENT, "head-only DPO (identity-K control) squeezes: y* rises, chosen falls", "paper",
                          all(o["squeezes"] for o in runs), effect([o["d_argmax_chosen"] for o in runs]), tuple(seeds)))
    return rows


def explanation(results: dict[str, list[dict]]) -> list[str]:
    """What the decomposition says, computed from the table's numbers."""
    lines = []
    for name, runs in results.items():
        if not runs:
            continue
        t = {p: _mean([o["terms"].get(p, [np.nan, np.nan])[0] for o in runs]) for p in TERMS}
        s = {p: _mean([o["terms"].get(p, [np.nan, np.nan])[1] for o in runs]) for p in TERMS}
        verdict = "squeezes" if all(o["squeezes"] for o in runs) else (
            "mixed" if any(o["squeezes"] for o in runs) else "does not squeeze")
        push = min(TERMS, key=lambda p: t[p] if np.isfinite(t[p]) else np.inf)
        lift = max(TERMS, key=lambda p: s[p] if np.isfinite(s[p]) else -np.inf)
        if BY_NAME[name].head_only:
            balance = "body frozen"
        elif BY_NAME[name].pipeline.get("arch") == "qwen2":
            balance = "tied head: the output head is the input embedding, counted in the body"
        else:
            balance = (f"the rejected term's head part is {abs(t['rejected/head']) / max(abs(t['rejected/body']), 1e-12):.2g}"
                       f"× its body part on chosen")
        lines.append(f"- `{name}` {verdict}: chosen was pushed down most by `{push}` ({t[push]:+.3f} nats/step; "
                     f"{balance}); y* was raised most by `{lift}` ({s[lift]:+.3f}/step), the chosen term's body "
                     f"moved it {s['chosen/body']:+.3f}/step.")
    return lines


def plot(results: dict[str, list[dict]], path: pathlib.Path) -> None:
    """Per regime: Δ chosen, Δ y* along chosen and Δ‖A‖_F (×10) of the DPO run, seeds as dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, runs in results.items() if runs]
    keys = (("d_chosen", "Δ chosen (nats)"), ("d_argmax_chosen", "Δ y* along chosen (nats)"),
            ("d_rejected", "Δ rejected (nats)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.45 * len(names) + 1.6), sharey=True)
    for ax, (key, label) in zip(axes, keys):
        for i, n in enumerate(names):
            vals = [o[key] for o in results[n]]
            squeezes = all(o["squeezes"] for o in results[n])
            ax.barh(i, float(np.mean(vals)), color="C2" if squeezes else "C3", alpha=0.6)
            ax.plot(vals, [i] * len(vals), "k.", ms=4)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("Full-parameter DPO per regime (from SFT unless the regime says otherwise; green: squeezes, y* rises and "
                 "chosen falls; red: does not)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config: Config, results: dict[str, list[dict]], rows: list[Claim], wall: float) -> str:
    skipped = [n for n in config.regimes if not results.get(n)]
    lines = [f"# Where does a small LM's full-parameter DPO squeeze? ({'quick' if config.quick else 'cpu'})", "",
             *(["**Quick smoke run**: the quick preset's sizes and step counts, not the ones below.", ""]
               if config.quick else []),
             "Reference setting: the DPO of `experiments.dpo_dynamics` (embedded world, tiny GPT-NeoX with an untied "
             "head, d=64, 2 layers, pretrained 600 steps, SFT 160 Adam steps at 1e-4, off-policy DPO from the SFT "
             f"model with SGD lr {config.dpo_lr:g} for {config.dpo_steps or PipelineConfig().dpo_steps} steps, β 0.1, "
             "batch 16); each row changes one thing. "
             f"Seeds {list(config.seeds)}. Wall time {wall:.0f} s.", "",
             "Columns: end − start of the DPO run in nats (means over seeds; early rise = max − start of chosen); "
             "squeezes = y* along chosen rises and chosen falls (> 0.1 nats), seeds that did; push columns = mean "
             "first-order change per step (nats) of log π(chosen) and of y* along chosen caused by the rejected term's "
             "body and head parameters and the chosen term's body parameters (exact split for SGD; for Adam the "
             "current gradient's share).", ""]
    lines += table(config, results)
    lines += ["", "![regimes](regimes.png)", "", "## What the decomposition says", ""] + explanation(results)
    if skipped:
        lines += ["", f"Not run: {', '.join(skipped)} (tiny-model rows are skipped with `--model`)."]
    lines += ["", "Not run: sub-word tokens on real text (needs a local sub-word model and corpus; run "
                  "`python -m experiments.regime_search --data HH.jsonl --model PYTHIA_DIR` on a GPU/TPU).", "",
              "## Claims", "", claims_table([r.to_json() for r in rows]), ""]
    return "\n".join(lines)


def main(config: Config) -> dict[str, Any]:
    """Runs every regime × seed (cached stages reused) and writes table.md, results.json, claims.json, report.md."""
    start = time.perf_counter()
    if config.quick:
        config = dataclasses.replace(config, regimes=tuple(r for r in config.regimes if r in QUICK_REGIMES))
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.compile_cache != "off":
        enable_compile_cache(config.compile_cache or pathlib.Path(config.run_dir) / "jax_cache")
    results: dict[str, list[dict]] = {}
    for name in config.regimes:
        regime = BY_NAME[name]
        results[name] = []
        if regime.tiny_only and config.model:
            continue
        for seed in config.seeds:
            o = run_regime(config, regime, seed)
            results[name].append(o)
            print(f"[regime_search] {name} seed {seed}: chosen {o['d_chosen']:+.2f}, y* {o['d_argmax_chosen']:+.2f}, "
                  f"rejected {o['d_rejected']:+.2f} -> squeezes {o['squeezes']} ({o['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    rows = claims(results, list(config.seeds))
    write_claims(out, rows)
    wall = time.perf_counter() - start
    (out / "table.md").write_text("\n".join(table(config, results)) + "\n")
    plot(results, out / "regimes.png")
    payload = {"config": to_dict(config), "regimes": {n: dataclasses.asdict(BY_NAME[n]) for n in results},
               "results": results, "wall_s": wall}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "report.md").write_text(report(config, results, rows, wall))
    return payload


if __name__ == "__main__":
    main(parse_config(Config, sys.argv[1:], prog="python -m experiments.regime_search"))
