"""Beyond the paper: a mitigation of our own, aimed at the term the decomposition blamed.

dpo_dynamics' per-step decomposition (and regime_search's, in every SGD row) finds the
push-down of chosen and most of the rise of ``y*`` in one place: the *rejected* term of the DPO
gradient, acting through the body of the kernel. By the squeezing lemma (SPEC §1.4) a push-down
of a token the model already gives almost no mass sends that mass to the argmax — the rejected
tokens deep in the valley are the ones that squeeze. So we weight the push-down of each rejected
token by its own probability: ``G⁻_t = c⁻ π(y⁻_t)^α (π − e_y)`` (``ldjax dpo
--negative-weight-power α``, :func:`ldjax.losses.reweighted_sequence_logps`). The loss value,
its reference log-probs and the chosen term stay DPO's; only where the rejected gradient lands
changes. The per-step decomposition runs with the same per-token coefficients.

Three runs per seed, from the same SFT model (or, for extend, the same number of SFT steps):

- ``baseline``: SFT on y⁺, then DPO (dpo_dynamics' cached job);
- ``extend``: the paper's mitigation (extend's cached job);
- ``weighted``: SFT on y⁺, then DPO with the probability-weighted negative gradient.

Claims (kind="paper", weighted − baseline per seed, ≥ 3 seeds): chosen falls less; y* rises
less; the preference is still learned (the chosen−rejected gap widens during DPO); the rejected
term's per-step push on chosen (the decomposition's culprit) is smaller; weighted's generations
win against the baseline's and against extend's (offline judge, pooled Wilson interval above
0.5). Against extend: the same numbers side by side. kind="check": the first-order
prediction of the weighted run tracks the actual change.

Run: ``python -m experiments.mitigation --out results/mitigation`` (CPU, shares the pipeline
cache); ``--quick true``; ``--data FILE``; ``--model DIR``; ``--preset paper --model DIR --data HH.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np

from experiments.claims import Claim, claims_table, effect, write_claims
from experiments.dpo_dynamics import dpo_overrides, dpo_stage
from experiments.extend import generations, judge_check, judge_for, plot, two_phases
from experiments.lm_pipeline import DPOExperimentConfig, open_experiment, read_curves
from experiments.sft_dynamics import first_order_check, sft_stage
from experiments.sharpness import outcome
from ldjax.config import parse_config, to_dict

EXPERIMENT = "mitigation"
TOL = 0.1  # nats
RUNS = ("baseline", "extend", "weighted")


@dataclasses.dataclass(frozen=True)
class Config(DPOExperimentConfig):
    """DPO with a probability-weighted negative gradient, against DPO and against extend."""

    out: str = dataclasses.field(default="results/mitigation", metadata={"help": "output directory"})
    powers: tuple[float, ...] = dataclasses.field(default=(0.5, 1.0), metadata={"help": "alpha of the weighted runs (rejected token t's push-down scaled by pi(y-_t)^alpha); the claims and win rates are the first's, the others are reported beside"})
    samples: int = dataclasses.field(default=3, metadata={"help": "generations per held-out prompt and model for the win rates (0 = none)"})
    max_new_tokens: int = dataclasses.field(default=32, metadata={"help": "longest generation"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "sampling temperature of the generations"})
    judge: str = dataclasses.field(default="", metadata={"help": "with --data: a local Hugging Face causal LM directory as the judge"})

    def __post_init__(self):
        super().__post_init__()
        if not self.powers or min(self.powers) <= 0:
            raise ValueError(f"Config.powers: at least one, each > 0, got {self.powers}")


def weighted_run(config: Config, power: float) -> str:
    """The run name of a power: ``weighted`` for the first (the claims'), ``weighted α=<p>`` for the others."""
    return "weighted" if power == config.powers[0] else f"weighted α={power:g}"


def rejected_push(records: list[dict]) -> dict[str, float]:
    """Mean per-step first-order contribution of the rejected term (head + body) to Δ log π(chosen)
    and Δ y*, and of its body part alone, over the decomposed steps."""
    def mean(part, i):
        return float(np.mean([r["terms"]["chosen"][part][i] for r in records])) if records else float("nan")
    return {"on_chosen": mean("rejected/head", 0) + mean("rejected/body", 0),
            "on_argmax": mean("rejected/head", 1) + mean("rejected/body", 1),
            "body_on_chosen": mean("rejected/body", 0), "head_on_chosen": mean("rejected/head", 0)}


def claims(per_seed: dict[str, list[dict[str, float]]], seeds: list[int], power: float) -> list[Claim]:
    b, w, e = per_seed["baseline"], per_seed["weighted"], per_seed["extend"]

    def diff(key, other=b):
        return [y[key] - x[key] for x, y in zip(other, w)]  # weighted − other

    def runs(key):
        return {run: effect([o[key] for o in values]) for run, values in per_seed.items()}

    name = f"ours (π(y⁻_t)^{power:g}-weighted negative gradient)"
    margin = [o["d_chosen"] - o["d_rejected"] for o in w]
    return [
        Claim(EXPERIMENT, f"{name}: chosen falls less during DPO than with plain DPO (Δchosen weighted − baseline, nats)",
              "paper", min(diff("d_chosen")) > TOL,
              effect(diff("d_chosen"), weighted_minus_extend=effect(diff("d_chosen", e)), **runs("d_chosen")), tuple(seeds)),
        Claim(EXPERIMENT, f"{name}: the argmax path y* rises less than with plain DPO (Δy* weighted − baseline, nats)",
              "paper", max(diff("d_argmax")) < -TOL,
              effect(diff("d_argmax"), weighted_minus_extend=effect(diff("d_argmax", e)), **runs("d_argmax")), tuple(seeds)),
        Claim(EXPERIMENT, f"{name}: the preference is still learned (log π(y⁺) − log π(y⁻) widens during DPO, nats)",
              "paper", min(margin) > TOL,
              effect(margin, baseline=effect([o["d_chosen"] - o["d_rejected"] for o in b]),
                     extend=effect([o["d_chosen"] - o["d_rejected"] for o in e])), tuple(seeds)),
        Claim(EXPERIMENT, f"{name}: the rejected term's per-step push on chosen — the decomposition's culprit — is "
                          "smaller than plain DPO's (weighted − baseline, nats per step)", "paper",
              min(diff("push_on_chosen")) > 0,
              effect(diff("push_on_chosen"), weighted=effect([o["push_on_chosen"] for o in w]),
                     baseline=effect([o["push_on_chosen"] for o in b]),
                     weighted_body=effect([o["push_body_on_chosen"] for o in w]),
                     baseline_body=effect([o["push_body_on_chosen"] for o in b])), tuple(seeds)),
    ]


def main(config: Config) -> dict[str, Any]:
    """Baseline, extend and weighted SFT → DPO per seed; writes mitigation.png, results.json, claims.json, report.md."""
    t0 = time.perf_counter()
    out, pcfg, pipeline = open_experiment(config)
    overrides = dpo_overrides(config)
    seeds = list(config.seeds)
    runs = {"baseline": 0.0, "extend": 0.0, **{weighted_run(config, p): p for p in config.powers}}
    per_seed: dict[str, list] = {r: [] for r in runs}
    phases: dict[str, list] = {r: [] for r in runs}
    records, finals = [], {}
    for seed in seeds:
        base, baseline_sft = sft_stage(pipeline, seed, config.sft_decompose_every)
        extend_sft = pipeline.sft(seed, base, name="sft_extend", sft_on_both=True)
        jobs = [("baseline", baseline_sft, "sft", overrides, ""), ("extend", extend_sft, "extend", overrides, "")]
        jobs += [(run, baseline_sft, "sft", {**overrides, "negative_weight_power": p}, f"nw{p:g}")
                 for run, p in runs.items() if p]
        for run, origin, label, opts, variant in jobs:
            stage = dpo_stage(pipeline, seed, origin, label, "full", opts, config.decompose_every, variant=variant)
            c = read_curves(stage)
            o = outcome(c)
            decomposed = [r for _, r in c["decompose"]]
            push = rejected_push(decomposed)
            o.update(push_on_chosen=push["on_chosen"], push_on_argmax=push["on_argmax"],
                     push_body_on_chosen=push["body_on_chosen"], push_head_on_chosen=push["head_on_chosen"],
                     rejected_start=float(c["logps"]["rejected"][0]))
            per_seed[run].append(o)
            phases[run].append(two_phases(read_curves(origin), c))
            if run == "weighted":
                records += [(seed, step, r) for step, r in c["decompose"]]
            finals.setdefault(seed, {})[run] = stage
            print(f"[mitigation] seed {seed} {run}: Δchosen {o['d_chosen']:+.2f}, Δy* {o['d_argmax']:+.2f}, "
                  f"Δrejected {o['d_rejected']:+.2f}, rejected push on chosen {push['on_chosen']:+.3f}/step",
                  file=sys.stderr, flush=True)
    rows = claims(per_seed, seeds, config.powers[0])
    check, check_value = first_order_check(records, seeds, EXPERIMENT,
                                           f"DPO with the π(y⁻_t)^{config.powers[0]:g}-weighted negative gradient")
    rows.append(check)
    wins = win_rates(config, finals, seeds, rows)
    write_claims(out, rows)
    plot(phases, out / "mitigation.png")
    wall = time.perf_counter() - t0
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "dpo_overrides": overrides, "seeds": seeds,
               "per_seed": per_seed, "phases": phases, "first_order": check_value, "win_rates": wins, "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, overrides, per_seed, rows, wall, wins))
    return results


def win_rates(config: Config, finals: dict[int, dict[str, Any]], seeds: list[int], rows: list[Claim]) -> dict[str, Any]:
    """Weighted vs baseline and weighted vs extend on every held-out prompt, judged offline
    (:func:`experiments.extend.judge_for`); appends one claim per comparison to ``rows``."""
    from ldjax import cli
    from ldjax.judge import pool_win_rates, win_rate
    from ldjax.train.config import DPOConfig
    if not config.samples or not finals:
        return {"skipped": "--samples 0"}
    stage = finals[seeds[0]]["weighted"]
    job_config = DPOConfig(**json.loads((stage.out / "stage.json").read_text())["config"])
    judge, kind = judge_for(config, job_config)
    if judge is None:
        return {"skipped": "--data without --judge: no offline judge for these responses"}
    _, test, _, _ = cli.load_examples(job_config)
    prompts = [e.prompt for e in test]
    texts = {(seed, run): [r for rs in generations(finals[seed][run].model_dir, prompts, config, seed) for r in rs]
             for seed in seeds for run in RUNS}  # (the other powers are not sampled)
    out: dict[str, Any] = {"judge": kind, "judge_check": judge_check(judge, test), "prompts": len(prompts),
                           "samples": config.samples}
    for other in ("baseline", "extend"):
        per_seed = [win_rate(judge, prompts * config.samples, texts[seed, "weighted"], texts[seed, other]) for seed in seeds]
        pooled = pool_win_rates(per_seed)
        out[f"vs_{other}"] = {"per_seed": [dataclasses.asdict(w) for w in per_seed], "pooled": dataclasses.asdict(pooled)}
        print(f"[mitigation] weighted vs {other}: {pooled.rate:.3f} [{pooled.low:.3f}, {pooled.high:.3f}]",
              file=sys.stderr, flush=True)
        against = "plain DPO's" if other == "baseline" else "extend's (the paper's mitigation)"
        rows.append(Claim(
            EXPERIMENT, f"ours: the weighted run's generations win pairwise comparisons against {against}, judged "
                        f"offline ({kind} judge; {len(prompts)} held-out prompts × {config.samples} samples per seed; "
                        "passes when the pooled 95 % Wilson interval lies above 0.5)", "paper", pooled.low > 0.5,
            effect([w.rate for w in per_seed], pooled=pooled.rate, low=pooled.low, high=pooled.high,
                   wins=pooled.wins, ties=pooled.ties, losses=pooled.losses), tuple(seeds)))
    return out


def report(config, pcfg, overrides, per_seed, rows, wall, wins=None) -> str:
    def fmt(run, key, digits=3):
        v = [o[key] for o in per_seed[run]]
        return f"{np.mean(v):+.{digits}g} ± {np.std(v):.2g}"

    opt = overrides or {"optimizer": pcfg.optimizer, "learning_rate": pcfg.dpo_lr}
    lines = [f"# Our mitigation: the probability-weighted negative gradient ({'quick' if config.quick else config.preset})", "",
             f"Data: {pcfg.data or 'the embedded world'}. From the SFT model ({pcfg.sft_steps} steps on y⁺; extend: the "
             f"same steps on y⁺ and y⁻), full-parameter off-policy DPO, {opt['optimizer']} lr {opt['learning_rate']}, "
             f"{pcfg.dpo_steps} steps, β {pcfg.beta}; `weighted` scales rejected token t's push-down by "
             f"π(y⁻_t)^α (`ldjax dpo --negative-weight-power α`), α = {config.powers[0]:g}"
             + (f" (also {', '.join(f'{p:g}' for p in config.powers[1:])}, reported beside)" if config.powers[1:] else "")
             + f". Seeds {list(config.seeds)}. "
             f"Wall time {wall:.0f} s.", "", "![mitigation](mitigation.png)", "",
             "| run | Δ chosen in DPO | Δ y* in DPO | Δ rejected in DPO | rejected term's push on chosen (nats/step) | its body part | its push on y* |",
             "|---|---|---|---|---|---|---|"]
    for run in per_seed:
        lines.append(f"| {run} | {fmt(run, 'd_chosen')} | {fmt(run, 'd_argmax')} | {fmt(run, 'd_rejected')} | "
                     f"{fmt(run, 'push_on_chosen')} | {fmt(run, 'push_body_on_chosen')} | {fmt(run, 'push_on_argmax')} |")
    if wins and "vs_baseline" in wins:
        for other in ("baseline", "extend"):
            p = wins[f"vs_{other}"]["pooled"]
            lines += ["", f"**Win rate** weighted vs {other} ({wins['judge']} judge, {wins['prompts']} held-out prompts × "
                          f"{wins['samples']} samples × {len(config.seeds)} seeds; ties count half): {p['rate']:.3f} "
                          f"[{p['low']:.3f}, {p['high']:.3f}] (Wilson 95 %), {p['wins']} wins / {p['ties']} ties / "
                          f"{p['losses']} losses."]
        lines += ["", f"The judge prefers the held-out chosen response in {wins['judge_check']['rate']:.1%} of "
                      f"{wins['judge_check']['n']} pairs."]
    elif wins:
        lines += ["", f"Win rates: not measured ({wins.get('skipped')})."]
    lines += ["", "## Claims", "", claims_table([r.to_json() for r in rows]), ""]
    b, w = per_seed["baseline"], per_seed["weighted"]
    failed = [r for r in rows if r.kind == "paper" and not r.passed]
    lines += ["## What the decomposition says", "",
              f"Plain DPO's rejected term pushes chosen by {np.mean([o['push_on_chosen'] for o in b]):+.3f} nats per "
              f"decomposed step ({np.mean([o['push_body_on_chosen'] for o in b]):+.3f} of it through the body) and y* by "
              f"{np.mean([o['push_on_argmax'] for o in b]):+.3f}; with the weighting the same term gives "
              f"{np.mean([o['push_on_chosen'] for o in w]):+.3f} ({np.mean([o['push_body_on_chosen'] for o in w]):+.3f} "
              f"through the body) and {np.mean([o['push_on_argmax'] for o in w]):+.3f}. Over the run chosen moved "
              f"{np.mean([o['d_chosen'] for o in w]):+.2f} (plain {np.mean([o['d_chosen'] for o in b]):+.2f}), y* "
              f"{np.mean([o['d_argmax'] for o in w]):+.2f} (plain {np.mean([o['d_argmax'] for o in b]):+.2f}) and "
              f"rejected {np.mean([o['d_rejected'] for o in w]):+.2f} (plain {np.mean([o['d_rejected'] for o in b]):+.2f})."
              + (f" Not reproduced as measured: {'; '.join(r.claim for r in failed)}." if failed else ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.mitigation"))
