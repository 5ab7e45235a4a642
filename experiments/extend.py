"""The paper's "extend" mitigation (SPEC §3): SFT on both (x, y⁺) and (x, y⁻), then DPO.

Baseline: SFT on (x, y⁺) only (:mod:`experiments.sft_dynamics`' cached stage), then full-parameter
off-policy DPO (:func:`experiments.dpo_dynamics.dpo_stage`: dpo_dynamics' own cached job).
Extend: the same number of SFT steps on (x, y⁺) and (x, y⁻) (``ldjax sft --sft-on-both``), then
the same DPO. The two phases are drawn on one axis (SFT steps, then DPO steps after them), as in
the paper's figure.

Claims (kind="paper", ≥ 3 seeds; extend − baseline per seed): during DPO chosen falls less; the
argmax path y* rises less; y⁻ starts DPO out of the valley (its log-prob at DPO start is higher).
kind="check": the first-order prediction tracks the actual one-step change at the decomposed DPO
steps of both runs.

Run: ``python -m experiments.extend --out results/extend`` (CPU; shares the pipeline cache of
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
from experiments.lm_pipeline import DPOExperimentConfig, open_experiment, read_curves, seed_band
from experiments.sft_dynamics import first_order_check, sft_stage
from experiments.sharpness import outcome
from ldjax.config import parse_config, to_dict

EXPERIMENT = "extend"
TOL = 0.1  # nats
RUNS = ("baseline", "extend")
FAMILIES = ("chosen", "rejected", "argmax_chosen")


@dataclasses.dataclass(frozen=True)
class Config(DPOExperimentConfig):
    """SFT on chosen only vs on chosen and rejected ("extend"), then the same DPO."""

    out: str = dataclasses.field(default="results/extend", metadata={"help": "output directory"})
    samples: int = dataclasses.field(default=3, metadata={"help": "generations per held-out prompt and model for the win rate (0 = no win rate)"})
    max_new_tokens: int = dataclasses.field(default=32, metadata={"help": "longest generation (world answers are <= 30 words + EOS)"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "sampling temperature of the generations"})
    judge: str = dataclasses.field(default="", metadata={"help": "with --data: a local Hugging Face causal LM directory as the judge (ldjax.judge.LMJudge); the embedded world uses its own generators (WorldJudge)"})



def claims(per_seed: dict[str, list[dict[str, float]]], seeds: list[int]) -> list[Claim]:
    b, e = per_seed["baseline"], per_seed["extend"]

    def diff(key):
        return [y[key] - x[key] for x, y in zip(b, e)]  # extend − baseline

    def both(key):
        return dict(baseline=effect([o[key] for o in b]), extend=effect([o[key] for o in e]))

    return [
        Claim(EXPERIMENT, "extend: chosen falls less during DPO (Δchosen extend − baseline, nats)", "paper",
              min(diff("d_chosen")) > TOL, effect(diff("d_chosen"), **both("d_chosen")), tuple(seeds)),
        Claim(EXPERIMENT, "extend: the argmax path y* rises less during DPO (Δy* extend − baseline, nats)", "paper",
              max(diff("d_argmax")) < -TOL, effect(diff("d_argmax"), **both("d_argmax")), tuple(seeds)),
        Claim(EXPERIMENT, "extend: y⁻ starts DPO out of the valley (log π(y⁻) at DPO start, extend − baseline, nats)",
              "paper", min(diff("rejected_start")) > TOL, effect(diff("rejected_start"), **both("rejected_start")),
              tuple(seeds)),
    ]


def judge_for(config: Config, job_config):
    """The offline judge: the world's own two generators or, with ``--data``, ``--judge``'s LM.

    On the world, generations are judged by :class:`ldjax.judge.StyleNgramJudge` (the generators
    as smoothed bigram models fitted to their own samples): the exact :class:`~ldjax.judge.WorldJudge`
    floors every text one word outside the grammar, which is nearly every tiny-model generation,
    so it would call almost every comparison a tie (its parse rate is reported beside).
    """
    from ldjax import cli
    from ldjax.judge import LMJudge, StyleNgramJudge
    if not config.data:
        return StyleNgramJudge.of_world(cli._world(job_config)), "world"
    if config.judge:
        return LMJudge(config.judge), "lm"
    return None, "none"


def judge_check(judge, test) -> dict[str, Any]:
    """How often the judge prefers the held-out chosen response to the rejected one (SPEC: ≥ 95 %)."""
    from ldjax.judge import binomial_interval
    prompts = [e.prompt for e in test]
    chosen = np.asarray(judge.scores(prompts, [e.chosen for e in test]))
    rejected = np.asarray(judge.scores(prompts, [e.rejected for e in test]))
    hits = int((chosen > rejected).sum())
    low, high = binomial_interval(hits, len(test))
    return {"rate": hits / len(test), "n": len(test), "low": low, "high": high}


def generations(model_dir: str, prompts: list[str], config, seed: int) -> list[list[str]]:
    """``config.samples`` sampled responses per prompt (sample k uses seed ``1000·seed + k``).

    Kept in ``generations.json`` beside the model (keyed by the prompts and sampling settings),
    so experiments judging the same final model (extend, mitigation) sample it once; a rebuilt
    stage removes its directory, and the file with it.
    """
    import hashlib
    from ldjax.generation import generate
    from ldjax.models.hf import load_pretrained
    settings = {"prompts": prompts, "samples": config.samples, "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = pathlib.Path(model_dir).parent / "generations.json"
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    if key in stored:
        return stored[key]
    model, tokenizer = load_pretrained(model_dir)
    texts = [generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                      seed=1000 * seed + k) for k in range(config.samples)]
    stored[key] = texts
    cache.write_text(json.dumps(stored))
    return texts


def two_phases(sft_curves: dict[str, Any], dpo_curves: dict[str, Any]) -> dict[str, Any]:
    """One axis: the SFT steps, then the DPO steps after them (DPO step 0 = the SFT's last step)."""
    last = sft_curves["steps"][-1]
    return {"steps": list(sft_curves["steps"]) + [last + s for s in dpo_curves["steps"][1:]],
            "boundary": last,
            **{f: list(sft_curves["logps"][f]) + list(dpo_curves["logps"][f][1:]) for f in FAMILIES}}


def plot(phases: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
    """One panel per family: each run's SFT → DPO curve (``phases[run]``: one per seed) on one
    axis, mean over seeds with a min–max band; dashed: DPO starts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(11.5, 3.3))
    for ax, family in zip(axes, FAMILIES):
        for i, run in enumerate(phases):
            seed_band(ax, phases[run][0]["steps"], [p[family] for p in phases[run]], color=f"C{i}", label=run)
        ax.axvline(next(iter(phases.values()))[0]["boundary"], color="grey", ls="--", lw=0.8)
        ax.set_title(f"log π({family}) — SFT | DPO", fontsize=9)
        ax.set_xlabel("step (SFT, then DPO)", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: Config) -> dict[str, Any]:
    """Baseline and extend SFT → DPO per seed; writes extend.png, results.json, claims.json, report.md."""
    t0 = time.perf_counter()
    out, pcfg, pipeline = open_experiment(config)
    overrides = dpo_overrides(config)
    seeds = list(config.seeds)
    per_seed: dict[str, list] = {r: [] for r in RUNS}
    phases: dict[str, list] = {r: [] for r in RUNS}
    records, finals = [], {}
    for seed in seeds:
        base, baseline_sft = sft_stage(pipeline, seed, config.sft_decompose_every)
        extend_sft = pipeline.sft(seed, base, name="sft_extend", sft_on_both=True)
        for run, origin, label in (("baseline", baseline_sft, "sft"), ("extend", extend_sft, "extend")):
            stage = dpo_stage(pipeline, seed, origin, label, "full", overrides, config.decompose_every)
            c = read_curves(stage)
            o = outcome(c)
            o["rejected_start"] = float(c["logps"]["rejected"][0])
            o["chosen_start"] = float(c["logps"]["chosen"][0])
            per_seed[run].append(o)
            phases[run].append(two_phases(read_curves(origin), c))
            records += [(seed, step, r) for step, r in c["decompose"]]
            finals.setdefault(seed, {})[run] = stage
            print(f"[extend] seed {seed} {run}: y⁻ at DPO start {o['rejected_start']:.1f}, Δchosen {o['d_chosen']:+.2f}, "
                  f"Δy* {o['d_argmax']:+.2f}", file=sys.stderr, flush=True)
    rows = claims(per_seed, seeds)
    check, check_value = first_order_check(records, seeds, EXPERIMENT, "DPO after both SFTs")
    rows.append(check)
    wins = win_rate_rows(config, finals, seeds, rows)
    write_claims(out, rows)
    plot(phases, out / "extend.png")
    wall = time.perf_counter() - t0
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "dpo_overrides": overrides, "seeds": seeds,
               "per_seed": per_seed, "phases": phases, "first_order": check_value, "win_rate": wins, "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, overrides, per_seed, rows, wall, wins))
    return results


def win_rate_rows(config: Config, finals: dict[int, dict[str, Any]], seeds: list[int], rows: list[Claim]) -> dict[str, Any]:
    """Extend vs baseline generations (the final DPO models) on every held-out prompt, judged offline.

    Appends the judge's own check (held-out chosen preferred to rejected ≥ 95 %, world judge) and
    the win-rate claim to ``rows``; returns the numbers (per seed and pooled, Wilson 95 % intervals).
    """
    from ldjax import cli
    from ldjax.judge import pool_win_rates, win_rate
    if not config.samples or not finals:
        return {"skipped": "--samples 0"}
    from ldjax.train.config import DPOConfig
    stage = finals[seeds[0]]["extend"]  # its job config names the data (world or --data) the models saw
    job_config = DPOConfig(**json.loads((stage.out / "stage.json").read_text())["config"])
    judge, kind = judge_for(config, job_config)
    if judge is None:
        return {"skipped": "--data without --judge: no offline judge for these responses"}
    _, test, _, _ = cli.load_examples(job_config)
    check = judge_check(judge, test)
    exact = None
    if kind == "world":
        from ldjax.judge import WorldJudge
        exact = WorldJudge(cli._world(job_config))
        check["exact"] = judge_check(exact, test)
        rows.append(Claim(EXPERIMENT, "the offline judge (the world's chosen- vs rejected-style generators as smoothed "
                                      "bigram models) prefers the held-out chosen response to the rejected one >= 95 % "
                                      "of the time", "check", check["rate"] >= 0.95, effect([check["rate"]], **check),
                          tuple(seeds)))
    prompts = [e.prompt for e in test]
    per_seed, parseable = [], []
    for seed in seeds:
        a = [r for rs in generations(finals[seed]["extend"].model_dir, prompts, config, seed) for r in rs]
        b = [r for rs in generations(finals[seed]["baseline"].model_dir, prompts, config, seed) for r in rs]
        per_seed.append(win_rate(judge, prompts * config.samples, a, b))
        if exact is not None:  # how many generations the exact grammar can write at all
            from ldjax.judge import LOG_FLOOR
            both = exact.scores(prompts * config.samples * 2, a + b)
            parseable.append(float(np.mean(both > LOG_FLOOR)))
        print(f"[extend] seed {seed}: extend vs baseline {per_seed[-1]}", file=sys.stderr, flush=True)
    pooled = pool_win_rates(per_seed)
    rows.append(Claim(EXPERIMENT, f"extend's generations win pairwise comparisons against the baseline's, judged offline "
                                  f"({kind} judge; {len(prompts)} held-out prompts × {config.samples} samples per seed; "
                                  "passes when the pooled 95 % Wilson interval lies above 0.5)", "paper",
                      pooled.low > 0.5, effect([w.rate for w in per_seed], pooled=pooled.rate, low=pooled.low,
                                               high=pooled.high, wins=pooled.wins, ties=pooled.ties,
                                               losses=pooled.losses), tuple(seeds)))
    return {"judge": kind, "judge_check": check, "prompts": len(prompts), "samples": config.samples,
            "exact_parseable": parseable,
            "per_seed": [dataclasses.asdict(w) for w in per_seed], "pooled": dataclasses.asdict(pooled)}


def report(config, pcfg, overrides, per_seed, rows, wall, wins=None) -> str:
    def fmt(run, key):
        v = [o[key] for o in per_seed[run]]
        return f"{np.mean(v):+.3g} ± {np.std(v):.2g}"

    opt = overrides or {"optimizer": pcfg.optimizer, "learning_rate": pcfg.dpo_lr}
    lines = [f"# The extend mitigation ({'quick' if config.quick else config.preset})", "",
             f"Data: {pcfg.data or 'the embedded world'}. SFT {pcfg.sft_steps} steps ({pcfg.optimizer} lr {pcfg.sft_lr}) "
             f"on chosen only (baseline) or on chosen and rejected (extend); then full-parameter off-policy DPO, "
             f"{opt['optimizer']} lr {opt['learning_rate']}, {pcfg.dpo_steps} steps, β {pcfg.beta}. Seeds "
             f"{list(config.seeds)}. Wall time {wall:.0f} s.", "", "![extend](extend.png)", "",
             "| run | log π(y⁺) at DPO start | log π(y⁻) at DPO start | Δ chosen in DPO | Δ y* in DPO | Δ rejected in DPO | ‖A‖_F at DPO start |",
             "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        lines.append(f"| {run} | {fmt(run, 'chosen_start')} | {fmt(run, 'rejected_start')} | {fmt(run, 'd_chosen')} | "
                     f"{fmt(run, 'd_argmax')} | {fmt(run, 'd_rejected')} | {fmt(run, 'a_norm')} |")
    if wins and "pooled" in wins:
        p = wins["pooled"]
        lines += ["", f"**Win rate** of extend over baseline ({wins['judge']} judge, {wins['prompts']} held-out prompts × "
                      f"{wins['samples']} samples × {len(config.seeds)} seeds; ties count half): {p['rate']:.3f} "
                      f"[{p['low']:.3f}, {p['high']:.3f}] (Wilson 95 %), {p['wins']} wins / {p['ties']} ties / "
                      f"{p['losses']} losses; per seed "
                      + ", ".join(f"{w['rate']:.3f}" for w in wins["per_seed"])
                      + f". The judge prefers the held-out chosen response in {wins['judge_check']['rate']:.1%} of "
                        f"{wins['judge_check']['n']} pairs. Samples of one prompt share the prompt: the pooled interval "
                        "counts comparisons, not independent prompts."
                      + (f" The exact grammar judge (`WorldJudge`) can write {np.mean(wins['exact_parseable']):.1%} of the "
                         "generations at all (the rest it floors, all ties), hence the smoothed judge."
                         if wins.get("exact_parseable") else "")]
    elif wins:
        lines += ["", f"Win rate: not measured ({wins.get('skipped')})."]
    lines += ["", "## Claims", "", claims_table([r.to_json() for r in rows]), ""]
    failed = [r for r in rows if r.kind == "paper" and not r.passed]
    if failed:
        b, e = per_seed["baseline"], per_seed["extend"]
        lines += ["## Explanation", "",
                  f"Not reproduced as measured: {'; '.join(r.claim for r in failed)}. Extend moved y⁻ at DPO start by "
                  f"{np.mean([y['rejected_start'] - x['rejected_start'] for x, y in zip(b, e)]):+.1f} nats and y⁺ by "
                  f"{np.mean([y['chosen_start'] - x['chosen_start'] for x, y in zip(b, e)]):+.1f}; the DPO that follows "
                  f"changed chosen by {np.mean([o['d_chosen'] for o in e]):+.2f} (baseline "
                  f"{np.mean([o['d_chosen'] for o in b]):+.2f}) and y* by {np.mean([o['d_argmax'] for o in e]):+.2f} "
                  f"(baseline {np.mean([o['d_argmax'] for o in b]):+.2f}). dpo_dynamics' decomposition gives the "
                  "per-term pushes behind such changes.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.extend"))
