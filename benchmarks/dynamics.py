"""The cost of the per-step A·K·G decomposition and of probe tracking, against their floors.

Two measurements, each on the ``tiny`` and the ``4m`` model of :mod:`benchmarks.train`
(GPT-NeoX-style :class:`ldjax.models.CausalLM`, float32, CPU):

1. **Decomposition** (SPEC §1.5, implicit route): :func:`ldjax.sequence_dynamics.predict_sgd` of
   one SGD step on an SFT update batch (``update_batch`` × ``update_len`` tokens) observed on
   ``observed`` responses of ``observed_len`` tokens, for every ``chunk_size`` in
   ``chunk_sizes``; against

   - the **floor**: two compiled kernels doing only what the decomposition cannot avoid, for the
     same chunking: one VJP (``jax.grad`` of the training loss: mean over examples of the summed
     response NLL, the training gradient) and, per observed chunk (``jax.lax.map``), one
     ``jax.jvp`` of the observed token log-prob readout (``ldjax.losses.token_logps`` of the
     logits, whose tangent is exactly ``A Δz`` read at the observed tokens) along ``−η ∇L``.
     It returns the same (B_o, T_o) numbers as the decomposition (checked, ``check`` rows);
   - ``floor (logits JVP)``: the same with the JVP of the logits read at the observed token
     only (no ``A``: softmax not applied), the barest possible JVP pass;
   - one **training step** (``ldjax.train.make_train_step``, ``sft_objective``, Adam) on the
     update batch.

   Peak memory: growth of the process's resident high-water mark during one warm call (the
   mark is reset through ``/proc/self/clear_refs`` before each cell), and XLA's compiled
   temporary memory (``memory_analysis``) of the jitted kernels.

2. **Tracking**: :func:`ldjax.train.loop.train` for ``track_steps`` SFT steps on the embedded
   world as ``ldjax sft`` sets it up (batch ``train_batch_size``, sequences padded to
   ``max_length``, AdamW), without a tracker and with :class:`ldjax.tracking.Tracker` at
   ``every = track_every`` (``track_prompts`` probe prompts, all 11 families, the CLI's probe
   batch size) scoring with :class:`ldjax.probes.ProbeScorer` per family (``tracker``), fused
   (``tracker_fused``, the CLI's) and fused with ``subset = track_subset`` (``tracker_subset``:
   a rotating window of m prompts between the full first and last evaluations). Variants run
   interleaved, ``track_repeats`` times. Reported: the run overhead ``median wall(with) / median
   wall(without) − 1`` and the steady-state overhead ``median intermediate evaluation (the
   records' time.track_s) / (every × train step)``; an eval-only scan of the cost of m prompts
   (``track_subset_scan``) from which the largest m within 10 % is read; and the subset
   estimate's error at ``track_estimate_checks`` intermediate steps (an untimed run whose
   ``decompose_fn`` hook keeps the parameters, scored there on every prompt). Compilation is
   done before the timed runs (reported separately).

Run: ``python benchmarks/dynamics.py`` (writes ``benchmarks/results/dynamics.{md,json}``);
``--parts tracking`` re-measures part 2 only and keeps part 1 of the existing ``dynamics.json``
(and vice versa); ``--quick`` is a smoke test of seconds.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from ldjax.config import parse_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import process_stats  # noqa: E402
from train import SIZES, ModelSize, make_sequence_batch  # noqa: E402

MIB = 2**20


@dataclass(frozen=True)
class Config:
    """Cost of the per-step decomposition against its JVP floor and a train step; tracker overhead."""

    out: str = field(default="benchmarks/results", metadata={"help": "directory for dynamics.md and dynamics.json"})
    sizes: tuple[str, ...] = field(default=("tiny", "4m"), metadata={"help": f"model sizes of benchmarks/train.py, of {sorted(SIZES)}"})
    arch: str = field(default="gpt_neox", metadata={"help": "gpt_neox or qwen2"})
    observed: int = field(default=192, metadata={"help": "observed responses M"})
    observed_len: int = field(default=128, metadata={"help": "tokens per observed sequence"})
    update_batch: int = field(default=8, metadata={"help": "SFT update sequences"})
    update_len: int = field(default=128, metadata={"help": "tokens per update sequence"})
    chunk_sizes: tuple[int, ...] = field(default=(32, 192), metadata={"help": "observed sequences per JVP to try"})
    repeats: int = field(default=3, metadata={"help": "interleaved repeats of every decomposition cell (median kept)"})
    train_steps_per_repeat: int = field(default=3, metadata={"help": "train steps timed per repeat"})
    lr: float = field(default=1e-3, metadata={"help": "SGD step size of the decomposed update"})
    parts: tuple[str, ...] = field(default=("decomposition", "tracking"), metadata={"help": "parts to measure; the others are kept from the existing dynamics.json in --out"})
    track: bool = field(default=True, metadata={"help": "run the tracker-overhead part (false = --parts decomposition)"})
    track_steps: int = field(default=60, metadata={"help": "training steps per tracked run"})
    track_every: int = field(default=10, metadata={"help": "tracker interval"})
    track_prompts: int = field(default=32, metadata={"help": "probe prompts"})
    track_batch_size: int = field(default=0, metadata={"help": "probe prompts per pass of the library scorer (0 = train_batch_size, as the CLI)"})
    track_subset: int = field(default=2, metadata={"help": "prompts per intermediate evaluation of the tracker_subset variant (Tracker subset=m); 2 keeps the 4m size's steady overhead within 10 % at every=10"})
    track_subset_scan: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "subset sizes m whose eval-only cost is measured"})
    track_estimate_checks: int = field(default=2, metadata={"help": "intermediate steps at which the subset estimate is checked against every prompt"})
    track_estimate_family: str = field(default="chosen", metadata={"help": "probe family whose estimate is reported"})
    track_repeats: int = field(default=3, metadata={"help": "interleaved repeats of every tracking variant"})
    train_batch_size: int = field(default=8, metadata={"help": "SFT batch of the tracked runs"})
    max_length: int = field(default=64, metadata={"help": "sequence length of the tracked runs (the CLI default)"})
    quick: bool = field(default=False, metadata={"help": "smoke test: tiny only, small shapes, 2 repeats"})
    seed: int = field(default=0, metadata={"help": "seed of weights and batches"})
    render: str = field(default="", metadata={"help": "only re-render dynamics.md next to this dynamics.json (must-show recomputed)"})


QUICK = dict(sizes=("tiny",), observed=8, observed_len=16, update_batch=2, update_len=16, chunk_sizes=(8,),
             repeats=2, train_steps_per_repeat=1, track_steps=4, track_every=2, track_prompts=4, track_repeats=2,
             max_length=48, track_subset=2, track_subset_scan=(1,), track_estimate_checks=1)


def resolve(config: Config) -> Config:
    return dataclasses.replace(config, **QUICK) if config.quick else config


# ---------------------------------------------------------------------------------------------
# Memory helpers


def reset_peak_rss() -> bool:
    """Resets the process's resident high-water mark (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """VmHWM of this process (falls back to ``getrusage``'s lifetime peak)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_stats.peak_rss_bytes()


def peak_growth(fn: Callable[[], Any]) -> float:
    """MiB the resident high-water mark rose above the current RSS during ``fn()``."""
    reset_peak_rss()
    start = process_stats.rss_bytes()
    fn()
    return max(0, hwm_bytes() - start) / MIB


def xla_memory(lowered) -> dict[str, float] | None:
    try:
        m = lowered.compile().memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    if m is None:
        return None
    return {"temp_mib": m.temp_size_in_bytes / MIB, "argument_mib": m.argument_size_in_bytes / MIB,
            "output_mib": m.output_size_in_bytes / MIB}


def _block(x):
    import jax
    return jax.block_until_ready(x)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    _block(fn())
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Models and batches


def build_model(size: ModelSize, arch: str, seed: int, vocab_size: int | None = None):
    import jax.numpy as jnp
    from flax import nnx

    from ldjax.models.transformer import CausalLM

    if vocab_size is not None and vocab_size != size.vocab_size:
        size = dataclasses.replace(size, vocab_size=vocab_size)
    return CausalLM(size.transformer_config(arch), rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


def num_params(tree) -> int:
    import jax
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The floor


def floor_direction(apply_fn, params, update, lr):
    """The floor's VJP: ``−lr ∇L`` of the training loss (mean over examples of the summed NLL)."""
    import jax.numpy as jnp

    from ldjax.losses import sft_loss

    def loss(p):
        logits = apply_fn(p, {"input_ids": update["input_ids"], "attention_mask": update["attention_mask"]})
        return jnp.mean(sft_loss(logits, update["input_ids"], update["loss_mask"]))

    return jax.tree.map(lambda g: -lr * g, jax.grad(loss)(params))


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk", "readout"))
def floor_jvp(apply_fn, params, direction, observed, chunk: int, readout: str = "logps"):
    """The floor's JVPs: one ``jax.jvp`` per observed chunk (``lax.map``) along ``direction``.

    ``readout="logps"``: the JVP of ``token_logps(logits)``, i.e. the first-order change of the
    observed token log-probs (what the decomposition returns, (B_o, T_o)); ``"logits"``: the JVP
    of the logits read at the observed token only (no softmax Jacobian).
    """
    import jax.numpy as jnp

    from ldjax.losses import token_logps
    from ldjax.sequence_dynamics import _chunked  # the library's own chunking, so the floor pads alike

    chunks, n = _chunked(observed, chunk)

    def body(c):
        inputs = {"input_ids": c["input_ids"], "attention_mask": c["attention_mask"]}
        if readout == "logps":
            f = lambda p: token_logps(apply_fn(p, inputs), c["input_ids"], c["loss_mask"])  # noqa: E731
            return jax.jvp(f, (params,), (direction,))[1]
        f = lambda p: apply_fn(p, inputs)  # noqa: E731
        tangent = jax.jvp(f, (params,), (direction,))[1]
        nxt = jnp.concatenate([c["input_ids"][:, 1:], jnp.zeros_like(c["input_ids"][:, :1])], axis=1)
        return jnp.take_along_axis(tangent, nxt[..., None], axis=-1)[..., 0]

    out = jax.lax.map(body, chunks)
    return out.reshape((-1,) + out.shape[2:])[:n]


def floor_fn(apply_fn, params, update, observed, lr, chunk: int, readout: str = "logps"):
    """The floor: one VJP (the training gradient) + one JVP per observed chunk along ``−lr ∇L``,
    as two compiled kernels dispatched back to back (no input checks, no Python between them)."""
    return floor_jvp(apply_fn, params, floor_direction(apply_fn, params, update, lr), observed, chunk=chunk,
                     readout=readout)


def decompose(apply_fn, params, update, observed, lr, chunk):
    """What is timed: the library's SGD decomposition (tokens of the total)."""
    from ldjax import sequence_dynamics as sd
    return sd.predict_sgd(apply_fn, params, update, observed, sd.SFTObjective(), lr=lr, chunk_size=chunk).total.tokens


# ---------------------------------------------------------------------------------------------
# Part 1: decomposition


def bench_decomposition(size_name: str, config: Config) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ldjax import sequence_dynamics as sd
    from ldjax.train import objectives
    from ldjax.train.config import OptimizerConfig
    from ldjax.train.optim import build_optimizer
    from ldjax.train.steps import init_train_state, make_train_step, split_model

    size = SIZES[size_name]
    model = build_model(size, config.arch, config.seed)
    apply_fn, params = sd.lm_apply_fn(model)
    rng = np.random.default_rng(config.seed)
    update = {k: jnp.asarray(v) for k, v in
              make_sequence_batch(rng, size.vocab_size, config.update_batch, config.update_len, pad=True).items()}
    observed = {k: jnp.asarray(v) for k, v in
                make_sequence_batch(rng, size.vocab_size, config.observed, config.observed_len, pad=True).items()}
    lr = config.lr

    # One training step on the update batch (as benchmarks/train.py's ldjax runner).
    graphdef, tparams, rest = split_model(model)
    optimizer = build_optimizer(OptimizerConfig(optimizer="adam", learning_rate=1e-4))
    step = make_train_step(graphdef, objectives.sft_objective(), optimizer, rest=rest)
    state = init_train_state(jax.tree.map(jnp.copy, tparams), optimizer, seed=0)
    compile_s = {}
    t = time.perf_counter()
    state, _ = _block(step(state, update))
    compile_s["train_step"] = time.perf_counter() - t

    def train_once():
        nonlocal state
        state, metrics = step(state, update)
        return metrics["loss"]

    chunks = sorted({min(c, config.observed) for c in config.chunk_sizes})
    variants: dict[str, Callable[[int], Callable[[], Any]]] = {
        "decomposition": lambda c: lambda: decompose(apply_fn, params, update, observed, lr, c),
        "floor": lambda c: lambda: floor_fn(apply_fn, params, update, observed, lr, chunk=c, readout="logps"),
    }
    if not config.quick:  # the quick smoke run compiles as little as it can
        variants["floor_logits"] = lambda c: lambda: floor_fn(apply_fn, params, update, observed, lr, chunk=c,
                                                              readout="logits")
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    checks = {}
    for c in chunks:
        outs = {}
        for name, make in variants.items():
            t = time.perf_counter()
            outs[name] = np.asarray(_block(make(c)()))
            compile_s[f"{name}@{c}"] = time.perf_counter() - t
            cells[(name, c)] = {"times": [], "peak_rss_growth_mib": peak_growth(make(c))}
        ref = outs["floor"]
        diff = np.abs(outs["decomposition"] - ref)
        checks[c] = {"max_abs_diff": float(diff.max()), "max_abs": float(np.abs(ref).max()),
                     "rel": float(diff.max() / max(np.abs(ref).max(), 1e-30))}
    train_peak = peak_growth(train_once)

    # Interleaved repeats: every cell once per round, in a rotated order.
    order = [(name, c) for c in chunks for name in variants]
    train_times = []
    load = []
    for r in range(config.repeats):
        load.append(os.getloadavg()[0])
        rotated = order[r % len(order):] + order[:r % len(order)]
        for name, c in rotated:
            cells[(name, c)]["times"].append(_timed(variants[name](c)))
        for _ in range(config.train_steps_per_repeat):
            train_times.append(_timed(train_once))
    train_s = statistics.median(train_times)

    # XLA's compiled memory of the kernels (static analysis; compiled again only to read it).
    grads = sd.training_gradients(apply_fn, params, update, sd.SFTObjective())
    obs_arrays = {k: observed[k] for k in sd.SEQUENCE_KEYS}
    sides = sd._sides(update, sd.SFTObjective())
    coefs = sd.update_coefficients(apply_fn, params, update, sd.SFTObjective())
    xla = {} if config.quick else {"training_gradients": xla_memory(sd._side_gradients.lower(apply_fn=apply_fn, params=params, sides=sides,
                                                                     coefficients=coefs)),
           "train_step": xla_memory(jax.jit(step).lower(state, update))}
    for c in ([] if config.quick else chunks):
        xla[f"decomposition_jvp@{c}"] = xla_memory(sd._changes_along.lower(
            apply_fn=apply_fn, params=params, observed=obs_arrays, directions=grads, scale=-lr, chunk_size=c))
        xla[f"floor@{c}"] = xla_memory(floor_jvp.lower(apply_fn, params, grads[0], observed, chunk=c, readout="logps"))

    rows = []
    for c in chunks:
        med = {name: statistics.median(cells[(name, c)]["times"]) for name in variants}
        logits_s = med.get("floor_logits")
        rows.append({
            "chunk": c, "decomposition_s": med["decomposition"], "floor_s": med["floor"],
            "floor_logits_s": logits_s, "ratio_to_floor": med["decomposition"] / med["floor"],
            "ratio_to_floor_logits": None if logits_s is None else med["decomposition"] / logits_s,
            "ratio_to_train_step": med["decomposition"] / train_s,
            "peak_rss_growth_mib": {name: cells[(name, c)]["peak_rss_growth_mib"] for name in variants},
            "times_s": {name: cells[(name, c)]["times"] for name in variants},
            "xla_temp_mib": {"decomposition_jvp": (xla.get(f"decomposition_jvp@{c}") or {}).get("temp_mib"),
                             "floor": (xla.get(f"floor@{c}") or {}).get("temp_mib")},
            "check": checks[c],
        })
    best = min(rows, key=lambda r: r["decomposition_s"])
    best_floor = min(r["floor_s"] for r in rows)
    return {
        "size": size_name, "num_params": num_params(params), "vocab_size": size.vocab_size,
        "model": dataclasses.asdict(size), "observed": config.observed, "observed_len": config.observed_len,
        "update_batch": config.update_batch, "update_len": config.update_len,
        "train_step_s": train_s, "train_step_times_s": train_times, "train_step_peak_rss_growth_mib": train_peak,
        "rows": rows, "best_chunk": best["chunk"], "best_ratio_to_floor": best["ratio_to_floor"],
        "best_ratio_to_best_floor": best["decomposition_s"] / best_floor,
        "best_ratio_to_train_step": best["ratio_to_train_step"],
        "compile_s": compile_s, "xla_memory": xla, "load_1min_per_round": load,
    }


# ---------------------------------------------------------------------------------------------
# Part 2: tracking


def tracking_setup(size_name: str, config: Config) -> dict[str, Any]:
    """The ``ldjax sft`` job of the CLI (embedded world) without checkpoints: arrays, probes, step."""
    from ldjax import cli, probes
    from ldjax.data.preference import SFTExample
    from ldjax.data.tokenize import tokenize_sft
    from ldjax.train import objectives, optim, sharding, steps
    from ldjax.train.config import SFTConfig

    world_kw = dict(world_train=40, world_test=10, world_pretrain=40) if config.quick else {}
    sft = SFTConfig(num_steps=config.track_steps, batch_size=config.train_batch_size, max_length=config.max_length,
                    track_every=config.track_every, track_prompts=config.track_prompts,
                    track_batch_size=config.track_batch_size, progress=False, seed=config.seed, **world_kw)
    world = cli._world(sft)
    tokenizer = world.tokenizer
    size = SIZES[size_name]
    vocab = max(size.vocab_size, tokenizer.get_vocab_size())
    model = build_model(size, config.arch, config.seed, vocab_size=vocab)
    kw = cli._token_kwargs(sft, tokenizer, vocab)
    arrays = tokenize_sft([SFTExample(e.prompt, e.chosen) for e in world.train], tokenizer, **kw)
    probe_set = probes.tokenize_probes(cli.probe_texts(sft), tokenizer, **kw)
    mesh = sharding.data_mesh(num_devices=sft.num_devices)
    graphdef, params, rest = steps.split_model(model)
    optimizer = optim.build_optimizer(sft, sft.num_steps)
    step = steps.make_train_step(graphdef, objectives.sft_objective(), optimizer, rest=rest,
                                 learning_rate=optim.learning_rate_schedule(sft, sft.num_steps), mesh=mesh)
    return {"sft": sft, "model": model, "params": params, "arrays": arrays, "probe_set": probe_set,
            "step": step, "optimizer": optimizer, "mesh": mesh, "vocab": vocab, "size": size}


TRACK_VARIANTS = ("none", "tracker", "tracker_fused", "tracker_subset")


def _window(step: int, every: int, m: int, num_prompts: int) -> np.ndarray:
    """The prompts a ``subset=m`` tracker scores at an intermediate ``step`` (``Tracker.prompts_at``)."""
    return (np.arange(m) + (step // every - 1) * m) % num_prompts


def bench_tracking(size_name: str, config: Config) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ldjax import probes, tracking
    from ldjax.data.tokenize import batches
    from ldjax.train import sharding, steps
    from ldjax.train.config import LoopConfig
    from ldjax.train.loop import train

    s = tracking_setup(size_name, config)
    sft = s["sft"]
    probe_set = s["probe_set"]
    num_prompts = probe_set.num_prompts
    m = config.track_subset
    if not 0 < m < num_prompts:
        raise ValueError(f"--track-subset must be in [1, {num_prompts}) (the probe prompts), got {m}")
    host_params = jax.device_get(s["params"])
    probe_batch = sft.track_batch_size or sft.batch_size
    # As the CLI: the probe batch size is --track-batch-size or the training batch size.
    scorers = {"tracker": probes.ProbeScorer(s["model"], batch_size=probe_batch),
               "tracker_fused": probes.ProbeScorer(s["model"], batch_size=probe_batch, fused=True),
               "tracker_subset": probes.ProbeScorer(s["model"], batch_size=probe_batch, fused=True)}
    subset_of = {"tracker": 0, "tracker_fused": 0, "tracker_subset": m}

    def fresh_state():
        params = jax.tree.map(jnp.asarray, host_params)
        return sharding.replicate(steps.init_train_state(params, s["optimizer"], sft.seed), s["mesh"])

    def epoch_batches(epoch):
        return batches(s["arrays"], sft.batch_size, seed=sft.seed, epoch=epoch)

    compile_s = {}
    t = time.perf_counter()
    warm, _ = s["step"](fresh_state(), next(iter(epoch_batches(0))))
    _block(warm)
    compile_s["train_step"] = time.perf_counter() - t
    # Warm the scorers with parameters of the kind the loop hands them (device arrays placed as
    # the train state is), for every shape they will see (the subset window is another shape),
    # so that the timed runs never compile. Scorers of one model structure share compiled passes
    # (ldjax.probes._score_pass): a later scorer's compile_s counts only the shapes no earlier one met.
    live_params = warm.params
    window = _window(sft.track_every, sft.track_every, m, num_prompts)
    score_check = {}
    reference = None
    for name, scorer in scorers.items():
        t = time.perf_counter()
        scores = scorer(live_params, probe_set)
        scorer(fresh_state().params, probe_set)  # step 0 sees the initial state's placement
        if subset_of[name]:
            sub = scorer(live_params, probe_set, prompts=window)
        compile_s[name] = time.perf_counter() - t
        if reference is None:
            reference = scores
            continue
        fields = ("logps", "argmax_logps", "a_norm", "off_argmax", "residual_norm")
        diff = max(float(np.max(np.abs(np.asarray(getattr(scores[f], k)) - np.asarray(getattr(reference[f], k)))))
                   for f in reference for k in fields)
        if subset_of[name]:  # the window's rows equal the all-prompt scores' rows
            diff = max(diff, max(float(np.max(np.abs(np.asarray(getattr(sub[f], k))
                                                      - np.asarray(getattr(reference[f], k))[window])))
                                 for f in reference for k in fields))
        score_check[name] = diff
    eval_s = {name: statistics.median(_timed(lambda sc=sc: sc(live_params, probe_set)) for _ in range(3))
              for name, sc in scorers.items()}
    # What one evaluation of m prompts costs (eval only, fused, the CLI's probe batch size), for
    # every m of the scan (interleaved rounds, median): the measured curve from which the largest
    # m within 10 % is read.
    scan_scorer = scorers["tracker_subset"]
    scan = []
    for k in sorted({k for k in (*config.track_subset_scan, m) if 0 < k < num_prompts}):
        t = time.perf_counter()
        scan_scorer(live_params, probe_set, prompts=np.arange(k))
        scan.append({"m": k, "compile_s": time.perf_counter() - t, "times_s": []})
    for r in range(5):
        for e in scan[r % len(scan):] + scan[:r % len(scan)]:
            e["times_s"].append(_timed(lambda k=e["m"]: scan_scorer(live_params, probe_set, prompts=np.arange(k))))
    for e in scan:
        e["eval_s"] = statistics.median(e["times_s"])

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in TRACK_VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ldjax-bench-dynamics-") as tmp:
        def run(v: str, r: Any, decompose_fn=None):
            out = pathlib.Path(tmp) / f"{v}-{r}"
            loop = LoopConfig(num_steps=sft.num_steps, batch_size=sft.batch_size, seed=sft.seed, out=str(out),
                              log_every=sft.log_every, progress=False)
            tracker = None
            if v != "none":
                tracker = tracking.Tracker(probe_set, s["model"], every=sft.track_every,
                                           path=out / tracking.TRACKING_FILE, scorer=scorers[v], progress=False,
                                           subset=subset_of[v], decompose_fn=decompose_fn)
            state = fresh_state()
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = train(s["step"], state, epoch_batches, loop, tracker=tracker)
            _block(result.state.params)
            wall = time.perf_counter() - start
            records = tracking.read_tracking(out / tracking.TRACKING_FILE) if tracker else []
            return {"wall_s": wall, "train_s": result.train_seconds,
                    "track_s": tracker.track_seconds if tracker else 0.0, "evals": len(records), "load_1min": load,
                    "eval_times": [{"step": rec["step"], "num_prompts": rec["num_prompts"],
                                    "track_s": rec["time"]["track_s"]} for rec in records]}, records

        for r in range(config.track_repeats):
            k = r % len(TRACK_VARIANTS)
            for v in TRACK_VARIANTS[k:] + TRACK_VARIANTS[:k]:
                runs[v].append(run(v, r)[0])

        # The estimate's accuracy (untimed): a subset run whose decompose_fn hook keeps the
        # parameters after every tracked step ≥ 1; at a few intermediate steps the full probe set
        # is scored at those parameters and compared with the logged estimate.
        kept: list[Any] = []

        def keep(before, after, batch):
            kept.append(jax.device_get(after))
            return {}

        _, records = run("tracker_subset", "accuracy", decompose_fn=keep)
    accuracy = estimate_accuracy(records, kept, scorers["tracker_fused"], probe_set, config)

    base_train = statistics.median(r["train_s"] for r in runs["none"])
    step_s = base_train / sft.num_steps
    base = statistics.median(r["wall_s"] for r in runs["none"])
    budget = 0.1 * sft.track_every * step_s  # one evaluation per interval at 10 % of its steps' time
    summary = {}
    for v in TRACK_VARIANTS:
        wall = statistics.median(r["wall_s"] for r in runs[v])
        evals = runs[v][0]["evals"]
        row: dict[str, Any] = {"wall_s": wall, "evals": evals, "subset": subset_of.get(v, 0),
                               "overhead": wall / base - 1,
                               "paired_overheads": [w["wall_s"] / n["wall_s"] - 1 for w, n in zip(runs[v], runs["none"])]}
        if evals:
            # First (step 0) and last evaluations score every prompt; the ones in between are
            # what a long run is made of (the steady state).
            middle = [e["track_s"] for run_ in runs[v] for e in run_["eval_times"][1:-1]]
            ends = [e["track_s"] for run_ in runs[v] for e in (run_["eval_times"][0], run_["eval_times"][-1])]
            steady = statistics.median(middle) if middle else None
            row.update({
                "per_eval_s": statistics.median(r["track_s"] / r["evals"] for r in runs[v]),
                "prompts_per_eval": runs[v][0]["eval_times"][1]["num_prompts"] if evals > 2 else num_prompts,
                "steady_eval_s": steady, "full_eval_s": statistics.median(ends),
                "steady_overhead": None if steady is None else steady / (sft.track_every * step_s),
                "steady_eval_in_train_steps": None if steady is None else steady / step_s,
                "every_for_10pct": None if steady is None else steady / (0.1 * step_s)})
        summary[v] = row
    fused_steady = summary["tracker_fused"]["steady_eval_s"] or summary["tracker_fused"]["per_eval_s"]
    per_prompt = fused_steady / num_prompts
    within = [e["m"] for e in scan if e["eval_s"] <= budget]
    choice = {
        "every": sft.track_every, "train_step_s": step_s, "budget_s": budget,
        "per_prompt_s": per_prompt,  # the all-prompt fused evaluation's cost per prompt
        # largest m at 10 %, if an evaluation cost m × the all-prompt evaluation's cost per prompt
        "m_for_10pct_proportional": int(budget // per_prompt),
        # largest m of the scan whose measured (eval-only) evaluation fits in 10 %
        "m_for_10pct_scan": max(within) if within else 0, "scan": scan, "m": m,
        "m_steady_overhead": summary["tracker_subset"]["steady_overhead"],
    }
    return {"size": size_name, "num_params": num_params(s["params"]), "vocab_size": s["vocab"],
            "train_batch_size": sft.batch_size, "max_length": sft.max_length, "steps": sft.num_steps,
            "every": sft.track_every, "num_prompts": num_prompts, "subset": m,
            "families": list(probe_set.families), "probe_length": probe_set.length,
            "trimmed_length": scorers["tracker_fused"].trimmed_length(probe_set),
            "probe_batch_size": probe_batch, "train_step_s": step_s, "compile_s": compile_s,
            "eval_only_s": eval_s, "score_max_abs_diff_vs_library": score_check, "variants": summary,
            "subset_choice": choice, "estimate_accuracy": accuracy, "runs": runs}


def estimate_accuracy(records, kept_params, scorer, probe_set, config: Config) -> dict[str, Any]:
    """|estimate − all-prompt mean| of a subset tracker at a few intermediate steps.

    ``records``: the subset run's tracking log; ``kept_params``: the parameters after every
    tracked step ≥ 1, in order (from its ``decompose_fn`` hook). Scores every prompt and family
    at ``config.track_estimate_checks`` evenly spaced intermediate steps; the error is set
    against the spread over prompts of the scores (``std``) and of their change since step 0
    (``std_change``, what the control variate's error scales with), and against the plain mean
    of the window's prompts (``naive``).
    """
    family = config.track_estimate_family
    first = records[0]
    tracked = [r for r in records if r["step"] >= 1]
    assert len(tracked) == len(kept_params), (len(tracked), len(kept_params))
    middle = [(r, p) for r, p in zip(tracked, kept_params) if r["num_prompts"] < probe_set.num_prompts]
    if not middle or config.track_estimate_checks < 1:
        return {"family": family, "rows": [], "max_rel_err_all_families": None}
    picks = sorted({int(i) for i in np.linspace(0, len(middle) - 1, config.track_estimate_checks).round()})
    rows, worst = [], 0.0
    for i in picks:
        record, params = middle[i]
        full = scorer(params, probe_set)
        per_family = {}
        for f, sc in full.items():
            x = np.asarray(sc.logps, np.float64)
            x0 = np.asarray(first["baseline"]["logps"][f], np.float64)
            err = abs(record["estimate"]["logps"][f] - x.mean())
            rel = err / x.std() if x.std() > 0 else 0.0
            worst = max(worst, rel)
            per_family[f] = {"full_mean": float(x.mean()), "estimate": record["estimate"]["logps"][f],
                             "abs_err": float(err), "std": float(x.std()), "std_change": float((x - x0).std()),
                             "rel_err": float(rel), "naive": record["logps"][f]["mean"],
                             "naive_abs_err": float(abs(record["logps"][f]["mean"] - x.mean())),
                             "change": float(x.mean() - x0.mean())}
        rows.append({"step": record["step"], "prompts": record["prompts"], **per_family[family],
                     "max_rel_err_all_families": max(v["rel_err"] for v in per_family.values())})
    return {"family": family, "rows": rows, "max_rel_err_all_families": worst}


# ---------------------------------------------------------------------------------------------
# Driver and report

PARTS = ("decomposition", "tracking")


def machine_info() -> dict[str, Any]:
    import jax
    import flax
    import optax
    return {"cpu": process_stats.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_start": os.getloadavg(),
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                         "numpy": np.__version__},
            "peak_rss_reset": reset_peak_rss()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def part_runs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{part: {"date", "machine", "config"}}``: when (and with what) each part of a report was
    measured; a report written before parts were merged measured both in one run."""
    runs = dict(report.get("runs") or {})
    for part in PARTS:
        runs.setdefault(part, {"date": report["date"], "machine": report["machine"], "config": report["config"]})
    return runs


def merge_reports(old: dict[str, Any] | None, new: dict[str, Any], ran: tuple[str, ...]) -> dict[str, Any]:
    """``new`` with the parts it did not run (not in ``ran``) taken from ``old`` (with when they
    were measured), and the must-show recomputed over both."""
    merged = dict(new)
    runs = {p: r for p, r in part_runs(new).items() if p in ran}
    if old is not None:
        old_runs = part_runs(old)
        for part in PARTS:
            if part not in ran and old.get(part):
                merged[part] = old[part]
                runs[part] = old_runs[part]
    merged["runs"] = runs
    merged["must_show"] = must_show(merged.get("decomposition") or [], merged.get("tracking") or [])
    return merged


def main(config: Config) -> dict[str, Any]:
    config = resolve(config)
    unknown = [s for s in config.sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"--sizes: unknown {unknown}; known are {sorted(SIZES)}")
    bad = [p for p in config.parts if p not in PARTS]
    if bad:
        raise ValueError(f"--parts: unknown {bad}; known are {list(PARTS)}")
    ran = tuple(p for p in PARTS if p in config.parts and (p != "tracking" or config.track))
    out_dir = pathlib.Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "dynamics.json"
    old = json.loads(json_path.read_text()) if json_path.exists() and set(ran) != set(PARTS) else None
    info = machine_info()
    started = time.time()
    decomposition, tracking_results = [], []
    if "decomposition" in ran:
        for size in config.sizes:
            print(f"[dynamics] decomposition {size} ...", file=sys.stderr, flush=True)
            decomposition.append(bench_decomposition(size, config))
    if "tracking" in ran:
        for size in config.sizes:
            print(f"[dynamics] tracking {size} ...", file=sys.stderr, flush=True)
            tracking_results.append(bench_tracking(size, config))
    info["load_average_end"] = os.getloadavg()
    info["wall_seconds"] = time.time() - started
    report = {"config": dataclasses.asdict(config), "machine": info, "decomposition": decomposition,
              "tracking": tracking_results, "date": _now()}
    report = merge_reports(old, report, ran)
    json_path.write_text(json.dumps(report, indent=2))
    (out_dir / "dynamics.md").write_text(render_markdown(report))
    print(f"wrote {out_dir / 'dynamics.md'} and {json_path}"
          + (f" (kept {', '.join(p for p in PARTS if p not in ran)} of {json_path})" if old else ""), file=sys.stderr)
    return report


def _tracking_reason(t: dict[str, Any], v: str) -> str:
    s = t["variants"][v]
    if v == "tracker_subset":
        why = (f"{s['prompts_per_eval']} of {t['num_prompts']} prompts per intermediate evaluation "
               f"({_f(s['steady_eval_in_train_steps'], '.2f')} train steps)")
        c = t.get("subset_choice") or {}
        if s["steady_overhead"] is not None and s["steady_overhead"] > 0.1 and c.get("scan"):
            one = c["scan"][0]
            why += (f"; the budget 0.1 × {t['every']} × {t['train_step_s'] * 1e3:.1f} ms = {c['budget_s'] * 1e3:.1f} ms "
                    f"fits m ≤ {c['m_for_10pct_scan']} (eval-only: m = {one['m']} costs {one['eval_s'] * 1e3:.1f} ms)")
        return why
    return (f"compute: every evaluation forwards {len(t['families'])} × {t['num_prompts']} probe sequences "
            f"= {_f(s['steady_eval_in_train_steps'], '.1f')} train steps of {t['train_batch_size']}")


def must_show(decomposition, tracking_results) -> dict[str, Any]:
    out = {}
    for d in decomposition:
        r = d["best_ratio_to_floor"]
        out[f"decomposition_{d['size']}_ratio_to_floor"] = {
            "value": r, "limit": 1.5, "met": r <= 1.5,
            "note": "" if r <= 1.5 else "fixed per-call cost of predict_sgd at millisecond kernels (Notes)"}
    for t in tracking_results:
        for v in TRACK_VARIANTS[1:]:
            o = t["variants"][v]["steady_overhead"]
            out[f"tracking_{t['size']}_{v}_steady_overhead"] = {
                "value": o, "limit": 0.10, "met": o is not None and o <= 0.10, "note": _tracking_reason(t, v),
                "run_overhead": t["variants"][v]["overhead"]}
    return out


def _f(x, spec=".1f", missing="–"):
    return missing if x is None else format(x, spec)


def _pct(x, spec="+.1f"):
    return "–" if x is None else f"{100 * x:{spec}} %"


def _run_line(label: str, run: dict[str, Any], versions: dict[str, str]) -> str:
    m = run["machine"]
    extra = "" if m["versions"] == versions else "; versions " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items()))
    return (f"- {label} measured {run['date']}: load average (1/5/15 min) at start "
            f"{tuple(round(x, 2) for x in m['load_average_start'])}, at end "
            f"{tuple(round(x, 2) for x in m['load_average_end'])}; wall time {m['wall_seconds']:.0f} s{extra}")


def render_markdown(report: dict[str, Any]) -> str:
    info, cfg = report["machine"], report["config"]
    runs = part_runs(report)
    lines = [
        "# Decomposition and tracking cost",
        "",
        f"Generated by `benchmarks/dynamics.py` on {report['date']}{' (QUICK smoke run)' if cfg['quick'] else ''}. "
        f"GPT-NeoX-style `CausalLM` (`--arch {cfg['arch']}`), float32, CPU, sizes of `benchmarks/train.py`.",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())),
    ]
    labels = {"decomposition": "part 1 (decomposition)", "tracking": "part 2 (tracking)"}
    for part in PARTS:
        if report.get(part):
            lines.append(_run_line(labels[part], runs[part], info["versions"]))
    lines += [
        "- other processes shared the cores, so every cell is the median of interleaved repeats (per-round loads "
        "in dynamics.json); `--parts tracking` re-measures part 2 alone and keeps part 1 of the existing "
        "dynamics.json",
        "",
        "## Must-show",
        "",
        "| claim | value | limit | met | why |",
        "|---|---:|---:|:---:|---|",
    ]
    for k, v in report["must_show"].items():
        val = f"{v['value']:.2f}×" if "ratio" in k else _pct(v["value"])
        lim = f"{v['limit']:.2f}×" if "ratio" in k else f"{100 * v['limit']:.0f} %"
        lines.append(f"| {k} | {val} | {lim} | {'yes' if v['met'] else 'NO'} | {v.get('note', '')} |")
    if report.get("decomposition"):
        lines += render_decomposition(report["decomposition"], runs["decomposition"]["config"])
    if report.get("tracking"):
        lines += render_tracking(report["tracking"], runs["tracking"]["config"])
    lines += ["## Observations (computed from the tables)", ""] + observations(report) + [""]
    lines += ["## Notes", "",
              "- Peak RSS growth of a warm call is 0 MiB in every cell: `import ldjax` makes glibc keep freed "
              "memory (`ldjax.host_memory`), so a warm call reuses the buffers of the warm-up call; XLA temp is the "
              "memory figure to read (the chunk bounds it: the JVP kernel's temp grows with the chunk).",
              "- Tracking cost is compute, not overhead: one all-prompt evaluation forwards F × P probe sequences "
              "(11 × 32 = 352 of up to `max_length` tokens, ≈ 2N FLOPs/token) while a train step processes B = 8 "
              "sequences (≈ 6N FLOPs/token), so one evaluation ≈ 352·2 / (8·6) ≈ 15 train steps at equal length; "
              "at every = 10 that is ≈ +150 %, whatever the implementation. Fusing the families into one pass and "
              "trimming padding (`tracker_fused`) removes the dispatches and part of the tokens, not the work; "
              "only scoring fewer prompts per evaluation (`tracker_subset`) cuts it, by P / m.",
              "- `tracker_subset` keeps the start and end exact (both evaluations score every prompt), so a short "
              "run pays for two full evaluations (the run overhead); the steady overhead is what a long run "
              "converges to. Its logged `estimate` is the control-variate mean `mean_P(x₀) + mean_m(x_t − x₀)`: "
              "the prompt-to-prompt spread of the levels (`std`) cancels and its error scales with the spread of "
              "the changes since step 0 (`std Δ`) over √m; the plain window mean (`naive`) carries the levels' "
              "spread.",
              "- At `tiny` size every kernel takes milliseconds and the fixed per-call cost of `predict_sgd` "
              "(input checks: `jax.eval_shape` of the model on the observed and the update batch, the "
              "coefficient kernel, three dispatches) is a visible share; at `4m` it is lost in the JVPs.",
              ""]
    return "\n".join(lines)


def render_decomposition(decomposition, cfg) -> list[str]:
    lines = [
        "",
        "## 1. Decomposition of one SFT step on M observed responses",
        "",
        f"Update batch {cfg['update_batch']} × {cfg['update_len']} tokens (SFT, mean over examples of the summed "
        f"response NLL), observed M = {cfg['observed']} responses × {cfg['observed_len']} tokens (random tokens, "
        f"right-padded rows), one SGD step of η = {cfg['lr']}. Median of {cfg['repeats']} interleaved repeats.",
        "",
        "- `decomposition`: `ldjax.sequence_dynamics.predict_sgd(..., chunk_size=c)` as a user calls it (input "
        "checks, residual coefficients, the training-gradient VJP kernel, the chunked JVP kernel with `A` "
        "applied and read at the observed tokens).",
        "- `floor`: only the unavoidable passes, as two compiled kernels dispatched back to back: `jax.grad` of "
        "the training loss (one VJP over the update batch) and, per chunk of c observed sequences (`lax.map`), one "
        "`jax.jvp` of the observed token log-prob readout (`token_logps ∘ logits`) along `−η∇L`. Its output equals the "
        "decomposition's (`check`: max |Δ| relative to max |value|).",
        "- `floor (logits)`: the same with the JVP of the logits read at the observed token (no softmax "
        "Jacobian `A`): the barest JVP pass.",
        "- `train step`: one compiled `make_train_step` step (SFT, Adam) on the update batch.",
        "- peak RSS: growth of the process high-water mark during one warm call (mark reset by "
        "`/proc/self/clear_refs`); XLA temp: `memory_analysis()` of the compiled JVP kernel "
        "(decomposition's `_changes_along`; the floor's `floor_jvp`).",
        "",
    ]
    for d in decomposition:
        m = d["model"]
        lines += [f"### `{d['size']}`: {d['num_params']:,} parameters (V {m['vocab_size']}, d {m['hidden_size']}, "
                  f"{m['num_layers']} layers, {m['num_heads']} heads, MLP {m['intermediate_size']})", "",
                  f"One train step: {d['train_step_s'] * 1e3:.1f} ms (peak RSS growth "
                  f"{d['train_step_peak_rss_growth_mib']:.0f} MiB, XLA temp "
                  f"{_f((d['xla_memory'].get('train_step') or {}).get('temp_mib'))} MiB); training-gradient kernel "
                  f"XLA temp {_f((d['xla_memory'].get('training_gradients') or {}).get('temp_mib'))} MiB.", "",
                  "| chunk | decomposition ms | floor ms | floor (logits) ms | × floor | × floor (logits) | × train step "
                  "| peak RSS +MiB dec / floor | XLA temp MiB dec / floor | check |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            p, x = r["peak_rss_growth_mib"], r["xla_temp_mib"]
            mark = " **best**" if r["chunk"] == d["best_chunk"] else ""
            lines.append(f"| {r['chunk']}{mark} | {r['decomposition_s'] * 1e3:.1f} | {r['floor_s'] * 1e3:.1f} "
                         f"| {_f(r['floor_logits_s'] and r['floor_logits_s'] * 1e3)} | {r['ratio_to_floor']:.2f} "
                         f"| {_f(r['ratio_to_floor_logits'], '.2f')} "
                         f"| {r['ratio_to_train_step']:.1f} | {p['decomposition']:.0f} / {p['floor']:.0f} "
                         f"| {_f(x['decomposition_jvp'])} / {_f(x['floor'])} | {r['check']['rel']:.1e} |")
        lines += ["", f"Best chunk {d['best_chunk']}: decomposition / floor at that chunk "
                      f"**{d['best_ratio_to_floor']:.2f}×**, / the fastest floor over all chunks "
                      f"{d['best_ratio_to_best_floor']:.2f}×, / one train step {d['best_ratio_to_train_step']:.1f}×.", ""]
    return lines


def render_tracking(tracking_results, cfg) -> list[str]:
    t0 = tracking_results[0]
    lines = [
        "## 2. Tracker overhead during training",
        "",
        f"`ldjax.train.loop.train` for {t0['steps']} SFT steps on the embedded world, set up as `ldjax sft` "
        f"(batch {t0['train_batch_size']}, sequences padded to {t0['max_length']} tokens, AdamW 1e-4, log every "
        f"step, no checkpoints), with `Tracker(every={t0['every']})` on {t0['num_prompts']} probe prompts × "
        f"{len(t0['families'])} families (evaluations at steps 0, {t0['every']}, …, {t0['steps']}), probe batch "
        f"{t0['probe_batch_size']} prompts (the CLI's: the training batch). Variants interleaved, "
        f"{cfg['track_repeats']} repeats, medians; every scorer compiled before the timed runs (column `compile`).",
        "",
        "- `none`: no tracker.",
        "- `tracker`: `ProbeScorer(model, batch_size)`, one compiled pass per family and chunk of prompts, every "
        "prompt at every evaluation (the old default).",
        f"- `tracker_fused`: `ProbeScorer(..., fused=True)` (the CLI's tracker): every family in one pass per chunk, "
        f"padding trimmed to the longest real probe rounded up to 8 ({t0['probe_length']} → {t0['trimmed_length']} "
        "tokens at the first size); every prompt at every evaluation; scores equal the per-family pass's (`max |Δ|`).",
        f"- `tracker_subset`: the fused scorer with `Tracker(subset=m)` (`--track-subset m`, m = {t0['subset']}): "
        "steps 0 and the last score every prompt, the evaluations in between a rotating window of m prompts.",
        f"- run overhead = median wall(with) / median wall(without) − 1 over the {t0['steps']}-step run (includes "
        "the full evaluations at the start and end); **steady overhead** = median cost of an intermediate "
        "evaluation (the records' `time.track_s`, all but the first and last evaluation of every repeat) / "
        f"(every × train step): what a long run converges to; `full eval` = median of the first and last "
        "evaluations; `every for 10 %` = the interval at which the intermediate evaluation costs 10 %.",
        "",
        "| size | params | V | train step ms | variant | prompts / eval | wall s | run overhead | steady overhead "
        "| eval ms | full eval ms | eval in train steps | every for 10 % | compile s | max \\|Δ\\| |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in tracking_results:
        for v, s in t["variants"].items():
            ev = bool(s["evals"])
            lines.append(
                f"| {t['size']} | {t['num_params']:,} | {t['vocab_size']} | {t['train_step_s'] * 1e3:.1f} | {v} "
                f"| {s['prompts_per_eval'] if ev else '–'} | {s['wall_s']:.2f} "
                f"| {_pct(s['overhead']) if ev else '–'} | {_pct(s['steady_overhead']) if ev else '–'} "
                f"| {_f(s['steady_eval_s'] * 1e3 if ev and s['steady_eval_s'] is not None else None)} "
                f"| {_f(s['full_eval_s'] * 1e3 if ev else None)} "
                f"| {_f(s['steady_eval_in_train_steps'] if ev else None, '.2f')} "
                f"| {_f(s['every_for_10pct'] if ev else None, '.0f')} "
                f"| {_f(t['compile_s'].get(v), '.2f')} | {_f(t['score_max_abs_diff_vs_library'].get(v), '.1e')} |")
    lines += [
        "",
        "### Choosing m",
        "",
        "Eval-only cost of one fused evaluation of m prompts (median of 5 interleaved rounds, the timed runs' "
        "scorer, outside the training loop), against the "
        "10 % budget = 0.1 × every × train step. `m for 10 %`: proportional = ⌊budget / (all-prompt fused "
        "intermediate evaluation / P)⌋; scan = the largest scanned m whose evaluation fits.",
        "",
        "| size | budget ms | m | eval ms | eval ms / prompt | overhead at every | m for 10 % proportional / scan |",
        "|---|---:|---:|---:|---:|---:|---|"]
    for t in tracking_results:
        c = t["subset_choice"]
        for e in c["scan"]:
            lines.append(f"| {t['size']} | {c['budget_s'] * 1e3:.1f} | {e['m']}{' **chosen**' if e['m'] == c['m'] else ''} "
                         f"| {e['eval_s'] * 1e3:.1f} | {e['eval_s'] / e['m'] * 1e3:.1f} "
                         f"| {_pct(e['eval_s'] / (c['every'] * c['train_step_s']))} "
                         f"| {c['m_for_10pct_proportional']} / {c['m_for_10pct_scan']} |")
    acc_rows = [(t, r) for t in tracking_results for r in t["estimate_accuracy"]["rows"]]
    if acc_rows:
        fam = tracking_results[0]["estimate_accuracy"]["family"]
        lines += [
            "",
            "### The subset estimate's accuracy",
            "",
            f"An extra (untimed) `tracker_subset` run whose `decompose_fn` hook keeps the parameters after every "
            f"tracked step; at {cfg['track_estimate_checks']} intermediate steps every prompt is scored there and "
            f"the logged `estimate` of the mean summed log-prob of `{fam}` is compared with the all-prompt mean. "
            "`std`: spread over prompts of the scores, `std Δ`: of their change since step 0; `naive`: the plain "
            "mean of the window's prompts; `change`: the all-prompt mean's change since step 0 (the signal); "
            "`max err/std (all families)`: the worst |estimate − mean| / std over the 11 families.",
            "",
            "| size | step | window | all-prompt mean | estimate | \\|err\\| | err / std | naive \\|err\\| | std | std Δ "
            "| change | max err/std (all families) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t, r in acc_rows:
            lines.append(f"| {t['size']} | {r['step']} | {','.join(map(str, r['prompts']))} | {r['full_mean']:.3f} "
                         f"| {r['estimate']:.3f} | {r['abs_err']:.3f} | {r['rel_err']:.3f} | {r['naive_abs_err']:.3f} "
                         f"| {r['std']:.3f} | {r['std_change']:.3f} | {r['change']:+.3f} "
                         f"| {r['max_rel_err_all_families']:.3f} |")
    lines.append("")
    return lines


def observations(report: dict[str, Any]) -> list[str]:
    out = []
    for d in report.get("decomposition") or []:
        best = next(r for r in d["rows"] if r["chunk"] == d["best_chunk"])
        out.append(f"- decomposition `{d['size']}`: {best['decomposition_s'] * 1e3:.0f} ms at chunk {d['best_chunk']} = "
                   f"{d['best_ratio_to_floor']:.2f}× the floor ({best['floor_s'] * 1e3:.0f} ms) and "
                   f"{d['best_ratio_to_train_step']:.1f}× one train step; the softmax Jacobian `A` costs "
                   f"{_f(best['floor_logits_s'] and 100 * (best['floor_s'] / best['floor_logits_s'] - 1), '+.0f')} % "
                   "over the bare logits JVP; "
                   f"decomposition − floor = {1e3 * (best['decomposition_s'] - best['floor_s']):+.0f} ms.")
    for t in report.get("tracking") or []:
        v = t["variants"]
        lib, fused, sub = v["tracker"], v["tracker_fused"], v["tracker_subset"]
        c = t["subset_choice"]
        out.append(
            f"- tracking `{t['size']}` (train step {t['train_step_s'] * 1e3:.1f} ms, every {t['every']}): an all-prompt "
            f"evaluation costs {_f(lib['steady_eval_s'] and lib['steady_eval_s'] * 1e3, '.0f')} ms "
            f"({_f(lib['steady_eval_in_train_steps'])} train steps) per family, "
            f"{_f(fused['steady_eval_s'] and fused['steady_eval_s'] * 1e3, '.0f')} ms "
            f"({_f(fused['steady_eval_in_train_steps'])}) fused: steady overhead {_pct(lib['steady_overhead'], '+.0f')} / "
            f"{_pct(fused['steady_overhead'], '+.0f')}, 10 % would need every ≈ {_f(lib['every_for_10pct'], '.0f')} / "
            f"{_f(fused['every_for_10pct'], '.0f')} steps. With subset m = {t['subset']} an intermediate evaluation "
            f"costs {_f(sub['steady_eval_s'] and sub['steady_eval_s'] * 1e3, '.0f')} ms "
            f"({_f(sub['steady_eval_in_train_steps'], '.2f')} train steps): steady overhead "
            f"{_pct(sub['steady_overhead'])} ({'within' if sub['steady_overhead'] is not None and sub['steady_overhead'] <= 0.1 else 'over'} "
            f"10 %); over this {t['steps']}-step run, with its two full evaluations, {_pct(sub['overhead'], '+.0f')}.")
        out.append(
            f"- m at `{t['size']}`: {c['per_prompt_s'] * 1e3:.1f} ms per prompt in the fused all-prompt evaluation "
            f"against a budget of {c['budget_s'] * 1e3:.0f} ms per interval gives m ≤ {c['m_for_10pct_proportional']} "
            f"proportionally; the eval-only scan fits m ≤ {c['m_for_10pct_scan']}"
            + f"; in the training loop m = {c['m']} measured {_f(sub['steady_eval_s'] and sub['steady_eval_s'] * 1e3, '.0f')} ms "
            f"per intermediate evaluation ({c['m'] * c['per_prompt_s'] * 1e3:.0f} ms proportionally).")
        acc = t["estimate_accuracy"]
        if acc["rows"]:
            rel = [r["rel_err"] for r in acc["rows"]]
            naive = [r["naive_abs_err"] / r["std"] for r in acc["rows"] if r["std"] > 0]
            out.append(
                f"- estimate at `{t['size']}` (`{acc['family']}`, steps {', '.join(str(r['step']) for r in acc['rows'])}): "
                f"|estimate − all-prompt mean| = {', '.join(format(r['abs_err'], '.3f') for r in acc['rows'])} nats = "
                f"{max(rel):.3f} std over prompts at most (the plain window mean: {_f(max(naive) if naive else None, '.2f')} "
                f"std); against the mean's change since step 0 ({', '.join(format(r['change'], '+.3f') for r in acc['rows'])}); "
                f"worst over all families {acc['max_rel_err_all_families']:.3f} std.")
    return out


if __name__ == "__main__":
    _config = parse_config(Config)
    if _config.render:
        _path = pathlib.Path(_config.render)
        _report = json.loads(_path.read_text())
        # the must-show (derived from the measurements) is recomputed, then written back with the md
        _report["must_show"] = must_show(_report.get("decomposition") or [], _report.get("tracking") or [])
        _path.write_text(json.dumps(_report, indent=2))
        _path.with_suffix(".md").write_text(render_markdown(_report))
    else:
        main(_config)
