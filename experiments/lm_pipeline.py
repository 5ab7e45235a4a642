"""The shared LM pipeline of the finetuning experiments: world → pretrained base → SFT → DPO.

Every stage is one :func:`ldjax.cli.run` job in its own directory of a *run directory*
(``run_dir/seed<k>/<stage>``). A stage is cached: its directory keeps ``stage.json`` with the
job's config as JSON, the tag of any hook, and the key of the stage it starts from; a later
call with the same key reuses ``model/`` and ``summary.json``, any other key deletes the stage
directory and reruns it (so a changed pretraining config rebuilds the base model, and every
stage built on top of it). The base model is keyed on its config's JSON like every other stage.

Sources:

- the embedded world (``data=""``, the default), or a preference JSONL file (``data=PATH``:
  Anthropic-HH, UltraFeedback-binarized or plain ``{prompt, chosen, rejected}`` records; the
  tiny model then pretrains on its prompts + chosen responses);
- a tiny model pretrained here (``model=""``), or a local Hugging Face directory
  (``model=DIR``: pretraining is skipped and the directory is the base model).

Two hooks of :func:`ldjax.cli.run` reach into a job (see :func:`run_stage`):
``tracker_hook(tracker, model)`` may set the tracker's ``decompose_fn`` (the per-step
decomposition of :mod:`ldjax.sequence_dynamics`), and ``optimizer_wrapper(optimizer)`` may wrap
the job's optax optimizer (e.g. :func:`head_only` training).

Presets: :meth:`PipelineConfig.quick_preset` (seconds; tests), the default (a few minutes on
2 CPU cores) and :meth:`PipelineConfig.paper_preset` (Pythia-410M on Anthropic-HH with the
paper's RMSprop recipe, :func:`ldjax.train.config.paper_rmsprop`; for a GPU/TPU).
"""
from __future__ import annotations

import functools
import dataclasses
import hashlib
import json
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import optax

from ldjax import cli
from ldjax.config import to_dict
from ldjax.train.config import DPOConfig, PretrainConfig, SFTConfig, paper_rmsprop

TrackerHook = Callable[[Any, Any], None]  # (tracker, model) -> None
OptimizerWrapper = Callable[[optax.GradientTransformation], optax.GradientTransformation]
STAGE_FILE = "stage.json"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline trains: data, model, and each stage's optimizer and length."""

    run_dir: str = dataclasses.field(default="runs/lm_pipeline", metadata={"help": "cache of every stage (seed<k>/<stage>)"})
    data: str = dataclasses.field(default="", metadata={"help": "preference JSONL (hh/ultrafeedback/plain); empty = embedded world"})
    data_format: str = dataclasses.field(default="auto", metadata={"help": "format of --data"})
    model: str = dataclasses.field(default="", metadata={"help": "local Hugging Face model directory (skips pretraining); empty = tiny model"})
    arch: str = dataclasses.field(default="gpt_neox", metadata={"help": "tiny model: gpt_neox (untied head) or qwen2 (tied)"})
    d_model: int = dataclasses.field(default=64, metadata={"help": "tiny model width"})
    num_layers: int = dataclasses.field(default=2, metadata={"help": "tiny model depth"})
    num_heads: int = dataclasses.field(default=4, metadata={"help": "tiny model heads"})
    max_length: int = dataclasses.field(default=64, metadata={"help": "tokens per sequence"})
    max_prompt_length: int = dataclasses.field(default=24, metadata={"help": "prompt tokens kept"})
    world_seed: int = dataclasses.field(default=0, metadata={"help": "embedded world seed (fixed over model seeds)"})
    world_entities: int = dataclasses.field(default=100, metadata={"help": "embedded world: entities"})
    world_train: int = dataclasses.field(default=320, metadata={"help": "embedded world: training pairs"})
    world_test: int = dataclasses.field(default=80, metadata={"help": "embedded world: held-out pairs"})
    world_pretrain: int = dataclasses.field(default=4000, metadata={"help": "embedded world: pretraining answers"})
    world_rejected_style: str = dataclasses.field(default="rare_slots", metadata={"help": "embedded world: rare_slots or foreign rejected responses"})
    pretrain_steps: int = dataclasses.field(default=600, metadata={"help": "pretraining steps"})
    pretrain_lr: float = dataclasses.field(default=1e-3, metadata={"help": "pretraining AdamW lr"})
    pretrain_batch_size: int = dataclasses.field(default=16, metadata={"help": "pretraining batch"})
    optimizer: str = dataclasses.field(default="adam", metadata={"help": "SFT/DPO optimizer (sgd, adam, adamw, rmsprop)"})
    sft_steps: int = dataclasses.field(default=160, metadata={"help": "SFT steps"})
    sft_lr: float = dataclasses.field(default=1e-4, metadata={"help": "SFT learning rate"})
    dpo_steps: int = dataclasses.field(default=120, metadata={"help": "DPO steps"})
    dpo_lr: float = dataclasses.field(default=1e-5, metadata={"help": "DPO learning rate"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "SFT/DPO batch"})
    warmup_steps: int = dataclasses.field(default=0, metadata={"help": "SFT/DPO linear warm-up"})
    clip_norm: float = dataclasses.field(default=0.0, metadata={"help": "SFT/DPO gradient clip (0 = off)"})
    beta: float = dataclasses.field(default=0.1, metadata={"help": "DPO beta"})
    track_every: int = dataclasses.field(default=10, metadata={"help": "probe tracking every k steps"})
    track_prompts: int = dataclasses.field(default=32, metadata={"help": "probe prompts"})

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "PipelineConfig":
        """Seconds on a CPU: a tiny world, a width-32 model, a few dozen steps (tests)."""
        values = dict(d_model=32, max_length=48, max_prompt_length=16, world_entities=12, world_train=24,
                      world_test=8, world_pretrain=160, pretrain_steps=40, pretrain_batch_size=8, sft_steps=16,
                      dpo_steps=12, batch_size=8, track_every=4, track_prompts=8, sft_lr=1e-3, dpo_lr=1e-4)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def paper_preset(cls, model: str, data: str, **overrides: Any) -> "PipelineConfig":
        """The paper's setting (Ren & Sutherland 2025): Pythia-410M on Anthropic-HH, RMSprop 5e-7,
        150 warm-up steps, batch 4, clip 10, β 0.1, length 512 (prompt 256); 2 SFT and 4 DPO epochs
        of 5,000 pairs. ``model`` is a local Pythia directory, ``data`` an HH JSONL. For a GPU/TPU."""
        rms = paper_rmsprop()
        values = dict(model=model, data=data, data_format="hh", max_length=512, max_prompt_length=256,
                      optimizer=rms.optimizer, sft_lr=rms.learning_rate, dpo_lr=rms.learning_rate,
                      warmup_steps=rms.warmup_steps, clip_norm=rms.clip_norm, batch_size=4, beta=0.1,
                      sft_steps=2 * 5000 // 4, dpo_steps=4 * 5000 // 4, track_every=50, track_prompts=500)
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One finished (or reused) job: its directory, model directory, summary and cache key."""

    name: str
    out: pathlib.Path
    model_dir: str
    summary: Mapping[str, Any]
    key: str
    reused: bool
    seconds: float

    @property
    def tracking_file(self) -> pathlib.Path:
        return self.out / "tracking.jsonl"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(command: str, job_config, *, parent: Stage | None = None, tag: str = "",
              tracker_hook: TrackerHook | None = None, optimizer_wrapper: OptimizerWrapper | None = None) -> Stage:
    """Runs ``ldjax <command>`` into ``job_config.out``, or reuses it when its key matches.

    The key is the digest of the job config's JSON, the parent stage's key (a rebuilt parent
    invalidates everything on top of it) and ``tag`` (name any hook here: hooks change what is
    written, e.g. decomposition records, or what is trained).
    """
    out = pathlib.Path(job_config.out)
    body = {"command": command, "config": to_dict(job_config), "parent": parent.key if parent else None, "tag": tag}
    key = _digest(body)
    stage_file = out / STAGE_FILE
    if stage_file.exists() and (out / "model").is_dir() and (out / "summary.json").exists():
        old = json.loads(stage_file.read_text())
        if old.get("key") == key:
            return Stage(out.name, out, str(out / "model"), json.loads((out / "summary.json").read_text()), key,
                         True, float(old.get("seconds", 0.0)))
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    summary = cli.run(command, job_config, tracker_hook=tracker_hook, optimizer_wrapper=optimizer_wrapper)
    seconds = time.perf_counter() - start
    stage_file.write_text(json.dumps({"key": key, "seconds": seconds, **body}, indent=1, default=str))
    return Stage(out.name, out, str(out / "model"), summary, key, False, seconds)


class Pipeline:
    """Builds (or reuses) the stages of one :class:`PipelineConfig` in ``config.run_dir``."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.root = pathlib.Path(config.run_dir)

    def _common(self, seed: int, out: pathlib.Path, model: str) -> dict[str, Any]:
        c = self.config
        return dict(out=str(out), seed=seed, model=model, arch=c.arch, d_model=c.d_model, num_layers=c.num_layers,
                    num_heads=c.num_heads, data=c.data, data_format=c.data_format, max_length=c.max_length,
                    max_prompt_length=c.max_prompt_length, world_seed=c.world_seed, world_entities=c.world_entities,
                    world_train=c.world_train, world_test=c.world_test, world_pretrain=c.world_pretrain,
                    world_rejected_style=c.world_rejected_style, progress=False, log_every=max(1, c.track_every), resume=False)

    def _finetune(self, seed: int, out: pathlib.Path, model: str, steps: int, lr: float) -> dict[str, Any]:
        c = self.config
        return dict(self._common(seed, out, model), optimizer=c.optimizer, learning_rate=lr, num_steps=steps,
                    batch_size=c.batch_size, warmup_steps=c.warmup_steps, clip_norm=c.clip_norm,
                    track_every=c.track_every, track_prompts=c.track_prompts)

    def base(self, seed: int) -> Stage:
        """The base model: ``config.model`` as given, or a tiny model pretrained (and cached) here."""
        c = self.config
        if c.model:
            return Stage("base", pathlib.Path(c.model), c.model, {}, _digest({"model": c.model}), True, 0.0)
        job = PretrainConfig(**dict(self._common(seed, self.root / f"seed{seed}" / "base", "tiny"), optimizer="adamw",
                                    learning_rate=c.pretrain_lr, num_steps=c.pretrain_steps,
                                    batch_size=c.pretrain_batch_size, log_every=max(1, c.pretrain_steps // 10)))
        return run_stage("pretrain", job)

    def sft(self, seed: int, start: Stage, *, name: str = "sft", tag: str = "", tracker_hook: TrackerHook | None = None,
            **overrides: Any) -> Stage:
        """SFT on (prompt, chosen) from ``start`` (``overrides``: any :class:`SFTConfig` field)."""
        c = self.config
        fields = dict(self._finetune(seed, self.root / f"seed{seed}" / name, start.model_dir, c.sft_steps, c.sft_lr),
                      **overrides)
        return run_stage("sft", SFTConfig(**fields), parent=start, tag=tag, tracker_hook=tracker_hook)

    def dpo(self, seed: int, start: Stage, *, name: str = "dpo", tag: str = "", tracker_hook: TrackerHook | None = None,
            optimizer_wrapper: OptimizerWrapper | None = None, **overrides: Any) -> Stage:
        """Off-policy DPO from ``start`` (its own reference); ``overrides``: any :class:`DPOConfig` field."""
        c = self.config
        fields = dict(self._finetune(seed, self.root / f"seed{seed}" / name, start.model_dir, c.dpo_steps, c.dpo_lr),
                      beta=c.beta, **overrides)
        return run_stage("dpo", DPOConfig(**fields), parent=start, tag=tag, tracker_hook=tracker_hook,
                         optimizer_wrapper=optimizer_wrapper)


# ------------------------------------------------------------------------- experiment configs

def pipeline_config(run_dir: str, *, quick: bool, preset: str, data: str, data_format: str, model: str,
                    **overrides: Any) -> PipelineConfig:
    """The pipeline config of an experiment's flags (``overrides``: PipelineConfig fields; 0 / empty = keep)."""
    common = dict(run_dir=run_dir, data=data, data_format=data_format, model=model)
    overrides = {k: v for k, v in overrides.items() if v}
    if preset == "paper":
        return PipelineConfig.paper_preset(model, data, run_dir=run_dir, **overrides)
    if quick:
        return PipelineConfig.quick_preset(**common, **overrides)
    return PipelineConfig(**common, **overrides)


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The flags every LM experiment shares: output, seeds, the pipeline's preset and sources.

    An experiment's ``Config`` subclasses this (or :class:`DPOExperimentConfig`), redefines
    ``out``'s default and adds its own fields; :func:`open_experiment` turns it into a pipeline.
    """

    out: str = _field("results/experiment", "output directory")
    run_dir: str = _field("runs/lm_pipeline", "pipeline cache, shared by the LM experiments (base, SFT and DPO stages)")
    seeds: tuple[int, ...] = _field((0, 1, 2), "model seeds (init, data order)")
    quick: bool = _field(False, "seconds-long smoke run (tests); its numbers are not results")
    preset: str = _field("cpu", "cpu | paper (Pythia-410M + HH, RMSprop 5e-7, batch 4; needs --model and --data)")
    data: str = _field("", "preference JSONL (hh / ultrafeedback / plain); empty = the embedded world")
    data_format: str = _field("auto", "format of --data: auto, hh, ultrafeedback, plain")
    model: str = _field("", "local Hugging Face model directory as the base model (skips pretraining)")
    sft_steps: int = _field(0, "override the preset's SFT steps (0 = keep)")
    compile_cache: str = _field("", "JAX compilation cache dir (default run_dir/jax_cache; 'off' = none)")

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("Config.seeds: at least one seed")
        if self.preset not in ("cpu", "paper"):
            raise ValueError(f"Config.preset must be 'cpu' or 'paper', got {self.preset!r}")
        if self.preset == "paper" and not (self.model and self.data):
            raise ValueError("preset 'paper' needs --model (a local Pythia-410M directory) and --data (Anthropic-HH JSONL)")


@dataclasses.dataclass(frozen=True)
class DPOExperimentConfig(ExperimentConfig):
    """:class:`ExperimentConfig` plus the DPO stage's flags (shared, so that experiments reuse
    dpo_dynamics' cached DPO jobs: :func:`experiments.dpo_dynamics.dpo_stage`)."""

    dpo_steps: int = _field(0, "override the preset's DPO steps (0 = keep)")
    dpo_optimizer: str = _field("sgd", "DPO optimizer on the cpu preset (sgd | adam ...; the paper preset uses its RMSprop)")
    dpo_lr: float = _field(0.0, "DPO learning rate (0 = dpo_dynamics' default: 2e-3 for SGD, 1e-5 otherwise)")
    sft_decompose_every: int = _field(4, "decompose every k-th tracked SFT step (as sft_dynamics, to reuse its SFT stage)")
    decompose_every: int = _field(3, "decompose every k-th tracked DPO step (as dpo_dynamics, to reuse its DPO stage)")


def open_experiment(config: ExperimentConfig) -> tuple[pathlib.Path, PipelineConfig, Pipeline]:
    """``(out, pipeline config, pipeline)`` of an experiment: makes ``out``, turns on the shared
    compilation cache and builds the pipeline of the config's preset and sources."""
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.compile_cache != "off":
        enable_compile_cache(config.compile_cache or pathlib.Path(config.run_dir) / "jax_cache")
    pcfg = pipeline_config(config.run_dir, quick=config.quick, preset=config.preset, data=config.data,
                           data_format=config.data_format, model=config.model, sft_steps=config.sft_steps,
                           dpo_steps=getattr(config, "dpo_steps", 0))
    return out, pcfg, Pipeline(pcfg)


# ------------------------------------------------------------------------- trainable subsets

def param_labels(params, trainable: Callable[[str], bool]):
    """``"train"`` / ``"freeze"`` per leaf of a params pytree, by its key path (``jax.tree_util.keystr``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if trainable(jax.tree_util.keystr(path)) else "freeze", params)


def is_head(path: str) -> bool:
    """Whether a parameter path belongs to the untied output head (``lm_head``)."""
    return "'lm_head'" in path


def head_only(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on the ``lm_head`` parameters; every other parameter gets a zero update.

    The wrapped optimizer (clipping included) sees only the head's gradient.
    """
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()},
                                 lambda params: param_labels(params, is_head))


# ------------------------------------------------------------------------- shared analysis

def enable_compile_cache(path: str | pathlib.Path) -> None:
    """Turns on JAX's persistent compilation cache in ``path``.

    Each job builds its own train step (and evaluation) as fresh jitted closures, so without it
    each job (and each seed) compiles them again; with it a job whose step was already compiled
    loads it from disk. (The decomposition, probe and reference passes are shared in-process per
    model structure: :class:`ldjax.models.functional.ModuleApply`.) Trajectories are unchanged.
    """
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


CURVE_KEYS = ("argmax_chosen", "argmax_rejected")


def read_curves(stage: Stage) -> dict[str, Any]:
    """Probe curves of a tracked stage: ``{"steps": [...], "logps": {family: [mean]}, "a_norm": [...],
    "off_argmax": [...], "decompose": [(step, record)]}`` (means over the probe prompts — a subset
    tracker's ``estimate`` of them; ``a_norm`` and ``off_argmax`` along ``chosen``)."""
    from ldjax.tracking import read_tracking
    records = read_tracking(stage.tracking_file)
    if not records:
        raise FileNotFoundError(f"{stage.tracking_file}: no tracking records")
    families = list(records[0]["logps"])

    def mean(r, quantity, family):  # a subset tracker's all-prompt estimate, else the mean over prompts
        est = r.get("estimate", {}).get(quantity, {})
        return est[family] if family in est else r[quantity][family]["mean"]

    return {"steps": [r["step"] for r in records],
            "logps": {f: [mean(r, "logps", f) for r in records] for f in families},
            "a_norm": [mean(r, "a_norm", "chosen") for r in records],
            "off_argmax": [mean(r, "off_argmax", "chosen") for r in records],
            "decompose": [(r["step"], r["decompose"]) for r in records if r.get("decompose")]}


def seed_band(ax, steps, series, *, color, alpha: float = 0.2, **plot_kw) -> None:
    """One curve over seeds on ``ax``: the mean of ``series`` (one 1-D array per seed, cut to the
    shortest) against ``steps``, with the min–max band in the same colour."""
    import numpy as np
    n = min(len(y) for y in series)
    ys = np.stack([np.asarray(y, float)[:n] for y in series])
    x = np.asarray(steps[:n])
    ax.plot(x, ys.mean(0), color=color, **plot_kw)
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=alpha)


def plot_curves(curves_by_seed: list[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """One panel per probe family (plus ‖A‖_F and off-argmax log-mass along chosen): the change
    from step 0 of the mean log-prob, mean over seeds with a min–max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(curves_by_seed[0]["logps"]) + ["a_norm", "off_argmax"]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ys = [np.asarray(c["logps"][name] if name in c["logps"] else c[name], float) for c in curves_by_seed]
        seed_band(ax, curves_by_seed[0]["steps"], [y - y[0] for y in ys], color="C0", alpha=0.25)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title} (change from step 0; mean over {len(curves_by_seed)} seeds, band = min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rise_then_fall(y) -> tuple[float, float]:
    """``(peak − start, end − peak)`` of a curve: a rise-then-fall has the first > 0 and the second < 0."""
    import numpy as np
    y = np.asarray(y, float)
    peak = float(y.max())
    return peak - float(y[0]), float(y[-1]) - peak


def rising_fraction(y) -> float:
    """Share of the intervals between consecutive tracked steps over which the curve rose."""
    import numpy as np
    d = np.diff(np.asarray(y, float))
    return float((d > 0).mean()) if len(d) else 0.0


# ------------------------------------------------------------------------- per-step decomposition

@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _token_changes(apply_fn, params, update, input_ids, attention_mask, loss_mask):
    """First-order ``Δ log π`` along ``update`` per response, read at the response's tokens and at
    each position's argmax token (the teacher-forced ``y*``): two (B,) arrays. One JVP."""
    import jax.numpy as jnp
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    logits, dz = jax.jvp(lambda p: apply_fn(p, inputs), (params,), (update,))
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float64 models stay float64 (exactness checks)
    probs = jax.nn.softmax(logits.astype(dtype), axis=-1)
    dz = dz.astype(dtype)
    a_dz = dz - jnp.sum(probs * dz, axis=-1, keepdims=True)  # A Δz per logits row
    next_ids = input_ids[:, 1:]
    at_y = jnp.take_along_axis(a_dz[:, :-1], next_ids[..., None], axis=-1)[..., 0]
    at_star = jnp.take_along_axis(a_dz[:, :-1], jnp.argmax(logits[:, :-1], -1)[..., None], axis=-1)[..., 0]
    scored = (loss_mask[:, 1:] != 0).astype(dtype)
    return (at_y * scored).sum(-1), (at_star * scored).sum(-1)


def split_update(update, grads, trainable_head: Callable[[str], bool] = is_head):
    """The update actually taken, split by gradient term and by head/body.

    ``grads`` are the per-term training gradients (SFT ``(∇L,)``; preference ``(d⁺, d⁻)``,
    :func:`ldjax.sequence_dynamics.training_gradients`). Term ``s`` gets ``u ⊙ d_s / Σ_s d_s``
    elementwise: exact for SGD and for any elementwise preconditioner without history (RMSprop
    without momentum, the paper's); for Adam the share of the current gradient is attributed by
    the same ratio and what is left (``u`` where the current gradient is zero) goes to ``rest``.
    Each term is then split into its ``lm_head`` part and the rest (``body``).

    Returns:
      ``{"<term>/<head|body>": update pytree}`` for terms ``chosen``, ``rejected`` (preference
      only) and ``rest``; all parts add up to ``update``.
    """
    import jax.numpy as jnp
    total = jax.tree_util.tree_map(lambda *g: sum(g), *grads)
    terms = {}
    names = ("chosen", "rejected")[:len(grads)] if len(grads) > 1 else ("chosen",)
    for name, g in zip(names, grads):
        terms[name] = jax.tree_util.tree_map(
            lambda u, gs, gt: jnp.where(gt != 0, u * gs / jnp.where(gt != 0, gt, 1), 0).astype(u.dtype), update, g, total)
    terms["rest"] = jax.tree_util.tree_map(lambda u, *parts: u - sum(parts), update, *terms.values())
    out = {}
    for name, u in terms.items():
        labels = param_labels(u, trainable_head)
        head = jax.tree_util.tree_map(lambda x, lab: x if lab == "train" else jnp.zeros_like(x), u, labels)
        out[f"{name}/head"] = head
        out[f"{name}/body"] = jax.tree_util.tree_map(lambda x, h: x - h, u, head)
    return out


# One compiled split per parameter structure (eagerly it is a few hundred tiny dispatches).
_split_update_jit = jax.jit(split_update, static_argnames=("trainable_head",))


def decomposition_hook(objective, *, every: int = 1, families: tuple[str, ...] | None = None,
                       split_families: tuple[str, ...] = ("chosen", "rejected"),
                       prompts: int | None = None) -> TrackerHook:
    """A tracker hook whose ``decompose_fn`` decomposes every ``every``-th tracked step.

    On the probe set (``families``, default all) it logs, per family (means over prompts):
    ``predicted`` = ``A J_o u`` along the update really taken
    (:func:`ldjax.sequence_dynamics.predict_for_update`) and ``actual`` = the change after the
    step (:func:`ldjax.sequence_dynamics.actual_change`), with their per-response correlation
    and relative gap ``‖pred − act‖ / ‖act‖`` (over the first ``prompts`` probe prompts, default all:
    at Pythia scale a few prompts keep the JVP batch small); and for ``split_families`` the first-order change
    of the response and of its argmax path ``y*`` caused by each part of :func:`split_update`
    (``terms[family][part] = [Δ log π(y), Δ y*]``).
    """
    import jax.numpy as jnp
    import numpy as np
    from ldjax import sequence_dynamics as sd

    def hook(tracker, model) -> None:
        apply_fn, _ = sd.lm_apply_fn(model)
        probe = tracker.probe_set
        fams = tuple(f for f in (families or probe.families) if f in probe.arrays)
        p = min(probe.num_prompts, prompts or probe.num_prompts)
        observed = {k: jnp.asarray(np.concatenate([probe.arrays[f][k][:p] for f in fams])) for k in sd.SEQUENCE_KEYS}
        calls = [0]

        def decompose_fn(before, after, batch):
            calls[0] += 1
            if (calls[0] - 1) % every:
                return {}
            update = jax.tree_util.tree_map(lambda a, b: a - b, after, before)
            pred = np.asarray(sd.predict_for_update(apply_fn, before, observed, update, chunk_size=p).responses)
            act = np.asarray(sd.actual_change(apply_fn, before, after, observed, chunk_size=p).responses)
            record: dict[str, Any] = {
                "predicted": {f: float(pred[i * p:(i + 1) * p].mean()) for i, f in enumerate(fams)},
                "actual": {f: float(act[i * p:(i + 1) * p].mean()) for i, f in enumerate(fams)},
                "correlation": float(np.corrcoef(pred, act)[0, 1]) if np.std(act) > 0 and np.std(pred) > 0 else float("nan"),
                "relative_gap": float(np.linalg.norm(pred - act) / max(np.linalg.norm(act), 1e-30)),
                "update_norm": float(optax.tree.norm(update))}
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            grads = sd.training_gradients(apply_fn, before, batch, objective)
            parts = _split_update_jit(update, grads)
            terms: dict[str, dict[str, list[float]]] = {}
            for f in split_families:
                if f not in probe.arrays:
                    continue
                a = probe.arrays[f]
                terms[f] = {}
                for name, u in parts.items():
                    d_y, d_star = _token_changes(apply_fn, before, u, *(jnp.asarray(a[k][:p]) for k in sd.SEQUENCE_KEYS))
                    terms[f][name] = [float(np.mean(d_y)), float(np.mean(d_star))]
            record["terms"] = terms
            return record

        tracker.decompose_fn = decompose_fn

    return hook
