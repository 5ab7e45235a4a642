"""How exact is the first-order A·K·G prediction on a language model? The gap vs η, SFT and DPO.

SPEC §1.2–1.4: one step with update ``u`` changes every observed response's log-probability by
``Δ log π(y|x) = Σ_m [A J(χ_o) u]_m (read at y_m) + O(‖u‖²)``. For SGD ``u = −η ∇L``; for an
adaptive optimizer (Adam, the paper's RMSprop) ``u`` is whatever optax produced, and the
prediction is taken along that ``u`` (:func:`ldjax.sequence_dynamics.optimizer_step`). The gap
between prediction and real step must scale as η²: halving η quarters it. This is the language
model version of :mod:`experiments.first_order`.

Setting, per seed: the shared pipeline (:mod:`experiments.lm_pipeline`) pretrains a tiny model
and runs SFT (the same cached stage as :mod:`experiments.sft_dynamics`); the SFT model is
loaded in float64. The update batch is ``num_update`` probe prompts (training prompts) with their
pairs, taking either

- an **SFT** update: ``−log π(chosen|x)`` (:class:`ldjax.sequence_dynamics.SFTObjective`), or
- a **DPO** update: sigmoid DPO with β from the pipeline, the SFT model as reference
  (the first step of off-policy DPO, :class:`~ldjax.sequence_dynamics.PreferenceObjective`),

one step with **SGD** and one with the **adaptive optimizer** (Adam by default; its moments are
first filled with the gradients of ``adam_warmup`` other probe batches, the parameters kept, so
that the preconditioner is not the trivial first-step one). For a fixed optimizer state the
update is linear in η, so the η grid ``η_max / 2^k`` halves the step exactly; ``η_max`` is set
per seed, update and optimizer so that the largest predicted change is ``target_change`` nats.

The observed set is every probe response of the update prompts (SPEC §3: chosen, rejected,
rephrases, format-kept, other_train, other_test, random, shuffled) plus the teacher-forced
argmax path ``y*`` along chosen (``Σ_l log π(y*_l | x, y⁺_<l)`` with y* fixed at the start
model's argmax). Measured per η: the largest and mean |predicted − actual| over those responses,
the relative gap ``‖pred − act‖ / ‖act‖``, the log-log slope of the max gap against η (fitted
over the whole grid and over its small-η half; expect 2) and the ratio of the gap at η to that
at η/2 (expect 4). ``kind="check"`` rows: the ratios of the ``check_ratios`` smallest halvings lie
in [3, 5] for every seed, SGD and the adaptive optimizer, SFT and DPO. ``kind="paper"`` rows: at
the pipeline's own training learning rate the adaptive step is first-order accurate (relative
gap ≤ 10 %), the premise of the paper's per-step story.

Outputs in ``--out``: ``gap_vs_lr.png`` (log-log, slope fits), ``predicted_vs_actual.png``
(per-response scatter at one η), ``results.json``, ``claims.json``, ``report.md``.

Run: ``python -m experiments.first_order_lm --out results/first_order_lm`` (CPU, ~2–4 min);
``--quick true`` (tests); ``--data FILE.jsonl`` (HH / UltraFeedback / plain pairs); ``--model
DIR`` (a local Hugging Face model, no pretraining); paper preset: ``--preset paper --model
PYTHIA_410M_DIR --data HH.jsonl`` (Pythia-410M on Anthropic-HH with the paper's RMSprop recipe
for the SFT stage; the adaptive optimizer is then ``rmsprop`` — PyTorch's RMSprop as in the
paper — and float64 needs a CPU or GPU; on a TPU pass ``--dtype float32``, which runs under
``highest`` matmul precision and holds the η² law only down to where round-off meets the gap).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments.claims import Claim, claims_table, effect, write_claims  # noqa: E402
from experiments.lm_pipeline import ExperimentConfig, open_experiment, Pipeline, PipelineConfig, Stage  # noqa: E402
from experiments.sft_dynamics import sft_stage  # noqa: E402
from ldjax import sequence_dynamics as sd  # noqa: E402
from ldjax.config import parse_config, to_dict  # noqa: E402

EXPERIMENT = "first_order_lm"
UPDATES = ("sft", "dpo")
ADAPTIVE = ("adam", "adamw", "rmsprop")
RATIO_RANGE = (3.0, 5.0)
PAPER_MAX_RELATIVE_GAP = 0.1
ARGMAX = "argmax_chosen"


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """First-order gap vs η on a language model: SFT and DPO updates, SGD and the adaptive optimizer."""

    out: str = dataclasses.field(default="results/first_order_lm", metadata={"help": "output directory"})
    sft_decompose_every: int = dataclasses.field(default=4, metadata={"help": "as sft_dynamics' decompose_every (to reuse its SFT stage)"})
    optimizer: str = dataclasses.field(default="", metadata={"help": "adaptive optimizer next to SGD: adam | adamw | rmsprop (empty: the pipeline's; adam on cpu, rmsprop on paper)"})
    num_update: int = dataclasses.field(default=4, metadata={"help": "update prompts (pairs) per step; 0 = preset default"})
    adam_warmup: int = dataclasses.field(default=6, metadata={"help": "gradients of other probe batches fed to the adaptive optimizer's state first (parameters kept)"})
    num_lrs: int = dataclasses.field(default=8, metadata={"help": "η grid size: η_max / 2^k, k < num_lrs"})
    target_change: float = dataclasses.field(default=1.0, metadata={"help": "η_max gives this largest predicted |Δ log π| (nats)"})
    check_ratios: int = dataclasses.field(default=3, metadata={"help": "the check uses the ratios of this many smallest halvings"})
    scatter_index: int = dataclasses.field(default=2, metadata={"help": "η grid index of the scatter figure (η_max / 2^k)"})
    dtype: str = dataclasses.field(default="float64", metadata={"help": "float64 (CPU/GPU) or float32 (TPU; highest matmul precision)"})

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer and self.optimizer not in ADAPTIVE:
            raise ValueError(f"Config.optimizer must be one of {ADAPTIVE} (or empty), got {self.optimizer!r}")
        if self.num_lrs < 3 or not 1 <= self.check_ratios < self.num_lrs or not 0 <= self.scatter_index < self.num_lrs:
            raise ValueError("Config: num_lrs >= 3, 1 <= check_ratios < num_lrs, 0 <= scatter_index < num_lrs")
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"Config.dtype must be float64 or float32, got {self.dtype!r}")
        if self.target_change <= 0 or self.num_update < 0 or self.adam_warmup < 0:
            raise ValueError("Config: target_change > 0, num_update >= 0, adam_warmup >= 0")


QUICK = dict(num_update=2, num_lrs=6, check_ratios=2, adam_warmup=3)


def effective(config: Config) -> Config:
    """The config actually run: quick mode shrinks the update batch and the grid."""
    return dataclasses.replace(config, **QUICK) if config.quick else config


def adaptive_name(config: Config, pcfg: PipelineConfig) -> str:
    """The adaptive optimizer swept next to SGD: the flag, else the pipeline's (SGD → adam)."""
    name = config.optimizer or pcfg.optimizer
    return name if name in ADAPTIVE else "adam"


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """One optimizer of the sweep at learning rate ``lr`` (its state layout does not depend on lr)."""
    from ldjax.train.optim import torch_rmsprop
    return {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "rmsprop": torch_rmsprop}[name](lr)


# ------------------------------------------------------------------------------------ data

def _job_config(stage: Stage):
    from ldjax.train.config import SFTConfig
    return SFTConfig(**json.loads((stage.out / "stage.json").read_text())["config"])


def probe_arrays(stage: Stage, tokenizer, vocab: int):
    """The probe set (:class:`ldjax.probes.ProbeSet`) of a pipeline stage, tokenised as its training data."""
    from ldjax import cli, probes
    job = _job_config(stage)
    return probes.tokenize_probes(cli.probe_texts(job), tokenizer, **cli._token_kwargs(job, tokenizer, vocab))


def _rows(arrays: dict, idx: np.ndarray) -> dict[str, jax.Array]:
    return {k: jnp.asarray(arrays[k][idx]) for k in sd.SEQUENCE_KEYS}


def update_batches(apply_fn, params, probe_set, idx: np.ndarray) -> dict[str, dict]:
    """The SFT batch (prompt, chosen) and the DPO batch (chosen, rejected, reference log-probs at
    ``params``: the first step of DPO from this model) of the probe prompts ``idx``."""
    from ldjax.losses import sequence_logps
    chosen, rejected = _rows(probe_set.arrays["chosen"], idx), _rows(probe_set.arrays["rejected"], idx)
    dpo = {f"chosen_{k}": v for k, v in chosen.items()} | {f"rejected_{k}": v for k, v in rejected.items()}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        logits = apply_fn(params, {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]})
        dpo[f"ref_{side}_logps"] = sequence_logps(logits, rows["input_ids"], rows["loss_mask"])
    return {"sft": chosen, "dpo": dpo}


def observed_batch(probe_set, idx: np.ndarray) -> tuple[dict[str, jax.Array], list[str]]:
    """Every probe family of the prompts ``idx`` as one observed batch, and each row's family."""
    fams = list(probe_set.families)
    batch = {k: jnp.asarray(np.concatenate([probe_set.arrays[f][k][idx] for f in fams])) for k in sd.SEQUENCE_KEYS}
    return batch, [f for f in fams for _ in idx]


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def argmax_path_change(apply_fn, params, new_params, update, input_ids, attention_mask, loss_mask):
    """The teacher-forced argmax path ``y*`` along a response (SPEC §3), y* fixed at ``params``:
    ``(predicted, actual)`` (B,) changes of ``Σ_t log π(y*_t | x, y_<t)`` — the prediction is
    ``A J u`` read at y* (one JVP), the actual change uses ``new_params``."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    logits, dz = jax.jvp(lambda p: apply_fn(p, inputs), (params,), (update,))
    logp0 = jax.nn.log_softmax(logits, axis=-1)
    logp1 = jax.nn.log_softmax(apply_fn(new_params, inputs), axis=-1)
    a_dz = dz - jnp.sum(jnp.exp(logp0) * dz, axis=-1, keepdims=True)
    star = jnp.argmax(logits[:, :-1], axis=-1)[..., None]  # row t-1's argmax is y*_t
    scored = (loss_mask[:, 1:] != 0).astype(logits.dtype)
    pred = (jnp.take_along_axis(a_dz[:, :-1], star, -1)[..., 0] * scored).sum(-1)
    act = ((jnp.take_along_axis(logp1[:, :-1], star, -1) - jnp.take_along_axis(logp0[:, :-1], star, -1))[..., 0]
           * scored).sum(-1)
    return pred, act


# ------------------------------------------------------------------------------------ one sweep

def _tree_sum(trees):
    return jax.tree_util.tree_map(lambda *x: sum(x), *trees)


def warm_state(name: str, apply_fn, params, batches: list[dict], objective) -> Any:
    """The optimizer's state after ``len(batches)`` gradients (parameters kept): non-trivial moments
    for an adaptive optimizer; SGD has none."""
    opt = make_optimizer(name, 1.0)
    state = opt.init(params)
    for batch in batches:
        grad = _tree_sum(sd.training_gradients(apply_fn, params, batch, objective))
        _, state = opt.update(grad, state, params)
    return state


def sweep(name: str, apply_fn, params, state, update, observed, argmax_rows, objective, config: Config,
          pipeline_lr: float | None) -> dict[str, Any]:
    """Gaps of one (update, optimizer) pair over the η grid; also the relative gap at the
    pipeline's own learning rate ``pipeline_lr`` (adaptive optimizer only)."""
    grad = _tree_sum(sd.training_gradients(apply_fn, params, update, objective))
    unit, _ = make_optimizer(name, 1.0).update(grad, state, params)
    unit_pred = np.asarray(sd.predict_for_update(apply_fn, params, observed, unit).responses)
    eta_max = config.target_change / float(np.abs(unit_pred).max())
    lrs = eta_max / 2.0 ** np.arange(config.num_lrs)

    def step(lr: float) -> tuple[np.ndarray, np.ndarray]:
        res = sd.optimizer_step(apply_fn, params, make_optimizer(name, lr), state, update, observed, objective)
        taken = jax.tree_util.tree_map(lambda a, b: a - b, res.new_params, params)
        p_star, a_star = argmax_path_change(apply_fn, params, res.new_params, taken, *argmax_rows)
        pred = np.concatenate([np.asarray(res.predicted.responses), np.asarray(p_star)])
        act = np.concatenate([np.asarray(res.actual.responses), np.asarray(a_star)])
        return pred, act

    max_gap, mean_gap, rel_gap, max_act, scatter = [], [], [], [], None
    for k, lr in enumerate(lrs):
        pred, act = step(float(lr))
        diff = np.abs(pred - act)
        max_gap.append(float(diff.max()))
        mean_gap.append(float(diff.mean()))
        rel_gap.append(float(np.linalg.norm(pred - act) / max(np.linalg.norm(act), 1e-300)))
        max_act.append(float(np.abs(act).max()))
        if k == config.scatter_index:
            scatter = {"lr": float(lr), "predicted": pred.tolist(), "actual": act.tolist()}
    max_gap = np.asarray(max_gap)
    ratios = max_gap[:-1] / max_gap[1:]
    half = max(2, config.num_lrs // 2)
    out = dict(optimizer=name, eta_max=eta_max, lrs=lrs.tolist(), max_gap=max_gap.tolist(), mean_gap=mean_gap,
               relative_gap=rel_gap, max_actual_change=max_act, halving_ratios=ratios.tolist(),
               small_eta_ratios=ratios[-config.check_ratios:].tolist(),
               loglog_slope=float(np.polyfit(np.log(lrs), np.log(max_gap), 1)[0]),
               loglog_slope_small_eta=float(np.polyfit(np.log(lrs[-half:]), np.log(max_gap[-half:]), 1)[0]),
               scatter=scatter)
    if pipeline_lr:
        pred, act = step(pipeline_lr)
        out["at_pipeline_lr"] = dict(lr=pipeline_lr, relative_gap=float(np.linalg.norm(pred - act) /
                                                                         max(np.linalg.norm(act), 1e-300)),
                                     max_gap=float(np.abs(pred - act).max()), max_actual_change=float(np.abs(act).max()))
    return out


def run_seed(seed: int, stage: Stage, pcfg: PipelineConfig, config: Config, adaptive: str) -> dict[str, Any]:
    """Every (update, optimizer) sweep of one seed, on the SFT model of ``stage``."""
    from ldjax.models.hf import load_pretrained
    dtype = jnp.float64 if config.dtype == "float64" else jnp.float32
    model, tokenizer = load_pretrained(stage.model_dir, dtype=dtype, param_dtype=dtype)
    apply_fn, params = sd.lm_apply_fn(model)
    probe_set = probe_arrays(stage, tokenizer, model.config.vocab_size)
    n = probe_set.num_prompts
    b = min(config.num_update or 4, n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    idx = np.sort(order[:b])
    observed, families = observed_batch(probe_set, idx)
    chosen = probe_set.arrays["chosen"]
    argmax_rows = tuple(jnp.asarray(chosen[k][idx]) for k in sd.SEQUENCE_KEYS)
    families = families + [ARGMAX] * len(idx)
    batches = update_batches(apply_fn, params, probe_set, idx)
    others = [np.sort(order[b:][i:i + b]) for i in range(0, n - b, b)] or [idx]
    warm_batches = {u: [update_batches(apply_fn, params, probe_set, o)[u] for o in others[:config.adam_warmup]]
                    for u in UPDATES}
    objectives = {"sft": sd.SFTObjective(), "dpo": sd.PreferenceObjective("sigmoid", beta=pcfg.beta)}
    lrs = {"sft": pcfg.sft_lr, "dpo": pcfg.dpo_lr}
    result: dict[str, Any] = {"update_prompts": idx.tolist(), "families": families, "vocab": model.config.vocab_size}
    for u in UPDATES:
        for name in ("sgd", adaptive):
            state = warm_state(name, apply_fn, params, warm_batches[u] if name != "sgd" else [], objectives[u])
            r = sweep(name, apply_fn, params, state, batches[u], observed, argmax_rows, objectives[u], config,
                      lrs[u] if name != "sgd" else None)
            result[f"{u}/{name}"] = r
            print(f"[first_order_lm] seed {seed} {u}/{name}: η_max {r['eta_max']:.3g}, slope {r['loglog_slope']:.3f} "
                  f"(small η {r['loglog_slope_small_eta']:.3f}), ratios "
                  + " ".join(f"{q:.2f}" for q in r["halving_ratios"]), file=sys.stderr)
    return result


# ------------------------------------------------------------------------------------ outputs

def claims(per_seed: dict[int, dict], seeds: list[int], adaptive: str) -> list[Claim]:
    """The check rows (η² law per update and optimizer) and the paper rows (first-order at the training lr)."""
    rows = []
    lo, hi = RATIO_RANGE
    for u in UPDATES:
        for name in ("sgd", adaptive):
            key = f"{u}/{name}"
            small = [per_seed[s][key]["small_eta_ratios"] for s in seeds]
            worst = [max(abs(np.log(np.asarray(r) / 4.0))) for r in small]
            passed = all(lo <= q <= hi for r in small for q in r)
            rows.append(Claim(EXPERIMENT, f"{u.upper()} update, {name}: halving η quarters the first-order gap at small η "
                                          f"(gap(η)/gap(η/2) of the smallest halvings in [{lo:g}, {hi:g}]; value: mean "
                                          "ratio per seed)", "check", bool(passed),
                              effect([float(np.mean(r)) for r in small], ratios=small,
                                     slope=effect([per_seed[s][key]["loglog_slope"] for s in seeds]),
                                     slope_small_eta=effect([per_seed[s][key]["loglog_slope_small_eta"] for s in seeds]),
                                     worst_abs_log_ratio_over_4=effect(worst)), tuple(seeds)))
    for u in UPDATES:
        key = f"{u}/{adaptive}"
        rel = [per_seed[s][key]["at_pipeline_lr"]["relative_gap"] for s in seeds]
        lr = per_seed[seeds[0]][key]["at_pipeline_lr"]["lr"]
        rows.append(Claim(EXPERIMENT, f"{u.upper()} update, {adaptive} at the training lr {lr:g}: one step is first-order "
                                      f"(relative gap ‖pred − act‖/‖act‖ ≤ {PAPER_MAX_RELATIVE_GAP:g} over the probe "
                                      "responses)", "paper", bool(max(rel) <= PAPER_MAX_RELATIVE_GAP),
                          effect(rel, max_actual_change=effect([per_seed[s][key]["at_pipeline_lr"]["max_actual_change"]
                                                                for s in seeds])), tuple(seeds)))
    return rows


def plot_gaps(per_seed: dict[int, dict], seeds: list[int], adaptive: str, path: pathlib.Path) -> None:
    """2×2 log-log panels (update × optimizer): max gap per seed vs η, slope-2 reference."""
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 8.0), squeeze=False)
    for i, u in enumerate(UPDATES):
        for j, name in enumerate(("sgd", adaptive)):
            ax, key = axes[i, j], f"{u}/{name}"
            for k, s in enumerate(seeds):
                r = per_seed[s][key]
                lrs = np.asarray(r["lrs"])
                ax.loglog(lrs, r["max_gap"], "o-", color=f"C{k}", label=f"seed {s}: max |pred − act|")
                ax.loglog(lrs, r["mean_gap"], "s:", color=f"C{k}", ms=3, alpha=0.6)
                ax.loglog(lrs, r["max_actual_change"], "^--", color="0.6", ms=3)
            r = per_seed[seeds[0]][key]
            lrs = np.asarray(r["lrs"])
            ax.loglog(lrs, r["max_gap"][-1] * (lrs / lrs[-1]) ** 2, "k:", label="slope 2")
            slopes = [per_seed[s][key]["loglog_slope_small_eta"] for s in seeds]
            ratios = [np.mean(per_seed[s][key]["small_eta_ratios"]) for s in seeds]
            ax.set_title(f"{u.upper()}, {name}: small-η slope {np.mean(slopes):.3f}, ratio {np.mean(ratios):.3f}",
                         fontsize=9)
            ax.set_xlabel("learning rate η")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel("gap (nats); grey: max |actual Δ log π|", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("first-order gap vs η (circles: max, squares: mean over probe responses)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(per_seed: dict[int, dict], seeds: list[int], adaptive: str, path: pathlib.Path) -> None:
    """Predicted vs actual Δ log π per response at one η of the grid, coloured by probe family."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5), squeeze=False)
    families = per_seed[seeds[0]]["families"]
    names = list(dict.fromkeys(families))
    for i, u in enumerate(UPDATES):
        for j, name in enumerate(("sgd", adaptive)):
            ax, key = axes[i, j], f"{u}/{name}"
            lim = 1e-12
            for s in seeds:
                sc = per_seed[s][key]["scatter"]
                fam = np.asarray(per_seed[s]["families"])
                pred, act = np.asarray(sc["predicted"]), np.asarray(sc["actual"])
                lim = max(lim, np.abs(pred).max(), np.abs(act).max())
                for c, f in enumerate(names):
                    m = fam == f
                    ax.scatter(act[m], pred[m], s=10, color=f"C{c % 10}", marker="*" if f == ARGMAX else "o",
                               label=f if s == seeds[0] else None)
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.6)
            lr = per_seed[seeds[0]][key]["scatter"]["lr"]
            ax.set_title(f"{u.upper()}, {name}, η = η_max/2^k = {lr:.3g} (seed {seeds[0]})", fontsize=9)
            ax.set_xlabel("actual Δ log π(y|x) (nats)")
            ax.set_ylabel("first-order prediction A·J·u (nats)")
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config: Config, pcfg: PipelineConfig, adaptive: str, rows: list[Claim], per_seed: dict, seeds: list[int],
           wall: float) -> str:
    """report.md: setting, claims, per-(update, optimizer) table of slopes and ratios."""
    source = pcfg.data or "the embedded world"
    model = pcfg.model or f"tiny {pcfg.arch} (d={pcfg.d_model}, {pcfg.num_layers} layers) pretrained here, then SFT"
    first = per_seed[seeds[0]]
    lines = [f"# First-order prediction vs the real step on a language model ({'quick' if config.quick else config.preset})",
             "", f"Data: {source}. Model: {model} ({pcfg.optimizer} lr {pcfg.sft_lr}, {pcfg.sft_steps} steps), analysed "
             f"in {config.dtype}. Update: {len(first['update_prompts'])} probe prompts; SFT on chosen, or the first step "
             f"of sigmoid DPO (β {pcfg.beta}, the SFT model as reference). Optimizers: SGD and {adaptive} (its moments "
             f"filled with {config.adam_warmup} gradients of other probe batches, parameters kept). Observed: "
             f"{len(first['families'])} responses = every probe family of the update prompts + the teacher-forced "
             f"argmax path along chosen. η grid: η_max/2^k, k < {config.num_lrs}, η_max giving a largest predicted "
             f"change of {config.target_change} nats. Seeds {seeds}. Wall time {wall:.0f} s.", "",
             "![gap vs lr](gap_vs_lr.png)", "", "![scatter](predicted_vs_actual.png)", "",
             "## Claims", "", claims_table([r.to_json() for r in rows]), "",
             "## Slopes and halving ratios (mean ± std over seeds)", "",
             "| update | optimizer | η_max (seed 0) | slope (all η) | slope (small η) | ratios, largest → smallest η | "
             "relative gap at η_max → smallest η |", "|---|---|---|---|---|---|---|"]
    for u in UPDATES:
        for name in ("sgd", adaptive):
            key = f"{u}/{name}"
            sl = effect([per_seed[s][key]["loglog_slope"] for s in seeds])
            ss = effect([per_seed[s][key]["loglog_slope_small_eta"] for s in seeds])
            ratios = np.mean([per_seed[s][key]["halving_ratios"] for s in seeds], axis=0)
            rel = np.mean([per_seed[s][key]["relative_gap"] for s in seeds], axis=0)
            lines.append(f"| {u} | {name} | {first[key]['eta_max']:.3g} | {sl['mean']:.3f} ± {sl['std']:.2g} | "
                         f"{ss['mean']:.3f} ± {ss['std']:.2g} | {' '.join(f'{q:.2f}' for q in ratios)} | "
                         f"{rel[0]:.2e} → {rel[-1]:.2e} |")
    lines += ["", "## At the pipeline's training learning rate", "", "| update | optimizer | lr | relative gap (per seed) | "
              "max |actual Δ| (per seed) |", "|---|---|---|---|---|"]
    for u in UPDATES:
        key = f"{u}/{adaptive}"
        at = [per_seed[s][key]["at_pipeline_lr"] for s in seeds]
        rel_s = ", ".join(f"{a['relative_gap']:.2e}" for a in at)
        act_s = ", ".join(f"{a['max_actual_change']:.2e}" for a in at)
        lines.append(f"| {u} | {adaptive} | {at[0]['lr']:g} | {rel_s} | {act_s} |")
    failed = [r.claim for r in rows if not r.passed]
    lines += ["", "## Verdict", ""]
    lines += ([f"Not as expected (kept as measured): {'; '.join(failed)}."] if failed else
              ["Every check passed: the gap of the first-order prediction shrinks as η² for SGD and for the adaptive "
               "optimizer, on SFT and on DPO updates, for every probe response."])
    return "\n".join(lines) + "\n"


def main(config: Config) -> dict[str, Any]:
    """Builds (or reuses) the pipeline's SFT model per seed, sweeps η and writes every output."""
    start = time.perf_counter()
    config = effective(config)
    out, pcfg, pipeline = open_experiment(config)
    if config.quick:  # no probe tracking during the quick SFT (seconds matter in tests)
        pcfg = dataclasses.replace(pcfg, track_every=0)
        pipeline = Pipeline(pcfg)
    adaptive = adaptive_name(config, pcfg)
    seeds = list(config.seeds)
    per_seed, stages = {}, {}
    for seed in seeds:
        if config.quick:
            sft = pipeline.sft(seed, pipeline.base(seed))
        else:  # the stage of experiments.sft_dynamics (same cache key: reused when it exists)
            _, sft = sft_stage(pipeline, seed, config.sft_decompose_every)
        stages[seed] = {"dir": str(sft.out), "reused": sft.reused, "seconds": sft.seconds}
        with jax.enable_x64(config.dtype == "float64"), jax.default_matmul_precision("highest"):
            per_seed[seed] = run_seed(seed, sft, pcfg, config, adaptive)
    rows = claims(per_seed, seeds, adaptive)
    write_claims(out, rows)
    plot_gaps(per_seed, seeds, adaptive, out / "gap_vs_lr.png")
    plot_scatter(per_seed, seeds, adaptive, out / "predicted_vs_actual.png")
    wall = time.perf_counter() - start
    results = {"config": to_dict(config), "pipeline": to_dict(pcfg), "adaptive_optimizer": adaptive, "seeds": seeds,
               "stages": stages, "per_seed": per_seed, "claims": [r.to_json() for r in rows], "wall_s": wall}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(report(config, pcfg, adaptive, rows, per_seed, seeds, wall))
    return results


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.first_order_lm"))
