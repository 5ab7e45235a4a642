"""Off-policy DPO probe dynamics (SPEC §3) and the squeezing effect, full-parameter vs head-only.

For each seed, off-policy DPO (β from the preset, the starting model as reference) runs from
the SFT model of :mod:`experiments.sft_dynamics` (the same cached stage) and from the base model,
each twice: training every parameter (the default) and training only the untied output head
(``lm_head``; every other parameter gets a zero update through :func:`experiments.lm_pipeline.head_only`).
SPEC §2: with only the head trainable the squeezing theorem holds exactly at each context
(identity K), while with every parameter the body's part of K competes with it.

Measured:

- probe curves of every family (spread over seeds) and SPEC §3's DPO claims as kind="paper"
  rows: rejected ↓ fast and far; chosen ↑ a little then ↓, ending below its start; every other
  probe ↓; the argmax path ``y*`` ↑ steadily; peakedness ‖A‖_F ↑;
- the squeeze per token, from the per-position distributions of the start and final models at
  the probe prompts: at the rejected response's contexts, the share of the probability mass the
  rejected tokens lost that landed on the start model's argmax token (and how often that token
  rose / was the largest gainer); at the chosen contexts, the change of the chosen token and of
  the argmax token where they differ, and of ‖π‖²;
- the per-step decomposition at a few tracked steps (tracker ``decompose_fn``): the update
  really taken split into the chosen term and the rejected term of the DPO gradient
  (:func:`experiments.lm_pipeline.split_update`) and into head and body parameters, and each
  part's first-order contribution to Δ log π(chosen) and Δ y*; plus the kind="check" row that
  the first-order prediction tracks the actual one-step change.

Run: ``python -m experiments.dpo_dynamics --out results/dpo_dynamics`` (CPU, a few minutes);
``--quick true``; ``--data FILE.jsonl``; ``--model DIR``; ``--preset paper --model PYTHIA_DIR
--data HH.jsonl`` (RMSprop 5e-7, batch 4, clip 10, β 0.1; GPU/TPU).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.claims import Claim, claims_table, effect, write_claims
from experiments.lm_pipeline import (DPOExperimentConfig, open_experiment, Pipeline, Stage, decomposition_hook, head_only,
                                     plot_curves, read_curves, rise_then_fall, rising_fraction)
from experiments.sft_dynamics import first_order_check, sft_stage
from ldjax.config import parse_config, to_dict
from ldjax.sequence_dynamics import PreferenceObjective

EXPERIMENT = "dpo_dynamics"
TOL = 0.1  # nats
STARTS = ("sft", "base")
TRAINABLE = ("full", "head")


@dataclasses.dataclass(frozen=True)
class Config(DPOExperimentConfig):
    """Off-policy DPO probe dynamics from the SFT and the base model, full-parameter vs head-only."""

    out: str = dataclasses.field(default="results/dpo_dynamics", metadata={"help": "output directory"})
    starts: tuple[str, ...] = dataclasses.field(default=STARTS, metadata={"help": "DPO starting points: sft, base"})
    trainable: tuple[str, ...] = dataclasses.field(default=TRAINABLE, metadata={"help": "full and/or head (lm_head only)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.starts or set(self.starts) - set(STARTS) or not self.trainable or set(self.trainable) - set(TRAINABLE):
            raise ValueError(f"Config.starts ⊆ {STARTS} and Config.trainable ⊆ {TRAINABLE}, both non-empty")


def dpo_overrides(config) -> dict[str, Any]:
    """Optimizer fields of the DPO jobs from a config with ``preset``, ``dpo_optimizer``, ``dpo_lr``
    (this experiment's, or :mod:`experiments.sharpness`' / :mod:`experiments.extend`'s)."""
    if config.preset == "paper":
        return {}
    lr = config.dpo_lr or (2e-3 if config.dpo_optimizer == "sgd" else 1e-5)
    return {"optimizer": config.dpo_optimizer, "learning_rate": lr}


DECOMPOSE_FAMILIES = ("chosen", "rejected", "chosen_rephrase", "other_train")


def dpo_stage(pipeline: Pipeline, seed: int, origin: Stage, start: str, trainable: str, overrides: dict[str, Any],
              decompose_every: int, variant: str = "") -> Stage:
    """The DPO job from ``origin`` (named ``dpo_<start>_<trainable>[_<variant>]``) with the per-step
    decomposition hook.

    Other experiments that start DPO from the same stage with the same settings get this job
    from the cache (the name, tag and config make its key); a job with other settings needs its
    own ``variant`` name, or it would replace the cached one.
    """
    objective = PreferenceObjective(loss_type=overrides.get("loss_type", "sigmoid"), beta=pipeline.config.beta,
                                    negative_weight_power=overrides.get("negative_weight_power", 0.0))
    hook = decomposition_hook(objective, every=decompose_every, families=DECOMPOSE_FAMILIES)
    name = f"dpo_{start}_{trainable}" + (f"_{variant}" if variant else "")
    return pipeline.dpo(seed, origin, name=name, tag=f"decompose:every={decompose_every};{trainable}",
                        tracker_hook=hook, optimizer_wrapper=head_only if trainable == "head" else None, **overrides)


# ------------------------------------------------------------------------------ per-token squeeze

def _job_config(stage: Stage):
    from ldjax.train.config import DPOConfig
    body = json.loads((stage.out / "stage.json").read_text())
    return DPOConfig(**body["config"])


def _distributions(model_dir: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Next-token distributions (P, T, V) of a model on one probe family (row t-1 predicts token t)."""
    from ldjax.models.hf import load_pretrained
    model, _ = load_pretrained(model_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    logits = model(jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["attention_mask"]))
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), np.float64)


def token_squeeze(start_dir: str, stage: Stage) -> dict[str, float]:
    """Where the probability mass went, per position, between the start and the final model.

    Rejected contexts (every scored rejected token after the first one that differs from chosen):
    ``share_to_argmax`` = Σ gain of the start model's argmax token v* (≠ the rejected token) /
    Σ mass lost by the rejected token; ``argmax_rises`` = share of those contexts where v* gained;
    ``argmax_top_gainer`` = share where v* gained most among the other tokens; ``rejected_lost``:
    mean mass lost. Chosen contexts: mean Δ log π of the chosen token, and at the contexts where
    the start argmax differs from the chosen token, the mean Δ log π of the argmax token and how
    often it rose; ``sq_norm_change``: mean Δ‖π‖² per chosen context.
    """
    from ldjax import cli, probes
    from ldjax.models.hf import load_tokenizer
    config = _job_config(stage)
    tokenizer = load_tokenizer(start_dir)
    texts = cli.probe_texts(config)
    vocab = json.loads((pathlib.Path(start_dir) / "config.json").read_text())["vocab_size"]
    probe_set = probes.tokenize_probes(texts, tokenizer, **cli._token_kwargs(config, tokenizer, vocab))
    out: dict[str, float] = {}
    for side in ("rejected", "chosen"):
        a = probe_set.arrays[side]
        p0, p1 = _distributions(start_dir, a), _distributions(stage.model_dir, a)
        ids, mask = a["input_ids"], a["loss_mask"]
        rows_p0, rows_p1 = p0[:, :-1], p1[:, :-1]  # row t-1 predicts token t
        y = ids[:, 1:]
        scored = mask[:, 1:] != 0
        if side == "rejected":
            c_ids = probe_set.arrays["chosen"]["input_ids"][:, 1:]
            differs = np.cumsum((y != c_ids) & scored, axis=1) > 0
            scored = scored & differs
        b, t = np.nonzero(scored)
        if not len(b):
            continue
        q0, q1 = rows_p0[b, t], rows_p1[b, t]  # (N, V)
        yy = y[b, t]
        n = np.arange(len(b))
        if side == "rejected":
            masked = q0.copy()
            masked[n, yy] = -1
            star = masked.argmax(-1)
            lost = q0[n, yy] - q1[n, yy]
            gain = q1 - q0
            gain_star = gain[n, star]
            gain[n, yy] = -np.inf
            out.update(rejected_contexts=float(len(b)), rejected_lost=float(lost.mean()),
                       share_to_argmax=float(gain_star.sum() / max(lost.sum(), 1e-30)),
                       argmax_rises=float((gain_star > 0).mean()),
                       argmax_top_gainer=float((gain.argmax(-1) == star).mean()),
                       rejected_sq_norm_change=float(((q1 ** 2).sum(-1) - (q0 ** 2).sum(-1)).mean()))
        else:
            star = q0.argmax(-1)
            dlog_y = np.log(q1[n, yy]) - np.log(q0[n, yy])
            other = star != yy
            dlog_star = np.log(q1[n, star]) - np.log(q0[n, star])
            out.update(chosen_contexts=float(len(b)), chosen_token_dlogp=float(dlog_y.mean()),
                       chosen_is_argmax=float((~other).mean()),
                       argmax_token_dlogp_where_not_chosen=float(dlog_star[other].mean()) if other.any() else float("nan"),
                       argmax_rises_where_not_chosen=float((dlog_star[other] > 0).mean()) if other.any() else float("nan"),
                       sq_norm_change=float(((q1 ** 2).sum(-1) - (q0 ** 2).sum(-1)).mean()))
    return out


# ------------------------------------------------------------------------------ claims

def dpo_claims(label: str, curves: list[dict[str, Any]], seeds: list[int]) -> tuple[list[Claim], dict[str, Any]]:
    """SPEC §3's off-policy DPO claims for one (start, trainable) variant, from the probe curves."""
    rows: list[Claim] = []
    numbers: dict[str, Any] = {}

    def add(claim: str, per_seed, passed: bool, **extra: Any) -> None:
        rows.append(Claim(EXPERIMENT, f"DPO {label}: {claim}", "paper", bool(passed), effect(per_seed, **extra),
                          tuple(seeds)))
        numbers[claim] = rows[-1].value

    logps = [c["logps"] for c in curves]
    delta = {f: [float(l[f][-1] - l[f][0]) for l in logps] for f in logps[0]}
    half = []
    for l in logps:
        y = np.asarray(l["rejected"]) - l["rejected"][0]
        target = y[-1] / 2
        half.append(float(np.argmax(y <= target) / max(1, len(y) - 1)) if y[-1] < 0 else 1.0)
    add("rejected falls fast and far (end - start, nats; |fall| > |chosen change|)", delta["rejected"],
        all(r < -TOL and abs(r) > abs(c) for r, c in zip(delta["rejected"], delta["chosen"])),
        half_fall_at_fraction_of_run=effect(half))
    rf = [rise_then_fall(l["chosen"]) for l in logps]
    add("chosen rises a little, then falls below its start (end - start, nats)", delta["chosen"],
        all(r > TOL and d < -TOL for (r, _), d in zip(rf, delta["chosen"])), early_rise=effect([r for r, _ in rf]))
    others = [f for f in logps[0] if f not in ("chosen", "rejected") and not f.startswith("argmax")]
    worst = [max(delta[f][i] for f in others) for i in range(len(seeds))]
    add("every other probe family falls (largest end - start over the other families, nats)", worst,
        max(worst) < -TOL, per_family={f: effect(delta[f]) for f in others})
    frac = [rising_fraction(l["argmax_chosen"]) for l in logps]
    add("argmax path y* along chosen rises steadily (end - start, nats)", delta["argmax_chosen"],
        min(delta["argmax_chosen"]) > TOL and min(frac) >= 0.7, rising_fraction=effect(frac))
    a_norm = [c["a_norm"][-1] - c["a_norm"][0] for c in curves]
    add("the model grows peakier along chosen (end - start of mean ||A||_F)", a_norm, min(a_norm) > 0,
        off_argmax_change=effect([c["off_argmax"][-1] - c["off_argmax"][0] for c in curves]))
    numbers["end_minus_start"] = {f: effect(v) for f, v in delta.items()}
    return rows, numbers


def summarize_terms(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Mean per-step first-order contribution of each update part to Δ log π(chosen) and Δ y*
    (along chosen) and to Δ log π(rejected), over the decomposed steps (and seeds)."""
    out: dict[str, dict[str, list[float]]] = {}
    for family in ("chosen", "rejected"):
        parts = sorted({p for r in records for p in r["terms"].get(family, {})})
        out[family] = {p: np.mean([r["terms"][family][p] for r in records], axis=0).tolist() for p in parts}
    return out


def plot_terms(terms_by_variant: dict[str, dict], path: pathlib.Path) -> None:
    """Bars: each update part's mean per-step contribution to Δ log π(chosen) and Δ y*, per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(terms_by_variant)
    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.2), squeeze=False)
    for ax, v in zip(axes[0], variants):
        parts = terms_by_variant[v].get("chosen", {})
        names = [p for p in parts if not p.startswith("rest") or any(abs(x) > 0 for x in parts[p])]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [parts[p][0] for p in names], 0.4, label="Δ log π(chosen)")
        ax.bar(x + 0.2, [parts[p][1] for p in names], 0.4, label="Δ y*")
        ax.set_xticks(x, names, rotation=30, fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(v, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("per-step first-order contributions (nats per step, mean over decomposed steps and seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def main(config: Config) -> dict[str, Any]:
    """Runs every (seed, start, trainable) DPO job and writes figures, results.json, claims.json, report.md."""
    start_time = time.perf_counter()
    out, pcfg, pipeline = open_experiment(config)
    seeds = list(config.seeds)
    overrides = dpo_overrides(config)
    variants = [(s, t) for s in config.starts for t in config.trainable]
    curves: dict[str, list] = {f"{s}/{t}": [] for s, t in variants}
    records: dict[str, list] = {f"{s}/{t}": [] for s, t in variants}
    squeeze: dict[str, list] = {f"{s}/{t}": [] for s, t in variants}
    conditions, stages = [], {}
    for seed in seeds:
        base, sft = sft_stage(pipeline, seed, config.sft_decompose_every)
        sft_curves = read_curves(sft)
        conditions.append({"seed": seed,
                           "argmax_minus_chosen_at_dpo_start": sft_curves["logps"]["argmax_chosen"][-1]
                           - sft_curves["logps"]["chosen"][-1],
                           "rejected_minus_chosen_at_dpo_start": sft_curves["logps"]["rejected"][-1]
                           - sft_curves["logps"]["chosen"][-1]})
        for s, t in variants:
            origin = sft if s == "sft" else base
            stage = dpo_stage(pipeline, seed, origin, s, t, overrides, config.decompose_every)
            key = f"{s}/{t}"
            stages[f"seed{seed}/{key}"] = {"dir": str(stage.out), "reused": stage.reused, "seconds": stage.seconds}
            c = read_curves(stage)
            curves[key].append(c)
            records[key] += [(seed, step, r) for step, r in c["decompose"]]
            squeeze[key].append(token_squeeze(origin.model_dir, stage))
            print(f"[dpo_dynamics] seed {seed} {key}: chosen {c['logps']['chosen'][0]:.1f} -> {c['logps']['chosen'][-1]:.1f}"
                  f", rejected {c['logps']['rejected'][0]:.1f} -> {c['logps']['rejected'][-1]:.1f}, argmax "
                  f"{c['logps']['argmax_chosen'][0]:.1f} -> {c['logps']['argmax_chosen'][-1]:.1f}", file=sys.stderr)

    rows, numbers, terms = [], {}, {}
    for key in curves:
        label = f"from {key.split('/')[0]}, {'head only' if key.endswith('head') else 'all parameters'}"
        r, n = dpo_claims(label, curves[key], seeds)
        rows += r
        numbers[key] = n
        terms[key] = summarize_terms([rec for _, _, rec in records[key]])
        plot_curves(curves[key], out / f"dpo_curves_{key.replace('/', '_')}.png", f"DPO {label}")
    all_records = [rec for key in records for rec in records[key]]
    check, check_value = first_order_check(all_records, seeds, EXPERIMENT, "DPO")
    rows.append(check)
    write_claims(out, rows)
    plot_terms(terms, out / "dpo_decomposition_terms.png")
    squeeze_summary = {k: {m: effect([s[m] for s in v]) for m in v[0]} for k, v in squeeze.items() if v and v[0]}
    wall = time.perf_counter() - start_time
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "dpo_overrides": overrides, "seeds": seeds,
               "stages": stages, "conditions": conditions, "curves": curves, "claims": numbers, "terms": terms,
               "token_squeeze": squeeze_summary, "first_order": check_value,
               "decompositions": {k: [{"seed": s, "step": st, **r} for s, st, r in v] for k, v in records.items()},
               "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, overrides, rows, numbers, terms, squeeze_summary, conditions, wall))
    return results


def _fmt(e: dict) -> str:
    return f"{e['mean']:+.3g} ± {e['std']:.2g}"


def report(config, pcfg, overrides, rows, numbers, terms, squeeze, conditions, wall) -> str:
    """report.md: setting, conditions at DPO start, claims, per-token squeeze, decomposition terms."""
    source = pcfg.data or "the embedded world"
    model = pcfg.model or f"tiny {pcfg.arch} (d={pcfg.d_model}, {pcfg.num_layers} layers, untied head) pretrained here"
    opt = overrides or {"optimizer": pcfg.optimizer, "learning_rate": pcfg.dpo_lr}
    lines = [f"# Off-policy DPO probe dynamics ({'quick' if config.quick else config.preset})", "",
             f"Data: {source}. Model: {model}. DPO: β {pcfg.beta}, {opt['optimizer']} lr {opt['learning_rate']}, "
             f"{pcfg.dpo_steps} steps, batch {pcfg.batch_size}, from the SFT model (SFT: {pcfg.optimizer} lr "
             f"{pcfg.sft_lr}, {pcfg.sft_steps} steps) and from the base model; all parameters vs only `lm_head`. "
             f"Seeds {list(config.seeds)}. Wall time {wall:.0f} s.", "",
             "## Conditions at DPO start (SPEC §3: argmax − chosen ≥ 10 nats after SFT)", "",
             "| seed | argmax − chosen (nats) | rejected − chosen (nats) |", "|---|---|---|"]
    lines += [f"| {c['seed']} | {c['argmax_minus_chosen_at_dpo_start']:.1f} | {c['rejected_minus_chosen_at_dpo_start']:.1f} |"
              for c in conditions]
    lines += ["", "## Claims (SPEC §3, off-policy DPO)", "", claims_table([r.to_json() for r in rows]), ""]
    for key in numbers:
        lines += [f"![{key}](dpo_curves_{key.replace('/', '_')}.png)", ""]
    lines += ["## End − start per family (nats, mean ± std over seeds)", "",
              "| family | " + " | ".join(numbers) + " |", "|---|" + "---|" * len(numbers)]
    fams = list(next(iter(numbers.values()))["end_minus_start"])
    lines += [f"| {f} | " + " | ".join(_fmt(numbers[k]["end_minus_start"][f]) for k in numbers) + " |" for f in fams]
    lines += ["", "## The squeeze per token (start model → final model, at the probe prompts)", "",
              "| metric | " + " | ".join(squeeze) + " |", "|---|" + "---|" * len(squeeze)]
    metrics = list(next(iter(squeeze.values()))) if squeeze else []
    lines += [f"| {m} | " + " | ".join(_fmt(squeeze[k][m]) for k in squeeze) + " |" for m in metrics]
    lines += ["", "`share_to_argmax`: of the mass the rejected tokens lost at their contexts, the share gained by the "
              "start model's argmax token there (1 = all of it, the identity-K squeeze). `argmax_top_gainer`: how often "
              "that token was the largest gainer.", "",
              "## Decomposition: which part of the update moved chosen and y*", "",
              "Mean per-step first-order contribution (nats per step) of each part of the update really taken: the "
              "chosen term and the rejected term of the DPO gradient (`u ⊙ d± / (d⁺ + d⁻)`, exact for SGD), each "
              "split into `lm_head` and body parameters.", "", "![terms](dpo_decomposition_terms.png)", ""]
    for key, t in terms.items():
        lines += [f"**{key}**", "", "| part | Δ log π(chosen) | Δ y* (chosen ctx) | Δ log π(rejected) | Δ y* (rejected ctx) |",
                  "|---|---|---|---|---|"]
        for part in t.get("chosen", {}):
            c, r = t["chosen"][part], t.get("rejected", {}).get(part, [float("nan")] * 2)
            lines.append(f"| {part} | {c[0]:+.4f} | {c[1]:+.4f} | {r[0]:+.4f} | {r[1]:+.4f} |")
        lines.append("")
    lines += ["## Explanation", "", explanation(numbers, terms, squeeze), ""]
    return "\n".join(lines) + "\n"


def explanation(numbers: dict, terms: dict, squeeze: dict) -> str:
    """A data-driven paragraph: which term pushed chosen down in each variant, head vs body, squeeze or flattening."""
    out = []
    for key, t in terms.items():
        parts = t.get("chosen", {})
        if not parts:
            continue
        ch = numbers[key]["end_minus_start"]["chosen"]["mean"]
        st = numbers[key]["end_minus_start"]["argmax_chosen"]["mean"]
        neg = {p: v[0] for p, v in parts.items() if v[0] < 0}
        worst = min(parts, key=lambda p: parts[p][0])
        star_best = max(parts, key=lambda p: parts[p][1])
        sq = squeeze.get(key, {})
        share = sq.get("share_to_argmax", {}).get("mean", float("nan"))
        out.append(
            f"- **{key}**: chosen {ch:+.2f} nats, y* {st:+.2f} nats over the run. Per step, the largest push-down of "
            f"chosen came from `{worst}` ({parts[worst][0]:+.4f}); the parts lowering chosen: "
            + ", ".join(f"`{p}` {v:+.4f}" for p, v in sorted(neg.items(), key=lambda kv: kv[1]))
            + f". y* was raised most by `{star_best}` ({parts[star_best][1]:+.4f}/step, rejected/head "
            f"{parts.get('rejected/head', [0, 0])[1]:+.4f}, rejected/body {parts.get('rejected/body', [0, 0])[1]:+.4f}). "
            f"Share of the rejected tokens' lost mass landing on the argmax token: {share:.2f} "
            f"({'a squeeze' if share > 0.5 and st > 0 else 'no squeeze: the mass is spread (flattening)' if st <= 0 else 'partial'}).")
    return "\n".join(out)


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.dpo_dynamics"))
