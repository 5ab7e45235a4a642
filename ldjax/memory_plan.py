"""``ldjax plan``: per-device memory of a finetuning job, from shapes only, and whether it fits.

    ldjax plan --model pythia-410m --command dpo --batch-size 4 --max-length 512 --optimizer rmsprop --device tpu-v5e
    ldjax plan --model pythia-2.8b --batch-size 8 --num-devices 8 --fsdp 8 --device tpu-v4 --json

Nothing is allocated: the parameters come from ``nnx.eval_shape`` of the real
:class:`ldjax.models.transformer.CausalLM` built from the preset's (or directory's) config, the
optimizer state from ``jax.eval_shape`` of the real :func:`ldjax.train.optim.build_optimizer`
chain's ``init``. Every byte count below is **per device**.

Components (what the train step of :func:`ldjax.train.steps.make_train_step` holds at its peak,
the backward pass):

* **parameters**, **gradients** (same dtype and layout as the parameters), **optimizer state**
  (Adam/AdamW: two moments; RMSprop: one, plus a momentum buffer with ``--momentum``; SGD: none,
  or one with momentum; plus scalar counters) — each array split over the ``"fsdp"`` mesh axis
  by :func:`ldjax.train.sharding.fsdp_partition_spec` (its bytes / fsdp when the rule splits
  it, else whole).
* **gradient accumulator** (``--accumulation-steps`` > 1): the running sum beside each
  micro-batch's gradient, parameter layout.
* **reference model** (``dpo --reference model`` only): a frozen copy of the parameters.
  ldjax does *not* hold one by default: :func:`ldjax.train.objectives.reference_logps` scores
  the whole dataset with the starting policy once before training and the train step reads
  ``ref_chosen_logps`` / ``ref_rejected_logps`` from the batch (``--reference precomputed``);
  only on-policy DPO (``ldjax dpo --on-policy``) keeps reference weights during training.
* **gathered parameters** (fsdp > 1): full-size copies of split matrices (:func:`gathered_bytes`).
* **activations**: what the backward pass reads, for the rows on one device. Per block, with
  ``s`` sequences of ``T`` tokens, width ``D``, MLP width ``F``, ``H`` heads, compute bytes
  ``c``: GPT-NeoX keeps 9 (B, T, D) tensors (input, two norm outputs, q/k/v, rotated q/k,
  attention output), 2 (B, T, F) (MLP pre- and post-activation) and 2 (B, H, T, T) float32
  (scores and softmax); Qwen2 10 / 4 / 2 (SwiGLU keeps gate, up, act and product), plus the
  repeated k, v of grouped-query attention. The head keeps the final-norm output (B, T, D) and
  2 float32 (B, T, V) (logits and their log-softmax; a third in ``c`` when ``c`` < 4). With
  ``--remat``: one (B, T, D) block input per layer plus one block's working set.
  DPO runs chosen and rejected: ``s = 2 × pairs``.
* **batch**: the int32 token arrays (3 per sequence side) of the device's rows.

Rows per device: the batch is split over every device of the mesh (``"data"`` × ``"fsdp"``,
ZeRO-3 as in MaxText, :mod:`ldjax.train.sharding`) and into ``--accumulation-steps``
micro-batches: ``rows = batch / (num_devices × accumulation)``; the batch must be a multiple of
``num_devices × accumulation``. DPO counts the one concatenated pass over chosen and rejected
that ldjax runs on an accelerator (``s = 2 × pairs``).

What XLA holds under FSDP (fsdp > 1), read from the buffer assignment and live ranges of the
compiled step (``--xla_dump_to``) of the tiny configs below. Each device computes its own rows,
so every matmul needs its whole weight or the fsdp group's rows. XLA's SPMD partitioner
all-gathers one operand per matmul:

* the attention matrices (split on their input axis by the rule) are all-gathered full-size
  in the forward pass and the full copies of *every* layer stay live into the backward pass
  (no remat: XLA reuses them rather than gathering again). In the backward pass each weight
  gradient ``dW = x^T dy`` of a gathered matrix is produced full-size (a partial sum over the
  device's rows) and held until it is reduce-scattered, so at the peak — the end of the forward
  pass or, with a large fsdp group, the end of the backward pass — about one full copy of
  these matrices is live, as gathered weights or as full-size gradients;
* a matrix split on its output axis (MLP up/gate, output head; with them the MLP down
  projection and the embedding) is gathered the same way, *unless* the fsdp group's input
  activation is smaller: then XLA all-gathers the activation (``fsdp × rows × T × D``) and
  runs the matmul split over the output features, as tensor parallelism does, and the matrix
  and its gradient stay split. The plan applies the comparison XLA makes (the smaller
  operand moves): MLP gathered unless ``fsdp × s × T × c < F × p``, embedding/head unless
  ``fsdp × s × T × c < V × p`` (``c``/``p``: compute/parameter bytes);
* parameters, optimizer moments and the reduce-scattered gradients stay split by
  :func:`ldjax.train.sharding.fsdp_partition_spec`; the activations are those of the device's
  own rows.

Checked (``tests/test_memory_plan.py``) against XLA's own buffer assignment of the compiled
train step (``compiled.memory_analysis()``: arguments + outputs not aliased + temporaries) of
tiny models on CPU (8 fake devices; ``d = 256`` = a GPT-NeoX of width 256, 4 layers, F = 1024,
V = 512): one device SFT -5 %, DPO -5 %; data-parallel 8 DPO with accumulation 2 +7 %; fsdp 8
SFT -5 % (d = 64, T = 128), SFT with accumulation 2 -16 % (d = 256), DPO +1 % (d = 256);
data 2 × fsdp 4 DPO +20 %; data 4 × fsdp 2 SFT -3 %, DPO +5 %. **Not within 20 %: fsdp 8 DPO
of the repository's tiny Qwen2 (d = 64, T = 64), -37 %**: there XLA gathers the group's
activations for *every* matmul, attention included (16 KB kernels against 256 KB of
activations), and runs the whole block split over features, with attention split over only
gcd(4 heads, 8) = 4 devices for all 16 sequences of the group; the plan's rule keeps attention
weight-gathered and does not predict that choice. Which operand XLA moves is its
partitioner's decision; the plan reproduces it only through the size comparison above. The
CPU compiler ignores rematerialisation (its temporaries are the same with and without
``--remat``), so the remat formula is not checked there.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import pathlib
import sys
from unittest import mock
from dataclasses import dataclass, field
from typing import Any, Sequence

from ldjax.train.config import OPTIMIZERS, ConfigError

GiB = 2 ** 30
MiB = 2 ** 20

# Memory per chip, bytes. TPU HBM per chip from Google's TPU docs; GPUs as nvidia-smi reports
# the total (the H200's "141 GB" is 143,771 MiB).
DEVICES: dict[str, tuple[int, str]] = {
    "tpu-v2": (8 * GiB, "TPU v2, 8 GiB HBM per chip"),
    "tpu-v3": (16 * GiB, "TPU v3, 16 GiB HBM per chip"),
    "tpu-v4": (32 * GiB, "TPU v4, 32 GiB HBM per chip"),
    "tpu-v5e": (16 * GiB, "TPU v5e, 16 GiB HBM per chip"),
    "a100-40g": (40 * GiB, "NVIDIA A100 40 GB"),
    "a100-80g": (80 * GiB, "NVIDIA A100 80 GB"),
    "h100-80g": (81559 * MiB, "NVIDIA H100 80 GB (81,559 MiB)"),
    "h200": (143771 * MiB, "NVIDIA H200 141 GB (143,771 MiB)"),
}

# Public architectures as Hugging Face config.json dicts (the fields TransformerConfig.from_hf_dict
# reads). Pythia = GPT-NeoX (EleutherAI/pythia-*), Qwen1.5 = Qwen2 (Qwen/Qwen1.5-*).
def _pythia(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(model_type="gpt_neox", vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=4 * hidden, hidden_act="gelu", rotary_pct=0.25,
                rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
                max_position_embeddings=2048, tie_word_embeddings=False)


def _qwen15(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> dict[str, Any]:
    return dict(model_type="qwen2", vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                tie_word_embeddings=tied)


PRESETS: dict[str, dict[str, Any]] = {
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "qwen1.5-0.5b": _qwen15(1024, 24, 16, 2816, tied=True),
    "qwen1.5-1.8b": _qwen15(2048, 24, 16, 5504, tied=False),
}
# The repository's CPU-sized presets (TransformerConfig.tiny, vocabulary 256).
TINY_PRESETS = ("tiny-gpt_neox", "tiny-qwen2")
DTYPES = ("float32", "bfloat16", "float16")
COMMANDS = ("sft", "dpo", "pretrain")


@dataclass(frozen=True)
class PlanConfig:
    """ldjax plan: per-device memory of a model, recipe and mesh (from shapes; nothing allocated), and whether it fits a device."""

    model: str = field(default="pythia-410m", metadata={"help": f"a preset ({', '.join(list(PRESETS) + list(TINY_PRESETS))}) or a local Hugging Face directory with config.json"})
    command: str = field(default="sft", metadata={"help": f"one of {COMMANDS}: dpo runs chosen and rejected (2 sequences per pair)"})
    batch_size: int = field(default=4, metadata={"help": "examples (dpo: pairs) per optimizer step, across all devices and micro-batches"})
    max_length: int = field(default=512, metadata={"help": "tokens per sequence T (every batch is padded to it)"})
    optimizer: str = field(default="rmsprop", metadata={"help": f"one of {OPTIMIZERS}: adam/adamw keep 2 moments, rmsprop 1, sgd none"})
    momentum: float = field(default=0.0, metadata={"help": "SGD/RMSprop momentum: > 0 adds a momentum buffer"})
    param_dtype: str = field(default="float32", metadata={"help": f"storage dtype of parameters, gradients and optimizer moments, one of {DTYPES}"})
    compute_dtype: str = field(default="float32", metadata={"help": f"activation dtype, one of {DTYPES} (attention scores and logits stay float32)"})
    remat: bool = field(default=False, metadata={"help": "rematerialise each block (TransformerConfig.remat): keep one block input per layer"})
    num_devices: int = field(default=1, metadata={"help": "devices of the mesh N"})
    fsdp: int = field(default=1, metadata={"help": "devices on the 'fsdp' axis M (must divide N); the 'data' axis is N / M"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    reference: str = field(default="precomputed", metadata={"help": "dpo: 'precomputed' (ldjax: reference log-probs scored once before training, no reference weights in the step) or 'model' (a frozen reference copy, e.g. on-policy DPO)"})
    device: str = field(default="tpu-v5e", metadata={"help": f"one of {', '.join(DEVICES)}"})
    json: bool = field(default=False, metadata={"help": "print the plan as JSON"})


# ------------------------------------------------------------------------------- model

def transformer_config(model: str, *, remat: bool = False):
    """The :class:`~ldjax.models.transformer.TransformerConfig` of a preset name or a HF directory.

    Raises:
      ConfigError: an unknown preset and no such directory, or an unreadable config.json.
    """
    from ldjax.models.transformer import TransformerConfig
    if model in PRESETS:
        return TransformerConfig.from_hf_dict(PRESETS[model], remat=remat)
    if model in TINY_PRESETS:
        return TransformerConfig.tiny(model.split("-", 1)[1], remat=remat)
    path = pathlib.Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model}: not a preset and no such directory — pass one of "
                          f"{', '.join(list(PRESETS) + list(TINY_PRESETS))} or a Hugging Face directory with config.json")
    from ldjax.models.hf import PretrainedFormatError, read_config
    try:
        return read_config(path, remat=remat)
    except PretrainedFormatError as e:
        raise ConfigError(f"--model {model}: {e} — pass a Hugging Face directory of a gpt_neox or qwen2 model") from e


def _dtype(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


@functools.lru_cache(maxsize=16)
def abstract_params(tcfg, param_dtype: str = "float32", compute_dtype: str = "float32"):
    """``(graphdef, params, rest)`` of ``CausalLM(tcfg)`` as ``jax.ShapeDtypeStruct`` leaves (no
    allocation; cached per config — treat the result as read-only)."""
    from flax import nnx

    from ldjax.models.transformer import CausalLM
    from ldjax.train import steps
    model = nnx.eval_shape(lambda: CausalLM(tcfg, rngs=nnx.Rngs(0), dtype=_dtype(compute_dtype),
                                            param_dtype=_dtype(param_dtype)))
    return steps.split_model(model)


def parameter_count(tcfg) -> int:
    """Number of parameters of ``CausalLM(tcfg)``, from ``nnx.eval_shape`` (embeddings included,
    a tied head counted once)."""
    import jax
    _, params, _ = abstract_params(tcfg)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def sharded_bytes(tree: Any, fsdp: int) -> int:
    """Per-device bytes of every array leaf of ``tree`` split by :func:`~ldjax.train.sharding.fsdp_partition_spec`:
    ``nbytes / fsdp`` for a leaf the rule splits, ``nbytes`` for one it replicates."""
    import jax
    import numpy as np

    from ldjax.train.sharding import fsdp_partition_spec
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(np.shape(leaf))
        nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
        split = any(axis is not None for axis in fsdp_partition_spec(shape, fsdp))
        total += -(-nbytes // fsdp) if split else nbytes
    return int(total)


def _kernel_role(path) -> str:
    """``"mlp"``, ``"vocab"`` (embedding / output head) or ``"attn"`` (the other block kernels)
    for one parameter path; ``""`` for a vector (norm scales, biases)."""
    keys = [str(getattr(k, "key", k)) for k in path]
    if any(k in ("embed", "lm_head") for k in keys):
        return "vocab"
    if "mlp" in keys:
        return "mlp"
    return "attn"


def gathered_bytes(params: Any, fsdp: int, group_tokens: float, compute_dtype: str = "float32") -> dict[str, int]:
    """The full-size parameter copies an FSDP step holds (ZeRO-3 as XLA's SPMD partitioner
    compiles it; module docstring).

    Every split matrix is either all-gathered before its matmul (its full copy kept from the
    forward pass into the backward pass, then replaced by its full-size weight gradient until
    that is reduce-scattered) or left split while the *activation* is all-gathered over the
    fsdp group instead (the matmul then runs split over the output axis, as tensor
    parallelism). XLA moves the smaller operand: the MLP's matrices stay split when the fsdp
    group's input rows ``group_tokens × hidden × c`` are smaller than the up-projection
    ``hidden × intermediate × p``; the embedding and output head when they are smaller than
    ``hidden × vocab × p``; the attention matrices (split on their input axis) are gathered.

    Args:
      params: the parameter tree (``ShapeDtypeStruct`` leaves).
      fsdp: devices on the ``"fsdp"`` axis.
      group_tokens: tokens of one micro-batch's forward pass on the fsdp group (rows per
        device × fsdp × length).
      compute_dtype: the activations' dtype.

    Returns:
      ``{"attn": ..., "mlp": ..., "vocab": ...}`` full bytes gathered per group (0 for a group
      that stays split).
    """
    import jax
    import numpy as np

    from ldjax.train.sharding import fsdp_partition_spec
    c = np.dtype(_dtype(compute_dtype)).itemsize
    out = {"attn": 0, "mlp": 0, "vocab": 0}
    if fsdp <= 1:
        return out
    mats: dict[str, list[tuple[tuple[int, ...], int]]] = {"attn": [], "mlp": [], "vocab": []}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if len(x.shape) < 2 or not any(a is not None for a in fsdp_partition_spec(tuple(x.shape), fsdp)):
            continue  # vectors and replicated matrices: nothing to gather
        mats[_kernel_role(path)].append((tuple(x.shape), np.dtype(x.dtype).itemsize))
    for role, found in mats.items():
        if not found:
            continue
        if role == "attn":
            keep_split = False
        else:  # compare the group's input activation with one matrix of the group
            shape, p = max(found, key=lambda f: math.prod(f[0]))
            hidden = min(shape)
            keep_split = group_tokens * hidden * c < math.prod(shape) * p
        if not keep_split:
            out[role] = int(sum(math.prod(sh) * p for sh, p in found))
    return out


def _optimizer(config: PlanConfig):
    from ldjax.train import optim
    from ldjax.train.config import OptimizerConfig
    return optim.build_optimizer(OptimizerConfig(optimizer=config.optimizer, momentum=config.momentum))


# ------------------------------------------------------------------------------- activations

def activation_bytes(tcfg, sequences: float, length: int, compute_dtype: str = "float32",
                     remat: bool = False) -> dict[str, float]:
    """Bytes of what the backward pass reads, for ``sequences`` rows of ``length`` tokens.

    Args:
      tcfg: the architecture.
      sequences: rows on the device per micro-batch (may be fractional: rows split over fsdp).
      length: tokens per row T.
      compute_dtype: the activations' dtype (scores, softmax and logits are float32).
      remat: one block input per layer plus one block's working set, instead of every block's.

    Returns:
      ``{"blocks": ..., "logits": ...}`` in bytes: the transformer blocks, and the head
      (final norm output, float32 logits and log-softmax).
    """
    import numpy as np
    c = np.dtype(_dtype(compute_dtype)).itemsize
    s, t = float(sequences), int(length)
    d, f, h, hkv, hd, v = (tcfg.hidden_size, tcfg.intermediate_size, tcfg.num_heads, tcfg.num_kv_heads,
                           tcfg.head_dim, tcfg.vocab_size)
    btd = s * t * d * c
    scores = 2 * s * h * t * t * 4 + (s * h * t * t * c if c < 4 else 0)
    if tcfg.arch == "gpt_neox":
        layer = 9 * btd + 2 * s * t * f * c + scores
    else:
        repeated_kv = 2 * s * t * h * hd * c if h != hkv else 0
        layer = 10 * btd + 4 * s * t * f * c + scores + repeated_kv
    blocks = (tcfg.num_layers * btd + layer) if remat else tcfg.num_layers * layer
    logits = btd + 2 * s * t * v * 4 + (s * t * v * c if c < 4 else 0)
    return {"blocks": blocks, "logits": logits}


# ------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Per-device bytes of each component, the total, and the device's capacity."""

    config: PlanConfig
    parameters: int
    rows_per_device: float
    components: list[tuple[str, int, str]]
    capacity: int

    @property
    def total(self) -> int:
        return int(sum(b for _, b, _ in self.components))

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    def to_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "parameters": self.parameters,
                "rows_per_device": self.rows_per_device,
                "components": [{"name": n, "bytes": b, "gib": b / GiB, "what": w} for n, b, w in self.components],
                "total_bytes": self.total, "total_gib": self.total / GiB,
                "device": self.config.device, "capacity_bytes": self.capacity, "capacity_gib": self.capacity / GiB,
                "fits": self.fits, "headroom_bytes": self.headroom, "headroom_gib": self.headroom / GiB}

    def table(self) -> str:
        """The plan as a fixed-width text table."""
        c = self.config
        data = c.num_devices // c.fsdp
        lines = [f"ldjax plan: {c.model} ({self.parameters:,} parameters), {c.command}, batch {c.batch_size} x "
                 f"{c.max_length} tokens, {c.optimizer}, params {c.param_dtype}, compute {c.compute_dtype}"
                 f"{', remat' if c.remat else ''}",
                 f"mesh: {c.num_devices} device(s) = data {data} x fsdp {c.fsdp}; accumulation {c.accumulation_steps}; "
                 f"{self.rows_per_device:g} sequence(s) per device per micro-batch",
                 "", f"{'component':<24}{'bytes per device':>18}{'GiB':>10}  what"]
        for name, b, what in self.components:
            lines.append(f"{name:<24}{b:>18,}{b / GiB:>10.3f}  {what}")
        lines.append(f"{'total':<24}{self.total:>18,}{self.total / GiB:>10.3f}")
        lines.append(f"{'device ' + c.device:<24}{self.capacity:>18,}{self.capacity / GiB:>10.3f}  {DEVICES[c.device][1]}")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"{verdict}: headroom {self.headroom / GiB:+.3f} GiB ({100 * self.total / self.capacity:.0f} % used)")
        return "\n".join(lines)


def check(config: PlanConfig) -> None:
    """Refuses a config that describes no job, before any shape is traced.

    Raises:
      ConfigError: naming the flag and what to do.
    """
    def refuse(what: str, todo: str):
        raise ConfigError(f"{what} — {todo}")

    if config.device not in DEVICES:
        refuse(f"--device {config.device!r} is not known", f"pass one of {', '.join(DEVICES)}")
    if config.command not in COMMANDS:
        refuse(f"--command {config.command!r} is not one of {COMMANDS}", "pass one of those")
    if config.optimizer not in OPTIMIZERS:
        refuse(f"--optimizer {config.optimizer!r} is not one of {OPTIMIZERS}", "pass one of those")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(config, name) not in DTYPES:
            refuse(f"--{name.replace('_', '-')} {getattr(config, name)!r} is not one of {DTYPES}", "pass one of those")
    for name in ("batch_size", "max_length", "num_devices", "fsdp", "accumulation_steps"):
        if getattr(config, name) < 1:
            refuse(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}", "pass a positive number")
    if config.num_devices % config.fsdp:
        refuse(f"--fsdp {config.fsdp} does not divide --num-devices {config.num_devices}",
               "choose an --fsdp that divides --num-devices (the data axis is num_devices / fsdp)")
    if config.batch_size % (config.num_devices * config.accumulation_steps):
        refuse(f"--batch-size {config.batch_size} is not a multiple of the {config.num_devices} devices of the mesh "
               f"x --accumulation-steps {config.accumulation_steps} (every device computes its own rows, fsdp "
               "devices too)", "choose a --batch-size that both divide")
    if config.reference not in ("precomputed", "model"):
        refuse(f"--reference {config.reference!r} is not one of ('precomputed', 'model')", "pass one of those")
    if config.momentum < 0:
        refuse(f"--momentum must be >= 0, got {config.momentum}", "pass 0 (none) or a positive momentum")


def make_plan(config: PlanConfig) -> Plan:
    """The per-device memory of ``config`` (see the module docstring for each component).

    Raises:
      ConfigError: a config :func:`check` refuses, an unknown model, a sequence longer than
        the model's positions.
    """
    import jax
    import numpy as np

    check(config)
    tcfg = transformer_config(config.model, remat=config.remat)
    if config.max_length > tcfg.max_position_embeddings:
        raise ConfigError(f"--max-length {config.max_length} exceeds {config.model}'s max_position_embeddings="
                          f"{tcfg.max_position_embeddings} — lower --max-length")
    _, params, rest = abstract_params(tcfg, config.param_dtype, config.compute_dtype)
    count = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
    m = config.fsdp
    opt_state = jax.eval_shape(_optimizer(config).init, params)

    param_b = sharded_bytes(params, m)
    where = f"split over fsdp={m} by fsdp_partition_spec" if m > 1 else "whole on every device"
    components = [("parameters", param_b, f"{count:,} x {config.param_dtype}, {where}"),
                  ("gradients", param_b, "parameter dtype and layout")]
    opt_b = sharded_bytes(opt_state, m)
    moments = {"adam": "2 moments", "adamw": "2 moments", "rmsprop": "1 moment (squared-gradient average)",
               "sgd": "no moments"}[config.optimizer]
    if config.momentum and config.optimizer in ("sgd", "rmsprop"):
        moments += " + momentum buffer"
    components.append(("optimizer state", opt_b, f"{config.optimizer}: {moments} + counters, parameter layout"))
    if config.accumulation_steps > 1:
        components.append(("gradient accumulator", param_b, f"sum over {config.accumulation_steps} micro-batches"))
    if config.command == "dpo" and config.reference == "model":
        components.append(("reference model", param_b, "frozen copy of the parameters (--reference model)"))

    rows = config.batch_size / config.num_devices / config.accumulation_steps
    sequences = rows * (2 if config.command == "dpo" else 1)
    if m > 1:
        gathered = gathered_bytes(params, m, sequences * m * config.max_length, config.compute_dtype)
        names = [n for n in ("attn", "mlp", "vocab") if gathered[n]]
        kept = [n for n in ("mlp", "vocab") if not gathered[n]]
        what = ("full copies (then full-size gradients) of the " + " + ".join(
            {"attn": "attention", "mlp": "MLP", "vocab": "embedding/head"}[n] for n in names) + " matrices, all layers"
            if names else "none")
        if kept:
            what += "; " + " + ".join({"mlp": "MLP", "vocab": "embedding/head"}[n] for n in kept) + \
                " stay split (activations gathered instead)"
        components.append(("gathered parameters", int(sum(gathered.values())), what))
    act = activation_bytes(tcfg, sequences, config.max_length, config.compute_dtype, config.remat)
    blocks_what = (f"{tcfg.num_layers} blocks, {sequences:g} seq x {config.max_length} tokens"
                   + (" (remat: 1 input per block + 1 block)" if config.remat else ""))
    components.append(("activations: blocks", int(round(act["blocks"])), blocks_what))
    components.append(("activations: logits", int(round(act["logits"])),
                       f"float32 (B, T, V={tcfg.vocab_size}) logits and log-softmax"))
    arrays = 6 if config.command == "dpo" else 3
    batch_rows = config.batch_size / config.num_devices
    components.append(("batch", int(math.ceil(batch_rows * arrays * config.max_length * 4
                                              + (batch_rows * 8 if config.command == "dpo" else 0))),
                       f"int32 token arrays of the device's rows ({batch_rows:g})"))
    capacity = DEVICES[config.device][0]
    return Plan(config, count, sequences, components, capacity)


# ------------------------------------------------------------------------------- measuring

def _jitted_step(step, state):
    """The ``jax.jit`` object inside a :func:`ldjax.train.steps.make_train_step` closure."""
    names = inspect.getclosurevars(step).nonlocals
    if "compiled_step" in names:
        return names["compiled_step"](state)
    if "compiled" in names:
        return names["compiled"]
    raise RuntimeError("make_train_step's closure holds no jitted step (compiled_step / compiled)")


def measure_xla(config: PlanConfig) -> dict[str, int]:
    """XLA's per-device buffer assignment of the real compiled train step of ``config``.

    Builds :func:`ldjax.train.steps.make_train_step` with the loss that ``ldjax sft|dpo``
    uses (:func:`ldjax.train.objectives.sft_objective` / ``preference_objective``) and the
    optimizer of ``config``, on a ``("data", "fsdp")`` mesh of the first ``num_devices``
    devices, lowers it with abstract arguments (nothing allocated) and compiles it.

    Returns:
      ``{argument, output, alias, temp, total}`` bytes per device from
      ``compiled.memory_analysis()``; ``total = argument + output - alias + temp`` (the
      donated state's outputs reuse its argument buffers).
    """
    import jax
    import jax.numpy as jnp

    from ldjax.train import objectives, sharding, steps
    check(config)
    tcfg = transformer_config(config.model, remat=config.remat)
    graphdef, params, rest = abstract_params(tcfg, config.param_dtype, config.compute_dtype)
    optimizer = _optimizer(config)
    if config.command == "dpo":
        loss_fn = objectives.preference_objective("sigmoid", beta=0.1)
        keys = [f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")]
    else:
        loss_fn = objectives.sft_objective()
        keys = ["input_ids", "attention_mask", "loss_mask"]
    mesh = (sharding.make_mesh(config.num_devices, fsdp=config.fsdp) if hasattr(sharding, "make_mesh")
            else sharding.data_mesh(num_devices=config.num_devices))
    step = steps.make_train_step(graphdef, loss_fn, optimizer, rest=rest, mesh=mesh,
                                 accumulation_steps=config.accumulation_steps)
    state = jax.eval_shape(lambda p: steps.init_train_state(p, optimizer, 0), params)
    data = sharding.batch_sharding(mesh)
    b, t = config.batch_size, config.max_length
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=data) for k in keys}
    if config.command == "dpo":
        batch.update({k: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=data)
                      for k in ("ref_chosen_logps", "ref_rejected_logps")})
    # ldjax trains with jax_enable_x64 off; the DPO forward pass is the one concatenated pass
    # over chosen and rejected that ldjax runs on an accelerator (on CPU it runs two).
    concatenated = functools.partial(objectives.policy_logps, concatenate=True)
    with jax.enable_x64(False), mock.patch.object(objectives, "policy_logps", concatenated):
        stats = _jitted_step(step, state).lower(state, batch, rest, None).compile().memory_analysis()
    out = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
           "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ------------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    """``ldjax plan [flags]``: prints the plan (a table, or JSON with ``--json``); returns 0.

    Exit status 0 whether or not it fits (the verdict is printed); a bad flag raises
    :class:`~ldjax.train.config.ConfigError` (``ldjax plan`` reports it as one line, status 2).
    """
    from ldjax.config import parse_config
    config = parse_config(PlanConfig, list(sys.argv[1:] if argv is None else argv), prog="ldjax plan")
    plan = make_plan(config)
    print(json.dumps(plan.to_dict(), indent=1) if config.json else plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
