"""SFT and DPO train-step throughput of ldjax against a plain PyTorch implementation of the same step.

Both sides train the *same* model from the *same* weights on the *same* batch: the driver
builds a :class:`ldjax.models.CausalLM`, writes it with :func:`ldjax.models.save_pretrained`
(Hugging Face safetensors) together with a token batch (``.npz``), and every measurement runs
in its own subprocess so that each gets clean ``XLA_FLAGS``, thread settings and a clean peak
RSS:

- ldjax runners re-run this file with ``--worker JOB.json`` in ldjax's environment: the model
  is loaded with ``load_pretrained``, the step is :func:`ldjax.train.make_train_step` with
  ``sft_objective`` / ``preference_objective("sigmoid")`` and optax Adam, optionally on a
  data-parallel mesh of host CPU devices (``--xla_force_host_platform_device_count``).
- torch runners call ``benchmarks/torch_reference.py`` in a separate virtual environment
  (``benchmarks/requirements-torch.txt``), a hand-written PyTorch model of the same
  architecture with the same losses and ``torch.optim.Adam``; optionally also transformers'
  own model class as a second reference.

Per cell it records the median step time after warm-up, tokens/s (``B × T`` per SFT step,
``2 × B × T`` per DPO step: chosen and rejected are both run), peak RSS (``getrusage``) and,
for ldjax, XLA's compiled memory analysis and FLOP count; and the losses of every step, so
the table shows that the two sides computed the same thing. On a GPU the same script also
reports model FLOPs utilisation (PaLM's 6N + 12·L·H·Q·T FLOPs per token, Chowdhery et al. 2022,
App. B) against the device's peak.

Run: ``python benchmarks/train.py --out benchmarks/results`` (``--help`` for the fields). On one
GPU: ``--device gpu --runners ldjax torch --extra-runners hf --xla-flag-trials`` (no host-device
mesh there; pass ``--peak-tflops`` for a GPU not in :data:`PEAK_TFLOPS`). MFU is computed against
the TF32 tensor-core peak, which JAX's default float32 matmul precision uses on NVIDIA GPUs;
torch keeps full float32 matmuls unless ``allow_tf32`` is set, so its MFU is understated there.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldjax import host_memory
from ldjax.config import parse_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import process_stats  # noqa: E402  (stdlib-only helpers shared with the other environments)

BENCH_DIR = pathlib.Path(__file__).resolve().parent
TORCH_REFERENCE = BENCH_DIR / "torch_reference.py"
TORCH_REQUIREMENTS = BENCH_DIR / "requirements-torch.txt"
DEFAULT_TORCH_VENV = BENCH_DIR.parent / ".venv-torch"  # the one `make torch-venv` builds

# glibc serves larger blocks with mmap whatever its (dynamic) threshold: 4 * 1024 * 1024 * sizeof(long).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


# One XLA CPU thread per device: no Eigen thread pool inside an op (the SPEC §4 "threading off").
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class BenchmarkError(ValueError):
    """A benchmark setting that cannot run (unknown size or runner, missing torch environment)."""


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class ModelSize:
    """A model width/depth and the batch it trains on (``batch_size`` sequences of ``seq_len``)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    seq_len: int

    def transformer_config(self, arch: str):
        from ldjax.models.transformer import TransformerConfig

        return TransformerConfig.tiny(arch, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                      num_layers=self.num_layers, num_heads=self.num_heads,
                                      num_kv_heads=None if arch == "gpt_neox" else max(1, self.num_heads // 2),
                                      intermediate_size=self.intermediate_size)


SIZES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("tiny", 64, 32, 1, 2, 64, 4, 16),          # tests only
    ModelSize("100k", 256, 64, 2, 4, 256, 8, 64),        # ~0.13M params (GPT-NeoX)
    ModelSize("1m", 1024, 128, 4, 4, 512, 8, 128),       # ~1.1M
    ModelSize("4m", 2048, 256, 4, 4, 1024, 8, 128),      # ~4.2M: SPEC §4's case (V 2048, 8 x 128)
)}


@dataclass(frozen=True)
class Runner:
    """One implementation and its thread/device settings."""

    name: str
    impl: str                # "ldjax" | "torch" | "hf"
    num_devices: int = 1     # ldjax: devices of the data mesh (1 = no mesh)
    xla_flags: str = ""      # ldjax: extra XLA_FLAGS
    threads: int = 0         # torch: torch.set_num_threads (0 = default, one per core)
    sdpa: bool = True        # torch: fused scaled_dot_product_attention
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables of the measuring process
    label: str = ""

    @property
    def is_ldjax(self) -> bool:
        return self.impl == "ldjax"


RUNNERS: dict[str, Runner] = {r.name: r for r in (
    Runner("ldjax", "ldjax", label="ldjax, 1 device (default XLA threads)"),
    Runner("ldjax-1thread", "ldjax", xla_flags=SINGLE_THREAD_FLAGS, label="ldjax, 1 device, Eigen threading off"),
    Runner("ldjax-mesh2", "ldjax", num_devices=2, label="ldjax, 2-device data mesh"),
    Runner("ldjax-mesh2-1thread", "ldjax", num_devices=2, xla_flags=SINGLE_THREAD_FLAGS,
           label="ldjax, 2-device data mesh, Eigen threading off"),
    Runner("ldjax-system-malloc", "ldjax", env=((host_memory.ENV_VAR, "system"),),
           label="ldjax, glibc malloc defaults: XLA's scratch buffer is mapped afresh every step"),
    Runner("torch", "torch", label="torch eager, default threads, SDPA"),
    Runner("torch-retain-malloc", "torch", env=tuple(host_memory.GLIBC_ENV.items()),
           label="torch eager, default threads, SDPA, with the glibc settings ldjax uses (env variables)"),
    Runner("torch-1thread", "torch", threads=1, label="torch eager, 1 thread, SDPA"),
    Runner("torch-math-attn", "torch", sdpa=False, label="torch eager, default threads, explicit softmax attention"),
    Runner("hf", "hf", label="transformers model class, default threads"),
)}

# Dense peak FLOP/s of known accelerators (vendor data sheets, SXM parts), for MFU.
PEAK_TFLOPS = {
    # device-kind substring: (float32 non-tensor-core, tf32 tensor core, bf16 tensor core)
    "H100": (67.0, 494.7, 989.4),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
}


@dataclass(frozen=True)
class Config:
    """SFT and DPO train-step throughput and peak memory: ldjax vs plain PyTorch on the same model."""

    out: str = field(default="benchmarks/results", metadata={"help": "directory for train.md and train.json"})
    sizes: tuple[str, ...] = field(default=("100k", "1m", "4m"), metadata={"help": f"model sizes, of {sorted(SIZES)}"})
    objectives: tuple[str, ...] = field(default=("sft", "dpo"), metadata={"help": "train steps to time: sft, dpo"})
    runners: tuple[str, ...] = field(
        default=("ldjax", "ldjax-system-malloc", "torch", "torch-retain-malloc"),
        metadata={"help": f"implementations timed at every size, of {sorted(RUNNERS)}"})
    extra_runners: tuple[str, ...] = field(
        default=("ldjax-mesh2", "torch-1thread", "torch-math-attn", "hf"),
        metadata={"help": "implementations timed only at the largest size (device, thread and attention variants)"})
    xla_flag_trials: tuple[str, ...] = field(
        default=(),
        metadata={"help": "extra XLA_FLAGS sets tried at the largest size, each on the 2-device mesh"})
    arch: str = field(default="gpt_neox", metadata={"help": "gpt_neox (Pythia-like) or qwen2"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compilation, allocator warm-up)"})
    steps: int = field(default=7, metadata={"help": "timed steps; the table reports their median"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate (both sides)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    repeats: int = field(default=1, metadata={"help": "run every cell this many times (round robin) and keep the fastest repeat's median, to shed bursts of load from other processes"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and the token batch"})
    torch_python: str = field(default="", metadata={"help": "python of a torch environment; empty = .venv-torch at the repo root (created from benchmarks/requirements-torch.txt if absent)"})
    device: str = field(default="cpu", metadata={"help": "cpu or gpu (ldjax on the default GPU backend, torch on cuda)"})
    peak_tflops: float = field(default=0.0, metadata={"help": "device peak TFLOP/s for MFU; 0 = look up the GPU (none on CPU)"})
    timeout_s: int = field(default=600, metadata={"help": "limit per measurement subprocess"})
    worker: str = field(default="", metadata={"help": "internal: run the ldjax job in this JSON file and print its result"})


# ---------------------------------------------------------------------------------------------
# Inputs shared by both sides


def make_sequence_batch(rng: np.random.Generator, vocab_size: int, batch_size: int, seq_len: int,
                        *, prompt_len: int | None = None, pad: bool = False) -> dict[str, np.ndarray]:
    """Random SFT batch (team convention): ``input_ids``, ``attention_mask``, ``loss_mask`` (B, T) int32.

    The first ``prompt_len`` tokens (default T/4) are prompt, the rest response; with ``pad``
    each row keeps a random real length in [T/2, T] and is right-padded (masks zero there).
    """
    prompt_len = max(1, seq_len // 4) if prompt_len is None else prompt_len
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    lengths = (rng.integers(seq_len // 2, seq_len + 1, size=batch_size) if pad
               else np.full(batch_size, seq_len))
    positions = np.arange(seq_len)[None, :]
    attention = (positions < lengths[:, None]).astype(np.int32)
    loss = (attention * (positions >= prompt_len)).astype(np.int32)
    ids = np.where(attention == 1, ids, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def make_preference_batch(rng: np.random.Generator, vocab_size: int, batch_size: int, seq_len: int,
                          *, pad: bool = False) -> dict[str, np.ndarray]:
    """Random preference batch: chosen and rejected share the prompt and differ in the response."""
    chosen = make_sequence_batch(rng, vocab_size, batch_size, seq_len, pad=pad)
    rejected = make_sequence_batch(rng, vocab_size, batch_size, seq_len, pad=pad)
    prompt = seq_len // 4
    rejected["input_ids"][:, :prompt] = chosen["input_ids"][:, :prompt]
    out = {f"chosen_{k}": v for k, v in chosen.items()}
    out.update({f"rejected_{k}": v for k, v in rejected.items()})
    return out


def write_inputs(size: ModelSize, arch: str, seed: int, directory: pathlib.Path, *,
                 pad: bool = False) -> dict[str, Any]:
    """Writes ``model/`` (HF safetensors of a fresh CausalLM), ``sft.npz`` and ``dpo.npz``.

    The DPO batch carries the reference log-probs of the starting model (computed once with
    :func:`ldjax.train.objectives.reference_logps`, as training does), so the first DPO step
    sits at margin 0 on both sides.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ldjax.models.hf import save_pretrained
    from ldjax.models.transformer import CausalLM
    from ldjax.train.objectives import reference_logps
    from ldjax.train.steps import split_model

    config = size.transformer_config(arch)
    model = CausalLM(config, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
    save_pretrained(model, None, directory / "model")
    rng = np.random.default_rng(seed)
    sft = make_sequence_batch(rng, size.vocab_size, size.batch_size, size.seq_len, pad=pad)
    dpo = make_preference_batch(rng, size.vocab_size, size.batch_size, size.seq_len, pad=pad)
    graphdef, params, rest = split_model(model)
    dpo.update(reference_logps(graphdef, params, rest, dpo, batch_size=size.batch_size))
    np.savez(directory / "sft.npz", **sft)
    np.savez(directory / "dpo.npz", **dpo)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"num_params": num_params, "config": dataclasses.asdict(config)}


# ---------------------------------------------------------------------------------------------
# FLOPs


def model_flops_per_token(config: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token, 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

    N counts the matmul parameters (all but the input embedding lookup; a tied head counts
    once as a matmul); the second term is attention's QKᵀ and AV, forward and backward.
    """
    d, f, v, layers = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_layers"]
    heads, kv_heads, head_dim = config["num_heads"], config["num_kv_heads"], config["head_dim"]
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    mlp = (2 if config["arch"] == "gpt_neox" else 3) * d * f
    matmul_params = layers * (attn + mlp) + d * v
    return 6.0 * matmul_params + 12.0 * layers * heads * head_dim * seq_len


def peak_flops(device_kind: str, override_tflops: float, matmul: str = "tf32") -> float | None:
    """Peak FLOP/s of ``device_kind`` (None when unknown, e.g. a CPU without ``--peak-tflops``)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    column = {"fp32": 0, "tf32": 1, "bf16": 2}[matmul]
    for key, values in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return values[column] * 1e12
    return None


# ---------------------------------------------------------------------------------------------
# The ldjax side (runs inside a worker process whose XLA_FLAGS the driver set)


def measure_ldjax(job: dict[str, Any]) -> dict[str, Any]:
    """Times ldjax's compiled SFT or DPO step; the job fields are those of ``torch_reference.run_job``
    plus ``num_devices``. Returns per-step seconds and losses, peak RSS and XLA's analysis."""
    import jax
    import jax.numpy as jnp

    from ldjax import host_memory
    from ldjax.models.hf import load_pretrained
    from ldjax.train import objectives, sharding
    from ldjax.train.config import OptimizerConfig
    from ldjax.train.optim import build_optimizer
    from ldjax.train.steps import init_train_state, make_train_step, split_model

    rss_start = process_stats.rss_bytes()
    with warnings.catch_warnings():  # the benchmark needs no tokenizer and writes none
        warnings.filterwarnings("ignore", message=".*tokenizer.json not found")
        model, _ = load_pretrained(job["model_dir"], dtype=jnp.float32)
    graphdef, params, rest = split_model(model)
    arrays = dict(np.load(job["batch_file"]))
    batch = {k: np.asarray(v, np.int32 if v.dtype.kind in "iu" else np.float32) for k, v in arrays.items()}
    if job["objective"] == "sft":
        loss_fn = objectives.sft_objective()
    elif job["objective"] == "dpo":
        loss_fn = objectives.preference_objective("sigmoid", beta=float(job.get("beta", 0.1)))
    else:
        raise BenchmarkError(f"job objective={job['objective']!r}: expected 'sft' or 'dpo'")
    optimizer = build_optimizer(OptimizerConfig(optimizer="adam", learning_rate=float(job.get("learning_rate", 1e-4))))
    num_devices = int(job.get("num_devices", 1))
    mesh = sharding.data_mesh(num_devices=num_devices) if num_devices > 1 else None
    step = make_train_step(graphdef, loss_fn, optimizer, rest=rest, mesh=mesh)
    state = init_train_state(params, optimizer, seed=0)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
        device_batch = sharding.shard_batch(batch, mesh)
    else:
        device_batch = jax.device_put(batch)

    times, losses, cpu_start, faults_start = [], [], None, None
    for _ in range(int(job["warmup"]) + int(job["steps"])):
        if len(times) == int(job["warmup"]):
            cpu_start, faults_start = process_stats.cpu_seconds(), process_stats.minor_faults()
        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        losses.append(float(metrics["loss"]))  # float() waits for the step to finish
        times.append(time.perf_counter() - start)
    cpu_seconds = process_stats.cpu_seconds() - cpu_start  # all threads, over the timed steps only
    minor_faults = process_stats.minor_faults() - faults_start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = jax.devices()[0]
    device_stats = device.memory_stats() or {}

    # The same step, compiled once more only to read XLA's static analysis (after the RSS reading).
    compiled = jax.jit(step).lower(state, device_batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_memory = None if memory is None else {
        "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes), "temp_bytes": int(memory.temp_size_in_bytes),
    }
    import flax
    import optax

    return {
        "impl": "ldjax",
        "num_devices": num_devices,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step_seconds": times[int(job["warmup"]):],
        "warmup_seconds": times[:int(job["warmup"])],
        "losses": losses,
        "cpu_seconds": cpu_seconds,
        "minor_faults": minor_faults,
        "host_malloc": host_memory.status(),
        "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        "peak_rss_bytes": peak_rss,
        "rss_start_bytes": rss_start,
        "peak_device_bytes": device_stats.get("peak_bytes_in_use"),
        "xla_memory": xla_memory,
        "xla_flops": None if not cost else float(cost.get("flops", 0.0)) or None,
        "device": device.platform,
        "device_name": device.device_kind,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }


# ---------------------------------------------------------------------------------------------
# The driver


def find_torch_python(config: Config) -> str:
    """The python of a torch environment: ``--torch-python``, else ``.venv-torch`` (repo root)
    (created from ``requirements-torch.txt`` on first use)."""
    if config.torch_python:
        if not pathlib.Path(config.torch_python).is_file():
            raise BenchmarkError(f"--torch-python {config.torch_python}: no such file")
        return config.torch_python
    python = DEFAULT_TORCH_VENV / "bin" / "python"
    if not python.is_file():
        print(f"creating {DEFAULT_TORCH_VENV} from {TORCH_REQUIREMENTS} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(DEFAULT_TORCH_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(TORCH_REQUIREMENTS)])
        if done.returncode:
            raise BenchmarkError(f"pip install -r {TORCH_REQUIREMENTS} into {DEFAULT_TORCH_VENV} failed "
                                 f"(exit {done.returncode}); pass --torch-python PATH of an environment with torch")
    return str(python)


def _run_subprocess(argv: list[str], env: dict[str, str], timeout_s: int, what: str) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise BenchmarkError(f"{what}: no result within {timeout_s} s") from e
    if done.returncode:
        raise BenchmarkError(f"{what}: exit {done.returncode}\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchmarkError(f"{what}: printed no JSON result\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def run_measurement(runner: Runner, job: dict[str, Any], config: Config, torch_python: str | None,
                    scratch: pathlib.Path) -> dict[str, Any]:
    """Runs one (runner, size, objective) cell in a fresh subprocess and returns its result."""
    job = dict(job, impl=runner.impl, threads=runner.threads, sdpa=runner.sdpa, num_devices=runner.num_devices,
               device="cuda" if config.device == "gpu" else "cpu")
    job_file = scratch / f"job-{runner.name}-{job['objective']}.json"
    job_file.write_text(json.dumps(job))
    # The allocator settings a runner measures come from the runner alone, never from the caller's shell.
    env = {k: v for k, v in os.environ.items()
           if k not in (host_memory.ENV_VAR, "LD_PRELOAD") and not k.startswith("MALLOC_")}
    env.update(runner.env)
    if runner.is_ldjax:
        flags = runner.xla_flags
        if runner.num_devices > 1 and config.device == "cpu":
            flags = f"--xla_force_host_platform_device_count={runner.num_devices} {flags}"
        env["XLA_FLAGS"] = flags.strip()
        env["JAX_PLATFORMS"] = "cpu" if config.device == "cpu" else ""
        argv = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(job_file)]
    else:
        if torch_python is None:
            raise BenchmarkError(f"runner {runner.name} needs a torch environment")
        env.pop("XLA_FLAGS", None)
        argv = [torch_python, str(TORCH_REFERENCE), str(job_file)]
    return _run_subprocess(argv, env, config.timeout_s, f"{runner.name} {job['objective']}")


def summarise(result: dict[str, Any], tokens_per_step: int, flops_per_step: float,
              peak: float | None) -> dict[str, Any]:
    """Median step time, throughput, achieved FLOP/s and MFU of one measurement."""
    median = statistics.median(result["step_seconds"])
    out = {
        "median_step_s": median,
        "min_step_s": min(result["step_seconds"]),
        "max_step_s": max(result["step_seconds"]),
        "tokens_per_s": tokens_per_step / median,
        "achieved_tflops": flops_per_step / median / 1e12,
        "peak_rss_mib": result["peak_rss_bytes"] / 2**20,
        "rss_growth_mib": (result["peak_rss_bytes"] - result["rss_start_bytes"]) / 2**20,
        # CPU seconds per wall second over the timed steps: how many cores the step kept busy.
        "cores_busy": result["cpu_seconds"] / sum(result["step_seconds"]),
        "minor_faults_per_step": (None if result.get("minor_faults") is None
                                  else result["minor_faults"] / len(result["step_seconds"])),
    }
    out["mfu"] = None if peak is None else flops_per_step / median / peak
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load average and library versions of this machine."""
    return {"cpu": process_stats.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_start": os.getloadavg()}


def main(config: Config) -> dict[str, Any]:
    """Runs every (size, objective, runner) cell; writes ``train.json`` and ``train.md`` into ``config.out``."""
    from tqdm import tqdm

    unknown = [s for s in config.sizes if s not in SIZES]
    if unknown:
        raise BenchmarkError(f"--sizes: unknown {unknown}; known are {sorted(SIZES)}")
    for name in config.runners + config.extra_runners:
        if name not in RUNNERS:
            raise BenchmarkError(f"--runners/--extra-runners: unknown {name!r}; known are {sorted(RUNNERS)}")
    for objective in config.objectives:
        if objective not in ("sft", "dpo"):
            raise BenchmarkError(f"--objectives: {objective!r} is not 'sft' or 'dpo'")
    if config.steps < 1 or config.warmup < 1:
        raise BenchmarkError("--steps and --warmup must be >= 1 (the first step compiles)")
    if config.repeats < 1:
        raise BenchmarkError(f"--repeats must be >= 1, got {config.repeats}")

    needs_torch = any(RUNNERS[n].impl != "ldjax" for n in config.runners + config.extra_runners)
    torch_python = find_torch_python(config) if needs_torch else None
    out_dir = pathlib.Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    largest = max(config.sizes, key=lambda s: list(SIZES).index(s))
    trials = tuple(Runner(f"ldjax-mesh2 {flags}", "ldjax", num_devices=2, xla_flags=flags,
                          label=f"ldjax, 2-device data mesh, XLA_FLAGS {flags}") for flags in config.xla_flag_trials)
    at_largest = tuple(RUNNERS[name] for name in config.extra_runners) + trials
    plan = [(size, objective, runner) for size in config.sizes for objective in config.objectives
            for runner in tuple(RUNNERS[name] for name in config.runners) + (at_largest if size == largest else ())]

    cells, sizes_info = [], {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ldjax-bench-train-") as tmp:
        scratch = pathlib.Path(tmp)
        for size_name in config.sizes:
            size = SIZES[size_name]
            (scratch / size_name).mkdir()
            sizes_info[size_name] = dict(dataclasses.asdict(size), **write_inputs(size, config.arch, config.seed,
                                                                                  scratch / size_name))
        runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for _, (size_name, objective, runner) in tqdm([(r, cell) for r in range(config.repeats) for cell in plan],
                                                       desc="benchmark cells", unit="cell"):
            size = SIZES[size_name]
            job = {"model_dir": str(scratch / size_name / "model"), "batch_file": str(scratch / size_name / f"{objective}.npz"),
                   "objective": objective, "warmup": config.warmup, "steps": config.steps,
                   "learning_rate": config.learning_rate, "beta": config.beta}
            runs.setdefault((size_name, objective, runner.name), []).append(
                run_measurement(runner, job, config, torch_python, scratch / size_name))
        for size_name, objective, runner in plan:
            size = SIZES[size_name]
            repeats = runs[size_name, objective, runner.name]
            result = min(repeats, key=lambda r: statistics.median(r["step_seconds"]))
            sequences = size.batch_size * (2 if objective == "dpo" else 1)
            tokens = sequences * size.seq_len
            flops = model_flops_per_token(sizes_info[size_name]["config"], size.seq_len) * tokens
            peak = peak_flops(result.get("device_name", ""), config.peak_tflops) if config.device == "gpu" else (
                config.peak_tflops * 1e12 if config.peak_tflops > 0 else None)
            cells.append({"size": size_name, "objective": objective, "runner": runner.name, "label": runner.label,
                          "impl": runner.impl, "xla_flags": runner.xla_flags, "env": dict(runner.env),
                          "tokens_per_step": tokens, "model_flops_per_step": flops,
                          **summarise(result, tokens, flops, peak), "raw": result,
                          "repeat_medians_s": [statistics.median(r["step_seconds"]) for r in repeats]})
    info["load_average_end"] = os.getloadavg()
    info["wall_seconds"] = time.time() - started
    versions: dict[str, str] = {}
    for cell in cells:
        versions.update(cell["raw"].get("versions", {}))
    info["versions"] = versions

    _add_comparisons(cells)
    report = {"config": dataclasses.asdict(config), "machine": info, "sizes": sizes_info, "cells": cells,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "train.json").write_text(json.dumps(report, indent=2))
    (out_dir / "train.md").write_text(render_markdown(report))
    print(f"wrote {out_dir / 'train.md'} and {out_dir / 'train.json'}")
    return report


def _add_comparisons(cells: list[dict[str, Any]]) -> None:
    """Throughput relative to torch (default threads) and the largest loss gap to it, per cell."""
    torch_cells = {(c["size"], c["objective"]): c for c in cells if c["runner"] == "torch"}
    for cell in cells:
        ref = torch_cells.get((cell["size"], cell["objective"]))
        if ref is None:
            cell["speed_vs_torch"] = cell["max_loss_gap_vs_torch"] = None
            continue
        cell["speed_vs_torch"] = cell["tokens_per_s"] / ref["tokens_per_s"]
        ours, theirs = cell["raw"]["losses"], ref["raw"]["losses"]
        cell["max_loss_gap_vs_torch"] = max(abs(a - b) for a, b in zip(ours, theirs))


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown report: machine, one table per objective, observations."""
    info, cfg = report["machine"], report["config"]
    v = info["versions"]
    lines = [
        "# Train-step throughput: ldjax vs plain PyTorch",
        "",
        f"Generated by `benchmarks/train.py` on {report['date']}. Same model (GPT-NeoX-style unless noted: "
        f"`--arch {cfg['arch']}`), same weights (written by `ldjax.models.save_pretrained`, read by both sides), "
        f"same batch, same loss, Adam (lr {cfg['learning_rate']}), float32. Median of {cfg['steps']} timed steps "
        f"after {cfg['warmup']} warm-up steps; each cell is its own process, run {cfg['repeats']} time(s) round "
        f"robin, the fastest repeat kept (all repeat medians are in train.json).",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['platform']}",
        f"- versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())),
        f"- load average (1/5/15 min) at start {tuple(round(x, 2) for x in info['load_average_start'])}, "
        f"at end {tuple(round(x, 2) for x in info['load_average_end'])} (other processes shared the cores)",
        f"- total wall time {info['wall_seconds']:.0f} s",
        "",
        "Tokens per step: B × T for SFT, 2 × B × T for DPO (policy forward and backward on chosen and "
        "rejected in one concatenated batch; reference log-probs precomputed). `× torch` is throughput "
        "relative to torch with its default threads (> 1: faster than torch). `|Δloss|` is the largest "
        "gap to torch's loss over all steps of the run (same start, same updates ⇒ small). `cores busy` is "
        "the process's CPU time (all threads) over the wall time of the timed steps. Peak RSS is "
        "the process high-water mark (`getrusage`), `+RSS` its growth after imports; `XLA temp` is the "
        "compiled step's scratch memory from `memory_analysis()`. `page faults/step` counts minor faults "
        "(`getrusage`) over the timed steps: memory the allocator handed out freshly mapped. `import ldjax` "
        "sets glibc malloc to keep freed memory (`ldjax.host_memory`), so XLA's per-step scratch buffer is "
        "reused instead of being faulted in again every step; `ldjax-system-malloc` shows ldjax without it and "
        "`torch-retain-malloc` gives torch the same glibc settings.",
        "",
    ]
    for size_name, size in report["sizes"].items():
        lines.append(f"- size `{size_name}`: {size['num_params']:,} parameters, vocab {size['vocab_size']}, "
                     f"d {size['hidden_size']}, {size['num_layers']} layers, {size['num_heads']} heads, "
                     f"MLP {size['intermediate_size']}, batch {size['batch_size']} × {size['seq_len']} tokens")
    lines.append("")
    for objective in cfg["objectives"]:
        lines += [f"## {objective.upper()} step", "",
                  "| size | runner | median ms | tokens/s | × torch | cores busy | page faults/step | peak RSS MiB "
                  "| +RSS MiB | XLA temp MiB | GFLOP/s | MFU | loss₀ | \\|Δloss\\| |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for cell in report["cells"]:
            if cell["objective"] != objective:
                continue
            xla = cell["raw"].get("xla_memory")
            lines.append(
                f"| {cell['size']} | {cell['runner']} | {cell['median_step_s'] * 1e3:.1f} | {cell['tokens_per_s']:,.0f} "
                f"| {_fmt(cell['speed_vs_torch'], '.2f')} | {cell['cores_busy']:.2f} "
                f"| {_fmt(cell.get('minor_faults_per_step'), ',.0f')} | {cell['peak_rss_mib']:.0f} | {cell['rss_growth_mib']:.0f} "
                f"| {_fmt(None if xla is None else xla['temp_bytes'] / 2**20, '.1f')} "
                f"| {cell['achieved_tflops'] * 1e3:.1f} | {_fmt(cell['mfu'], '.1%')} "
                f"| {cell['raw']['losses'][0]:.4f} | {_fmt(cell['max_loss_gap_vs_torch'], '.1e')} |")
        lines.append("")
    lines += ["## Runners", ""]
    labels = {c["runner"]: (c["label"], c["xla_flags"], c.get("env", {})) for c in report["cells"]}
    lines += [f"- `{name}`: {label}" + (f" (`XLA_FLAGS={flags}`)" if flags else "")
              + "".join(f" (`{key}={value}`)" for key, value in env.items())
              for name, (label, flags, env) in labels.items()]
    lines += ["", "## Observations (computed from the table)", ""] + observations(report) + [""]
    return "\n".join(lines)


def observations(report: dict[str, Any]) -> list[str]:
    """Sentences derived from the numbers: ldjax vs torch per cell, the allocator's effect, mesh speed-up."""
    out = []
    cells = report["cells"]
    for objective in report["config"]["objectives"]:
        for size in report["config"]["sizes"]:
            here = [c for c in cells if c["size"] == size and c["objective"] == objective]
            ours = [c for c in here if c["impl"] == "ldjax"]
            torch_best = max((c for c in here if c["impl"] != "ldjax"), key=lambda c: c["tokens_per_s"],
                             default=None)
            if not ours or torch_best is None:
                continue
            default = next((c for c in here if c["runner"] == "ldjax"), None)
            torch_default = next((c for c in here if c["runner"] == "torch"), None)
            if default and torch_default:
                ratio = default["tokens_per_s"] / torch_default["tokens_per_s"]
                verdict = "faster than" if ratio > 1.02 else ("as fast as" if ratio >= 0.98 else "SLOWER than")
                out.append(f"- {objective.upper()} {size}: `ldjax` ({default['median_step_s'] * 1e3:.1f} ms) is {verdict} "
                           f"`torch` ({torch_default['median_step_s'] * 1e3:.1f} ms): ×{ratio:.2f}; against the fastest "
                           f"torch variant (`{torch_best['runner']}`, {torch_best['median_step_s'] * 1e3:.1f} ms): "
                           f"×{default['tokens_per_s'] / torch_best['tokens_per_s']:.2f}.")
            system = next((c for c in here if c["runner"] == "ldjax-system-malloc"), None)
            if default and system and system.get("minor_faults_per_step") is not None:
                slower = system["median_step_s"] / default["median_step_s"]
                temp = (default["raw"].get("xla_memory") or {}).get("temp_bytes")
                if temp is not None and temp > GLIBC_MMAP_THRESHOLD_MAX:
                    out.append(f"  With glibc's defaults (`ldjax-system-malloc`) XLA's scratch buffer is faulted in "
                               f"afresh every step ({system['minor_faults_per_step']:,.0f} page faults/step against "
                               f"{default['minor_faults_per_step']:,.0f}) and the step takes ×{slower:.2f} as long.")
                else:
                    out.append(f"  XLA's scratch buffer ({_fmt(None if temp is None else temp / 2**20, '.0f')} MiB) is under "
                               f"glibc's largest mmap threshold (32 MiB), where glibc reuses freed memory by itself: "
                               f"`ldjax-system-malloc` has {system['minor_faults_per_step']:,.0f} page faults/step "
                               f"(ldjax {default['minor_faults_per_step']:,.0f}) and takes ×{slower:.2f} as long.")
            single = next((c for c in here if c["runner"] == "ldjax"), None)
            mesh = next((c for c in here if c["runner"] == "ldjax-mesh2"), None)
            if single and mesh:
                out.append(f"  The 2-device mesh runs at ×{mesh['tokens_per_s'] / single['tokens_per_s']:.2f} "
                           f"the single-device throughput, keeping {mesh['cores_busy']:.2f} cores busy "
                           f"(single device {single['cores_busy']:.2f}, torch {torch_cells_busy(here)}).")
    for objective in report["config"]["objectives"]:
        size = max(report["config"]["sizes"], key=lambda s: list(SIZES).index(s))
        here = [c for c in cells if c["size"] == size and c["objective"] == objective]
        ours = max((c for c in here if c["impl"] == "ldjax"), key=lambda c: c["tokens_per_s"], default=None)
        ref = next((c for c in here if c["runner"] == "torch"), None)
        if ours and ref:
            out.append(f"- Where the time goes ({objective.upper()} {size}): best ldjax does "
                       f"{ours['achieved_tflops'] * 1e3:.0f} model GFLOP/s on {ours['cores_busy']:.2f} busy cores "
                       f"({ours['achieved_tflops'] * 1e3 / ours['cores_busy']:.0f} per core), torch "
                       f"{ref['achieved_tflops'] * 1e3:.0f} on {ref['cores_busy']:.2f} "
                       f"({ref['achieved_tflops'] * 1e3 / ref['cores_busy']:.0f} per core).")
    gaps = [c["max_loss_gap_vs_torch"] for c in cells if c["max_loss_gap_vs_torch"] is not None]
    if gaps:
        rel = max(c["max_loss_gap_vs_torch"] / abs(c["raw"]["losses"][0]) for c in cells
                  if c["max_loss_gap_vs_torch"] is not None)
        out.append(f"- Largest loss gap between any runner and torch over all steps: {max(gaps):.1e} "
                   f"(relative {rel:.1e}; float32 round-off: the implementations compute the same step).")
    return out


def torch_cells_busy(cells: list[dict[str, Any]]) -> str:
    """Cores kept busy by torch with its default threads, as text."""
    ref = next((c for c in cells if c["runner"] == "torch"), None)
    return "–" if ref is None else f"{ref['cores_busy']:.2f}"


def _worker(job_file: str) -> None:
    job = json.loads(pathlib.Path(job_file).read_text())
    print(json.dumps(measure_ldjax(job)))


if __name__ == "__main__":
    _config = parse_config(Config)
    if _config.worker:
        _worker(_config.worker)
    else:
        main(_config)
