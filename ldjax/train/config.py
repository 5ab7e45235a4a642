"""Typed configs of the finetuning engine: optimizer, loop, and the three CLI jobs.

Every config is a flat frozen dataclass so that :func:`ldjax.config.parse_config` can build it
from flags and a JSON file. The job configs (:class:`PretrainConfig`, :class:`SFTConfig`,
:class:`DPOConfig`) inherit the optimizer and loop fields, so any of them can be handed to
:func:`ldjax.train.optim.build_optimizer` or :func:`ldjax.train.loop.train` directly.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "linear", "cosine")
DISTRIBUTED_MODES = ("off", "env", "auto")


class ConfigError(ValueError):
    """A config field holds a value the engine cannot run with."""


def _chain_post_init(self, cls: type) -> None:
    # Job configs inherit several field groups; each group's checks must run, in MRO order.
    nxt = getattr(super(cls, self), "__post_init__", None)
    if nxt is not None:
        nxt()


@dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimizer with linear warm-up, global-norm clipping and gradient accumulation."""

    optimizer: str = field(default="adamw", metadata={"help": f"one of {OPTIMIZERS}"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (after warm-up)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up over this many optimizer steps: step s < W uses peak*(s+1)/(W+1), so the first step already moves (the paper's DPO code); 0 = none"})
    schedule: str = field(default="constant", metadata={"help": f"after warm-up: one of {SCHEDULES} (decay to 0 at num_steps)"})
    clip_norm: float = field(default=0.0, metadata={"help": "clip gradients to this global norm (0 = off)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (adamw only)"})
    b1: float = field(default=0.9, metadata={"help": "Adam first-moment decay"})
    b2: float = field(default=0.999, metadata={"help": "Adam second-moment decay"})
    eps: float = field(default=1e-8, metadata={"help": "Adam/RMSprop epsilon"})
    rmsprop_decay: float = field(default=0.99, metadata={"help": "RMSprop squared-gradient decay (PyTorch's alpha)"})
    momentum: float = field(default=0.0, metadata={"help": "SGD/RMSprop momentum (0 = none); as in PyTorch, the learning rate multiplies the momentum buffer"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step (batch_size must divide)"})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.clip_norm < 0:
            raise ConfigError(f"clip_norm: must be >= 0, got {self.clip_norm}")
        _chain_post_init(self, OptimizerConfig)


@dataclass(frozen=True)
class LoopConfig:
    """How long to train, and how often to log, evaluate and checkpoint."""

    num_steps: int = field(default=100, metadata={"help": "optimizer steps to run in total (a resumed run continues to this)"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step (across all devices and micro-batches)"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    out: str = field(default="runs/default", metadata={"help": "run directory: metrics.jsonl, checkpoints/, config.json"})
    log_every: int = field(default=1, metadata={"help": "write a metrics line every this many steps"})
    eval_every: int = field(default=0, metadata={"help": "call the eval hook every this many steps (0 = never)"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a checkpoint every this many steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep only the last this many checkpoints"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in out/checkpoints if there is one"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar (only when stderr is a terminal)"})
    num_devices: int = field(default=0, metadata={"help": "devices of the mesh (0 = all, of every process in a multi-process run)"})
    fsdp: int = field(default=1, metadata={"help": "devices of the mesh's 'fsdp' axis: each parameter, its gradient and its optimizer moments are split over them along their largest divisible axis (FSDP / ZeRO-3); the batch is split over the remaining num_devices/fsdp 'data' devices. Must divide the device count; 1 = plain data parallelism"})
    distributed: str = field(default="off", metadata={"help": "join several processes with jax.distributed before training: off | env (LDJAX_COORDINATOR, LDJAX_NUM_PROCESSES, LDJAX_PROCESS_ID) | auto (JAX's cluster detection: TPU pods, SLURM, Open MPI; also used when LDJAX_COORDINATOR is unset). See ldjax.train.distributed"})

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "num_devices"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.fsdp < 1:
            raise ConfigError(f"fsdp: must be >= 1, got {self.fsdp}")
        if self.num_devices and self.num_devices % self.fsdp:
            raise ConfigError(f"fsdp: {self.fsdp} does not divide num_devices={self.num_devices}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigError(f"distributed: {self.distributed!r} is not one of {DISTRIBUTED_MODES}")
        _chain_post_init(self, LoopConfig)


@dataclass(frozen=True)
class TrackingConfig:
    """Probe tracking (SPEC §3): log-probs of the probe families of training prompts, every k steps."""

    track_every: int = field(default=0, metadata={"help": "score the probe set every this many steps (and at step 0 and the last step) into out/tracking.jsonl, its texts into out/probes.json; 0 = off. Never changes the training trajectory"})
    track_prompts: int = field(default=32, metadata={"help": "probe prompts, taken from the training set (the world's probes, or a seeded choice of --data records; at most the training set)"})
    track_batch_size: int = field(default=0, metadata={"help": "probe prompts per forward pass when tracking (0 = batch_size)"})
    track_subset: int = field(default=0, metadata={"help": "prompts scored at each tracked step between the first and the last, a rotating window (0 = all); the records then carry a control-variate estimate of the all-prompt mean. Cuts tracking cost by track_prompts/track_subset"})

    def __post_init__(self) -> None:
        for name in ("track_every", "track_batch_size", "track_subset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.track_prompts < 1:
            raise ConfigError(f"track_prompts: must be >= 1, got {self.track_prompts}")
        _chain_post_init(self, TrackingConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to train: a tiny preset built from scratch, or a pretrained directory."""

    model: str = field(default="tiny", metadata={"help": "'tiny' (a TransformerConfig.tiny preset) or a local Hugging Face directory (e.g. <run>/model of an earlier job)"})
    arch: str = field(default="qwen2", metadata={"help": "tiny model architecture: qwen2 or gpt_neox"})
    d_model: int = field(default=64, metadata={"help": "tiny model width"})
    num_layers: int = field(default=2, metadata={"help": "tiny model depth"})
    num_heads: int = field(default=4, metadata={"help": "tiny model attention heads"})
    remat: bool = field(default=False, metadata={"help": "rematerialise each transformer block in the backward pass (jax.checkpoint): activation memory of one block instead of all, one more forward per step"})
    compute_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16: the dtype of the forward and backward passes; parameters and optimizer state stay float32 (master weights), log-softmax and losses run in float32"})

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"compute_dtype: {self.compute_dtype!r} is not one of ('float32', 'bfloat16')")
        _chain_post_init(self, ModelConfig)


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are cut into tokens."""

    data: str = field(default="", metadata={"help": "JSONL file (hh / ultrafeedback / plain preference records); empty = the embedded world"})
    data_format: str = field(default="auto", metadata={"help": "format of --data: auto, hh, ultrafeedback, plain"})
    max_length: int = field(default=64, metadata={"help": "tokens per sequence (prompt + response); every batch is padded to it"})
    max_prompt_length: int = field(default=32, metadata={"help": "prompt tokens kept when a sequence is too long"})
    world_seed: int = field(default=0, metadata={"help": "seed of the embedded world (fixed across jobs so pretrain/sft/dpo share it)"})
    world_entities: int = field(default=100, metadata={"help": "embedded world: named entities"})
    world_train: int = field(default=320, metadata={"help": "embedded world: training pairs"})
    world_test: int = field(default=80, metadata={"help": "embedded world: held-out pairs"})
    world_pretrain: int = field(default=4000, metadata={"help": "embedded world: pretraining answer texts (plus a quarter as many narrative sentences)"})
    world_rejected_style: str = field(default="rare_slots", metadata={"help": "embedded world: rejected responses after the shared prefix, rare_slots (the chosen grammar's rarest fillers) or foreign (narrative text: a deeper valley)"})


@dataclass(frozen=True)
class PretrainConfig(OptimizerConfig, LoopConfig, ModelConfig, DataConfig):
    """ldjax pretrain: next-token prediction on the embedded world's pretraining corpus (or the prompts+chosen of --data)."""


@dataclass(frozen=True)
class SFTConfig(OptimizerConfig, LoopConfig, TrackingConfig, ModelConfig, DataConfig):
    """ldjax sft: supervised finetuning on (prompt, chosen) — or on both responses with --sft-on-both."""

    sft_on_both: bool = field(default=False, metadata={"help": "train on (x, y+) and (x, y-) (the paper's 'extend' mitigation)"})


@dataclass(frozen=True)
class DPOConfig(OptimizerConfig, LoopConfig, TrackingConfig, ModelConfig, DataConfig):
    """ldjax dpo: a preference loss against a frozen reference (the starting policy)."""

    loss_type: str = field(default="sigmoid", metadata={"help": "any loss_type of ldjax.losses.preference_loss, or ppo_clip (the PPO-clip surrogate on the pairs, advantage +1 on y+ and -1 on y-, the reference as old policy: ldjax.train.objectives.ppo_clip_objective)"})
    beta: float = field(default=0.1, metadata={"help": "inverse temperature of the implicit reward"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing eps: sigmoid (cDPO), robust, exo_pair, aot, aot_pair, aot_unpaired and simpo use it; the other loss types ignore it"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin gamma"})
    ppo_epsilon: float = field(default=0.2, metadata={"help": "clip range eps of --loss-type ppo_clip"})
    negative_weight_power: float = field(default=0.0, metadata={"help": "ldjax's probability-weighted negative gradient: alpha > 0 scales the push-down of each rejected token by pi(y-_t)^alpha (loss value unchanged), sparing tokens already in the valley; 0 = off (plain loss)"})
    on_policy: str = field(default="off", metadata={"help": "off (both responses from the data) | rejected (y+ from the data, y- sampled from the current policy: on-policy DPO / SPIN) | both (y+ and y- both sampled from the current policy)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for on-policy responses"})
    top_k: int = field(default=0, metadata={"help": "sample from the top-k tokens only (0 = all)"})
    max_new_tokens: int = field(default=24, metadata={"help": "fixed length of sampled responses"})
    on_policy_candidates: int = field(default=1, metadata={"help": "responses sampled per prompt for --on-policy; above 1 the --on-policy-judge ranks them: the lowest-scored becomes y- (with 'both' the highest-scored becomes y+)"})
    on_policy_judge: str = field(default="none", metadata={"help": "judge that ranks on-policy candidates: none | world (the embedded world's chosen- vs rejected-style bigram models, ldjax.judge.StyleNgramJudge, run inside the step)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.on_policy not in ("off", "rejected", "both"):
            raise ConfigError(f"on_policy: {self.on_policy!r} is not one of ('off', 'rejected', 'both')")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not self.ppo_epsilon > 0:
            raise ConfigError(f"ppo_epsilon: must be > 0, got {self.ppo_epsilon}")
        if self.on_policy_candidates < 1:
            raise ConfigError(f"on_policy_candidates: must be >= 1, got {self.on_policy_candidates}")
        if self.on_policy_judge not in ("none", "world"):
            raise ConfigError(f"on_policy_judge: {self.on_policy_judge!r} is not one of ('none', 'world')")
        if self.negative_weight_power < 0:
            raise ConfigError(f"negative_weight_power: must be >= 0, got {self.negative_weight_power}")


def paper_rmsprop(**overrides) -> OptimizerConfig:
    """The paper's LLM recipe (Ren & Sutherland 2025, App.): RMSprop, lr 5e-7, 150 warm-up steps, clip 10.

    β = 0.1 of the same recipe is :attr:`DPOConfig.beta`'s default.
    """
    values = dict(optimizer="rmsprop", learning_rate=5e-7, warmup_steps=150, clip_norm=10.0, schedule="constant")
    values.update(overrides)
    return OptimizerConfig(**values)


# What may change when a run is resumed: how long it runs, how often it logs, evaluates, tracks
# probes and saves, where it writes, and over how many devices and processes, in which mesh
# (another mesh, data x fsdp, only reorders the gradient sums: the same trajectory up to float32
# rounding, not bitwise; checkpoints are restored onto the new mesh). Everything else
# sets the trajectory (seeds, data, batch, lengths, optimizer, loss, model) and must match.
# (Tracking another probe set into an existing tracking.jsonl is refused by the tracker itself.)
RESUMABLE_FIELDS = frozenset({"num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                              "resume", "progress", "out", "num_devices", "remat", "fsdp", "distributed",
                              "track_every", "track_prompts", "track_batch_size"})


def resume_signature(config: LoopConfig, *, command: str, sources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready dict that a checkpoint must share with ``config`` to be resumed by it.

    Every field of ``config`` except :data:`RESUMABLE_FIELDS`, plus ``command`` and ``sources``
    (which override fields of the same name: e.g. the resolved ``data``/``model`` paths and the
    content hashes of those files, see :func:`ldjax.train.checkpoint.file_digest`). With a
    ``linear`` or ``cosine`` schedule ``num_steps`` is kept too: the decay ends there, so
    changing it changes every learning rate.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"resume_signature: expected a config dataclass, got {type(config).__name__}")
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    free = set(RESUMABLE_FIELDS)
    if values.get("schedule", "constant") != "constant":
        free.discard("num_steps")
    signature = {k: v for k, v in values.items() if k not in free}
    signature["command"] = command
    signature.update(json.loads(json.dumps(dict(sources or {}), default=str)))
    return signature
