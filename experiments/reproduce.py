"""The main job (``ldjax reproduce``, ``make demo``): every experiment at CPU scale, one report.

Runs, each into ``OUT/<name>/`` (figures, ``results.json``, ``report.md``, ``claims.json``):

- ``squeeze_logreg`` — the squeezing theorem on linear softmax regression (SPEC §2);
- ``first_order`` — the O(η²) gap of the one-step decomposition, SGD and Adam (SPEC §1.4);
- ``mnist_dynamics`` — per-step A·K·G while a network learns MNIST (SPEC §1.1);
- ``sft_dynamics`` — probe curves and the per-step decomposition during SFT (SPEC §3);
- ``dpo_dynamics`` — off-policy DPO from SFT and from the base model, all parameters vs the
  head only: the squeeze per token and which term of the update did it (SPEC §2–3);
- ``sharpness`` — DPO after a short vs a long SFT: does a sharper start squeeze harder?
- ``extend`` — the paper's mitigation: SFT on chosen and rejected before DPO, vs the baseline;
- ``mitigation`` — ours, beyond the paper: DPO with the push-down of each rejected token weighted
  by its probability, against plain DPO and extend on the same claims and judge;
- ``on_policy`` — off-policy vs on-policy negatives, and the loss types (sigmoid, IPO, hinge,
  SimPO; PPO-clip's coefficient) by how much they squeeze and by their residual coefficients;
- ``influence_matrix`` — accumulated influence of each training-target probe family on every
  observed family (SFT and DPO), the decomposition's prediction beside the actual change;
- ``token_squeeze`` — the squeezing theorem at single tokens inside a language model;
- ``first_order_lm`` — predicted vs actual per-response change on the LM, the gap vs η;
- ``kernel_balance`` — head vs body part of the LM eNTK and whether it predicts the squeeze;
- ``regime_search`` — where a small LM's full-parameter DPO squeezes (a few rows of the search).

The LLM experiments share one pipeline cache (``OUT/runs``, or ``--run-dir``): the pretrained base
model and the SFT model are built once and reused by every experiment that starts from them (a
stage is rebuilt when its config changes, :mod:`experiments.lm_pipeline`), and one JAX
compilation cache serves them all. Then ``OUT/REPORT.md`` (every figure with two lines saying
what it shows, the claims table, each experiment's explanation of the claims that did not
reproduce, the environment and the timings) and ``OUT/claims.json`` (every experiment's rows,
``{"experiment", "claim", "kind", "passed", "value", "seeds"}``) are written.

Exit status: 0 when every experiment ran and every ``kind="check"`` row passed (what ldjax
guarantees: exactness, theorems, first-order gaps); 1 otherwise. ``kind="paper"`` rows are the
paper's claims measured on the data: they pass or fail as measured and never change the status.

Run: ``ldjax reproduce --out results`` (CPU scale, on 2 cores), ``--quick`` (the one-minute smoke run:
:data:`SMOKE` at toy sizes, one seed; its numbers are not results; ``--quick --only all`` smokes every
experiment in a few minutes), ``--only dpo_dynamics,token_squeeze``, ``--data FILE.jsonl``
(the LLM experiments on your HH / UltraFeedback / plain preference file), ``--model DIR`` (a local
Hugging Face GPT-NeoX/Qwen2 checkpoint as the base model), ``--seeds N``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import platform
import re
import sys
import time
import traceback
from typing import Any, Sequence

from tqdm.auto import tqdm

from ldjax.config import parse_config, to_dict
from ldjax.train.config import ConfigError  # a usage error: `ldjax reproduce` reports it in one line, status 2

CLASSIC = ("squeeze_logreg", "first_order", "mnist_dynamics")
LLM = ("sft_dynamics", "dpo_dynamics", "sharpness", "extend", "mitigation", "on_policy", "influence_matrix", "token_squeeze",
       "first_order_lm", "kernel_balance", "regime_search")
EXPERIMENTS = CLASSIC + LLM
# The one-minute smoke run (--quick without --only): the report's whole machinery on the squeezing
# theorem and on the LLM pipeline (pretrain → SFT → DPO, probe tracking, the per-step decomposition),
# at toy sizes. Every experiment's own quick mode is run by the tests, and by --quick --only all.
SMOKE = ("squeeze_logreg", "sft_dynamics", "dpo_dynamics")
SMOKE_SCALE: dict[str, dict[str, Any]] = {"dpo_dynamics": dict(trainable=("full",))}  # on top of QUICK_SCALE
# Experiments that sweep tiny models of their own: with --model they have nothing to run on.
TINY_ONLY = ("kernel_balance",)

# The CPU scale of the main job (≈ 15 min on 2 cores in all); fields a Config lacks are skipped.
DPO_SCALE = dict(dpo_steps=60, dpo_lr=4e-3)  # shared: sharpness and extend reuse dpo_dynamics' DPO job
CPU_SCALE: dict[str, dict[str, Any]] = {
    "dpo_dynamics": DPO_SCALE, "sharpness": DPO_SCALE, "extend": DPO_SCALE,
    "mitigation": dict(DPO_SCALE, powers=(0.5,)),  # (α = 1 beside it: python -m experiments.mitigation)
    # the negatives and PPO-clip; every loss type (IPO, hinge, SimPO too) is the committed
    # experiments/results/on_policy_full (`python -m experiments.on_policy`)
    "on_policy": dict(DPO_SCALE, runs=("sigmoid", "sigmoid_on", "sigmoid_ranked", "ppo_clip")),
    "influence_matrix": dict(prompts=6, steps=3),
    "token_squeeze": dict(widths=(64,), heads=("untied",), contexts=6, halvings=6),
    # the kernel only: its DPO per variant is experiments/results/kernel_balance_with_dpo, and where
    # full-parameter DPO squeezes is regime_search's question (the head-only control: dpo_dynamics)
    "kernel_balance": dict(variants=("untied_d64_L2_short", "tied_d64_L2_short"), seeds=(0,), dpo_variants=(),
                           head_only_control="", prompts=3, positions=4),
    # dpo_dynamics' own jobs (cached); the whole search (foreign rejected responses, Adam, widths, depth...)
    # is the committed experiments/results/regime_search_full
    "regime_search": dict(regimes=("reference", "head_only", "from_base"), seeds=(0,), **DPO_SCALE),
}
# The smoke run: each experiment's own quick mode, one seed.
QUICK_SCALE: dict[str, dict[str, Any]] = {
    "squeeze_logreg": dict(sweep_samples=40),
    "mnist_dynamics": dict(model="mlp", mlp_hidden=(32,), train_per_class=40, observed_per_class=3, steps=24,
                           batch_size=16, analyse_every=6, checkpoints=2, ntk_per_class=2, ntk_batch_size=20),
    **{name: dict(quick=True) for name in LLM},
    # (the quick modes' own extras that the smoke run can do without)
    "dpo_dynamics": dict(quick=True, starts=("sft",)),
    "regime_search": dict(quick=True, regimes=("reference", "head_only")),
    "mitigation": dict(quick=True, powers=(0.5,)),
}

# Two lines per figure: what it shows, and what to look for.
CAPTIONS: dict[str, str] = {
    "squeeze_logreg/panels.png": "One update on linear softmax regression (V=50, d=4): the distribution before and after a positive step, "
                                 "negative steps on flat / peak / valley classes and a DPO-like pair. A valley push-down sends "
                                 "its mass to the argmax (the squeeze); the threshold τ = log Z/α predicts exactly which classes rise.",
    "squeeze_logreg/peak_pushdown_grid.png": "Negative step on the peak class (the on-policy case) over α and the peak's height: where every "
                                             "other class rises and the entropy grows (flattening) and where the old peak collapses "
                                             "below the runner-up.",
    "squeeze_logreg/tendencies.png": "Tendencies of the squeeze over random cases: the more peaked π and the deeper the valley of the "
                                     "pushed-down class, the larger the argmax's gain and the fewer classes rise.",
    "first_order/gap_vs_lr.png": "Predicted (A·K·G, first order) vs actual one-step change: the gap against η on log-log axes, for SGD and "
                                 "for Adam's actual update. Slope 2 and a ratio ≈ 4 per halving of η is the O(η²) error term.",
    "mnist_dynamics/predicted_vs_actual.png": "Per-step first-order prediction of Δ log π on observed digits against the actual change "
                                              "after the step (one dot per observed example and class): on the diagonal when exact.",
    "mnist_dynamics/influence_per_step.png": "Per-step influence by class, averaged over training: rows the observed class, "
                                             "columns the updated class. Bright off-diagonals are look-alike digits pulling "
                                             "each other's labels up (SPEC §1.1: 4↔9).",
    "mnist_dynamics/accumulated_influence.png": "The class-averaged predicted distribution on held-out digits at checkpoints "
                                                "(rows observed class, columns predicted; √ scale): where the accumulated "
                                                "updates left probability mass off the diagonal.",
    "mnist_dynamics/ntk_class_similarity.png": "eNTK similarity between classes (normalised trace of K): the model's own notion of "
                                               "which digits look alike, the K of A·K·G.",
    "sft_dynamics/sft_curves.png": "SFT on chosen: the change of every probe family's log-prob from step 0 (mean over seeds, band min–max). "
                                   "The paper: chosen ↑, other_train ↑, rejected and rephrases ↑ then ↓, random and shuffled ↓, argmax ↑.",
    "sft_dynamics/sft_decomposition.png": "The per-step decomposition during SFT: first-order prediction vs actual change of each family "
                                          "at the tracked steps; agreement means the eNTK story explains the curves step by step.",
    "dpo_dynamics/dpo_curves_sft_full.png": "Off-policy DPO from the SFT model, every parameter trained: the probe families' change from "
                                            "the start. The paper's squeeze is rejected ↓↓, chosen ↓ below its start, y* ↑.",
    "dpo_dynamics/dpo_curves_sft_head.png": "The same DPO with only the untied output head trained: the identity-K control where the "
                                            "squeezing theorem holds exactly at every context.",
    "dpo_dynamics/dpo_curves_base_full.png": "Off-policy DPO from the base model (no SFT, the paper's Pythia setting), every parameter "
                                             "trained.",
    "dpo_dynamics/dpo_curves_base_head.png": "DPO from the base model with only the output head trained (identity-K control).",
    "dpo_dynamics/dpo_decomposition_terms.png": "Which part of the update moved chosen and y*: the chosen and rejected terms of the DPO "
                                                "gradient, each split into head and body parameters (first order, nats per step).",
    "sharpness/sharpness.png": "DPO from a short (1 epoch) and a long SFT: change of chosen, rejected and y* from the DPO "
                               "start. The paper: from the sharper start chosen falls sooner and further and y* rises faster.",
    "mitigation/mitigation.png": "SFT then DPO on one axis for plain DPO (baseline), extend, and ours (weighted: each rejected "
                                 "token's push-down scaled by its probability). Ours should keep chosen up and y* down without extend's extra SFT.",
    "extend/extend.png": "SFT then DPO on one axis (dashed: DPO starts), SFT on chosen only (baseline) vs on chosen and "
                         "rejected (extend). The paper: with extend y⁻ starts DPO out of the valley, chosen falls less.",
    "on_policy/squeeze.png": "DPO with off-policy vs on-policy negatives and with each loss type: change of y*, chosen, "
                             "rejected and ‖A‖_F over training. The paper: on-policy negatives squeeze far less.",
    "on_policy/coefficients.png": "Residual coefficients c± of every probe pair at every tracked step against its margin, "
                                  "with each loss's analytic curve (PPO-clip: c = ρÂ until clipped): why losses squeeze "
                                  "differently as the margin grows.",
    "influence_matrix/influence_matrix.png": "Accumulated influence: rows the family trained on (SFT) or used as y⁻ (DPO), "
                                             "columns the observed family; the per-step decomposition's summed prediction "
                                             "beside the actual change. The two panels should agree in sign cell by cell.",
    "token_squeeze/token_bars.png": "One SGD step on one token's loss inside the LM: actual change of π at that context vs the exact-K "
                                    "prediction and the identity-K closed form of the theorem, for the largest classes.",
    "token_squeeze/squeeze_rates.png": "How often each squeezing claim (argmax gains, largest relative gain, threshold rule, risers, "
                                       "entropy) holds for the actual step, the exact-K and the identity-K predictions, per case.",
    "token_squeeze/head_body_share.png": "K(c,c) split into the output head's identity part and the body part: the share of the "
                                         "predicted change each carries. The squeeze lives in the head part.",
    "token_squeeze/kernel_vs_width.png": "How close K(c,c) is to a scaled identity, and the body/head diagonal ratio, as the width grows.",
    "token_squeeze/first_order_gaps.png": "Exact-K prediction vs the actual one-token step as η halves: the gap falls ≈ 4× per halving "
                                          "(first order), for every case.",
    "first_order_lm/gap_vs_lr.png": "Predicted vs actual per-response change of log π on the LM against η, for SGD and the actual "
                                    "optimizer: slope 2 on log-log, ratio ≈ 4 per halving (the O(η²) term).",
    "first_order_lm/predicted_vs_actual.png": "Per-response first-order prediction of Δ log π vs the actual change at one η: the "
                                              "sequence-level A·K·G on the diagonal.",
    "kernel_balance/kernel_balance.png": "Left: the head part's share of the predicted change at rejected contexts against DPO's Δ y* "
                                         "(marker: squeezes or not). Right: tr K split into head, body (and tied cross) parts per variant.",
    "regime_search/regimes.png": "Full-parameter DPO from SFT in each searched regime: Δ chosen, Δ y* and Δ rejected (green when y* "
                                 "rises and chosen falls: the squeeze). The full table with commands is in regime_search/report.md.",
}
EXPLANATION_SECTIONS = ("Explanation", "Verdict", "Reading", "What the decomposition says")


@dataclasses.dataclass(frozen=True)
class Config:
    """Runs every ldjax experiment at CPU scale and writes REPORT.md and claims.json."""

    out: str = dataclasses.field(default="results", metadata={"help": "output directory (one subfolder per experiment, REPORT.md, claims.json)"})
    only: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "experiments to run, or 'all' (default: all; with --quick: "
                                                                             + ", ".join(SMOKE) + "): " + ", ".join(EXPERIMENTS)})
    quick: bool = dataclasses.field(default=False, metadata={"help": "the one-minute smoke run (" + ", ".join(SMOKE) + " in their quick modes, one seed; "
                                                                   "with --only all: every experiment): its numbers are not results"})
    seeds: int = dataclasses.field(default=3, metadata={"help": "model seeds of the LLM experiments (0..N-1; the claims need >= 3)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the classification experiments"})
    data: str = dataclasses.field(default="", metadata={"help": "preference JSONL (hh / ultrafeedback / plain) for the LLM experiments; empty = the embedded world"})
    data_format: str = dataclasses.field(default="auto", metadata={"help": "format of --data: auto, hh, ultrafeedback, plain"})
    model: str = dataclasses.field(default="", metadata={"help": "local Hugging Face model directory as the base model of the LLM experiments"})
    run_dir: str = dataclasses.field(default="", metadata={"help": "shared pipeline cache of the LLM experiments (default OUT/runs)"})

    def __post_init__(self):
        unknown = [name for name in self.only if name not in EXPERIMENTS + ("all",)]
        if unknown:
            raise ConfigError(f"--only: unknown experiments {unknown}; choose from all, {', '.join(EXPERIMENTS)}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds: must be >= 1, got {self.seeds}")
        if self.data and not pathlib.Path(self.data).is_file():
            raise ConfigError(f"--data: no such file {self.data!r}")
        if self.model and not (pathlib.Path(self.model) / "config.json").is_file():
            raise ConfigError(f"--model: {self.model!r} is not a Hugging Face model directory (no config.json)")


# ----------------------------------------------------------------------------- running


def selected(config: Config) -> list[str]:
    """The experiments to run, in :data:`EXPERIMENTS` order: ``--only`` (``all``: every one), else
    every one, or :data:`SMOKE` for ``--quick``."""
    if "all" in config.only or (not config.only and not config.quick):
        return list(EXPERIMENTS)
    chosen = config.only or SMOKE
    return [n for n in EXPERIMENTS if n in chosen]


def experiment_config(name: str, config: Config) -> Any:
    """The experiment's own ``Config`` at the main job's scale, with the shared caches and sources."""
    module = importlib.import_module(f"experiments.{name}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    out = pathlib.Path(config.out)
    run_dir = pathlib.Path(config.run_dir) if config.run_dir else out / "runs"
    values: dict[str, Any] = {"out": str(out / name), "seed": config.seed}
    if name in LLM:  # (the classification experiments' own `data` field names their data set)
        values.update(seeds=tuple(range(1 if config.quick else config.seeds)), data=config.data,
                      data_format=config.data_format, model=config.model,
                      run_dir=str(run_dir if name != "kernel_balance" else run_dir / "kernel_balance"))
    if "compile_cache" in fields:
        cache = module.Config.__dataclass_fields__["compile_cache"].type
        values["compile_cache"] = True if cache in (bool, "bool") else str(run_dir / "jax_cache")
    values.update((QUICK_SCALE if config.quick else CPU_SCALE).get(name, {}))
    if config.quick and not config.only:  # the one-minute smoke run
        values.update(SMOKE_SCALE.get(name, {}))
    return module.Config(**{k: v for k, v in values.items() if k in fields})


def skipped_reason(name: str, config: Config) -> str | None:
    """Why an experiment does not apply to these sources (``None``: it runs)."""
    if name in TINY_ONLY and (config.model or config.data):
        return "sweeps tiny models of its own on the embedded world (not applicable with --data/--model)"
    if name == "token_squeeze" and config.data and not config.model:
        return "with --data it analyses the given --model (its own sweep trains on the embedded world)"
    return None  # (the classification experiments run on their own data either way)


def run_one(name: str, config: Config) -> dict[str, Any]:
    """Runs one experiment; a failure is caught and reported, never raised (the others still run)."""
    t0 = time.perf_counter()
    reason = skipped_reason(name, config)
    if reason:
        return {"status": "skipped", "seconds": 0.0, "reason": reason}
    try:
        importlib.import_module(f"experiments.{name}").main(experiment_config(name, config))
        return {"status": "ok", "seconds": time.perf_counter() - t0}
    except Exception:  # noqa: BLE001 — one failing experiment must not lose the others' results
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": traceback.format_exc()}


def collect_claims(out: pathlib.Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """Every experiment's ``claims.json`` rows, in experiment order."""
    from experiments.claims import read_claims
    rows: list[dict[str, Any]] = []
    for name in names:
        path = out / name / "claims.json"
        if path.exists():
            rows += read_claims(path)
    return rows


# ----------------------------------------------------------------------------- the report


def sections(markdown: str, titles: Sequence[str]) -> list[tuple[str, str]]:
    """``(title, body)`` of the ``## <title>`` sections of a report whose title is in ``titles``."""
    found = []
    for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S):
        if m.group(1).strip() in titles:
            found.append((m.group(1).strip(), m.group(2).strip()))
    return found


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4g} ± {value['std']:.2g}"
    return json.dumps(value)[:60]


def claims_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| | kind | experiment | claim | effect (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'PASS' if r['passed'] else '**FAIL**'} | {r['kind']} | {r['experiment']} | {r['claim']} | "
                     f"{_shown(r['value'])} | {len(r['seeds'])} |")
    return lines


def environment() -> dict[str, Any]:
    """Versions, devices and machine of this run."""
    import jax
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "tokenizers"):
        try:
            versions[package] = getattr(importlib.import_module(package), "__version__", "?")
        except ImportError:
            versions[package] = "not installed"
    return {"python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "versions": versions}


def write_report(config: Config, summary: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
                 env: dict[str, Any], wall: float) -> pathlib.Path:
    """``OUT/REPORT.md``: verdict, claims, figures with captions, explanations, environment, timings."""
    out = pathlib.Path(config.out)
    checks = [r for r in rows if r["kind"] == "check"]
    paper = [r for r in rows if r["kind"] == "paper"]
    failed_checks = [r for r in checks if not r["passed"]]
    crashed = [n for n, s in summary.items() if s["status"] == "failed"]
    source = f"`{config.data}`" if config.data else "the embedded world (no download)"
    model = f"`{config.model}`" if config.model else "tiny models pretrained here"
    lines = ["# ldjax reproduce: the learning dynamics of LLM finetuning, measured", ""]
    if config.quick:
        ran = list(summary)
        lines += [f"> **QUICK SMOKE RUN (`--quick`)**: {len(ran)} of {len(EXPERIMENTS)} experiments "
                  f"({', '.join(ran)}) in their seconds-long quick modes with one seed. "
                  "These numbers check that the pipeline runs; they are **not results**"
                  + (" (`--quick --only all` smokes every experiment)." if len(ran) < len(EXPERIMENTS) else "."), ""]
    lines += [f"Data: {source}. Models: {model}. Seeds: {1 if config.quick else config.seeds} per LLM experiment. "
              f"Wall time {wall / 60:.1f} min.", "",
              f"- **checks** (what ldjax guarantees: exactness, theorems, first-order gaps): "
              f"**{len(checks) - len(failed_checks)}/{len(checks)} pass**"
              + (f" — FAILED: {'; '.join(r['claim'] for r in failed_checks)}" if failed_checks else ""),
              f"- **paper claims** measured on this data: {sum(r['passed'] for r in paper)}/{len(paper)} reproduced "
              "(a failing one is a finding, explained below with the decomposition's numbers)",
              f"- experiments: {sum(s['status'] == 'ok' for s in summary.values())} ran, "
              f"{sum(s['status'] == 'skipped' for s in summary.values())} skipped, {len(crashed)} failed"
              + (f" ({', '.join(crashed)})" if crashed else ""),
              f"- exit status: {0 if not (failed_checks or crashed) else 1}", "",
              "All rows are in `claims.json` (`{experiment, claim, kind, passed, value, seeds}`).", "",
              "## Claims", ""]
    lines += claims_section(rows)
    for name, s in summary.items():
        lines += ["", f"## {name} — {s['status']}, {s['seconds']:.0f} s", ""]
        if s["status"] == "skipped":
            lines += [f"Skipped: {s['reason']}."]
            continue
        if s["status"] == "failed":
            lines += ["```", s["error"].rstrip(), "```"]
            continue
        lines += [f"Full report: [{name}/report.md]({name}/report.md).", ""]
        for png in sorted((out / name).glob("*.png")):
            key = f"{name}/{png.name}"
            caption = CAPTIONS.get(key, f"Figure `{png.name}` of {name}; see its report for what it shows.")
            lines += [f"![{key}]({key})", "", caption, ""]
        report = out / name / "report.md"
        own_rows = [r for r in rows if r["experiment"] == name]
        if report.exists() and any(not r["passed"] for r in own_rows):
            for title, body in sections(report.read_text(), EXPLANATION_SECTIONS):
                lines += [f"**{title}** (from {name}/report.md; why claims did or did not reproduce)", "", body, ""]
    lines += ["", "## Environment and timings", "",
              f"- python {env['python']} on {env['platform']} ({env['cpu_count']} CPUs; load average at the end "
              f"{env['load_average']})",
              f"- backend `{env['backend']}`, devices {env['devices']}",
              "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
              "| experiment | status | seconds |", "|---|---|---:|"]
    lines += [f"| {n} | {s['status']} | {s['seconds']:.0f} |" for n, s in summary.items()]
    lines += [f"| total | | {wall:.0f} |", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- main


def main(config: Config) -> dict[str, Any]:
    """Runs the selected experiments and writes ``REPORT.md``, ``claims.json`` and ``summary.json``."""
    start = time.perf_counter()
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    names = selected(config)
    summary: dict[str, dict[str, Any]] = {}
    bar = tqdm(names, desc="reproduce", unit="experiment", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        tqdm.write(f"--- {name} ({len(summary) + 1}/{len(names)}) ---")
        summary[name] = run_one(name, config)
        status = summary[name]
        tqdm.write(f"--- {name}: {status['status']} in {status['seconds']:.0f} s"
                   + (f"\n{status['error']}" if status["status"] == "failed" else ""))
    bar.close()
    rows = collect_claims(out, names)
    (out / "claims.json").write_text(json.dumps(rows, indent=1))
    env = environment()
    wall = time.perf_counter() - start
    report = write_report(config, summary, rows, env, wall)
    failed_checks = [r["claim"] for r in rows if r["kind"] == "check" and not r["passed"]]
    crashed = [n for n, s in summary.items() if s["status"] == "failed"]
    (out / "summary.json").write_text(json.dumps({"config": to_dict(config), "experiments": summary,
                                                  "environment": env, "wall_s": wall}, indent=1, default=str))
    print(f"\nReport: {report.resolve()}\nclaims: {len(rows)} rows in {(out / 'claims.json').resolve()}"
          + (f"\nFAILED checks: {failed_checks}" if failed_checks else "")
          + (f"\nFAILED experiments: {crashed}" if crashed else ""))
    return {"report": str(report), "claims": rows, "failed_checks": failed_checks, "crashed": crashed,
            "experiments": summary}


def exit_status(result: dict[str, Any]) -> int:
    return 1 if result["failed_checks"] or result["crashed"] else 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``ldjax reproduce [flags]``: parse, run, and return the exit status."""
    config = parse_config(Config, list(sys.argv[1:] if argv is None else argv), prog="ldjax reproduce")
    return exit_status(main(config))


if __name__ == "__main__":
    sys.exit(cli_main())
