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
   ``max_length``, AdamW), without a tracker, with :class:`ldjax.tracking.Tracker` at
   ``every = track_every`` (``track_prompts`` probe prompts, all 11 families, the CLI's probe
   batch size), and with the same Tracker given :class:`FusedProbeScorer` (every family in one
   compiled pass, padding trimmed). Variants run interleaved, ``track_repeats`` times; the
   overhead is ``median wall(with) / median wall(without) − 1``. Compilation is done before
   the timed runs (reported separately).

Run: ``python benchmarks/dynamics.py`` (writes ``benchmarks/results/dynamics.{md,json}``);
``--quick true`` is a smoke test of seconds.
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
    track: bool = field(default=True, metadata={"help": "run the tracker-overhead part"})
    track_steps: int = field(default=60, metadata={"help": "training steps per tracked run"})
    track_every: int = field(default=10, metadata={"help": "tracker interval"})
    track_prompts: int = field(default=32, metadata={"help": "probe prompts"})
    track_batch_size: int = field(default=0, metadata={"help": "probe prompts per pass of the library scorer (0 = train_batch_size, as the CLI)"})
    track_repeats: int = field(default=3, metadata={"help": "interleaved repeats of every tracking variant"})
    train_batch_size: int = field(default=8, metadata={"help": "SFT batch of the tracked runs"})
    max_length: int = field(default=64, metadata={"help": "sequence length of the tracked runs (the CLI default)"})
    quick: bool = field(default=False, metadata={"help": "smoke test: tiny only, small shapes, 2 repeats"})
    seed: int = field(default=0, metadata={"help": "seed of weights and batches"})
    render: str = field(default="", metadata={"help": "only re-render dynamics.md next to this dynamics.json"})


QUICK = dict(sizes=("tiny",), observed=8, observed_len=16, update_batch=2, update_len=16, chunk_sizes=(8,),
             repeats=2, train_steps_per_repeat=1, track_steps=4, track_every=2, track_prompts=4, track_repeats=2,
             max_length=48)


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


class FusedProbeScorer:
    """A drop-in :class:`ldjax.probes.ProbeScorer` (``scorer=`` of :class:`ldjax.tracking.Tracker`)
    that scores every family in ONE compiled pass over the (F·P, L) stack of all families, with
    the padding trimmed to ``L`` = the longest real probe rounded up to ``multiple`` tokens.

    Exact for causal, right-padded probes (a position never sees the padding after it); the
    stack is built once per probe set.
    """

    def __init__(self, model, multiple: int = 8):
        import jax

        from ldjax import probes

        self._logits_fn, self._default_params = probes._logits_fn(model)
        self.multiple = multiple
        self._stacks: dict[Any, Any] = {}

        def run(params, input_ids, attention_mask, loss_mask):
            logits = self._logits_fn(params, input_ids, attention_mask)
            return probes._summaries(probes.token_diagnostics(logits, input_ids, loss_mask), loss_mask)

        self._run = jax.jit(run)

    def _stack(self, probe_set, families):
        key = (id(probe_set), families)
        if key not in self._stacks:
            arrays = [probe_set.arrays[f] for f in families]
            length = max(int(np.asarray(a["attention_mask"]).sum(axis=1).max()) for a in arrays)
            length = min(probe_set.length, -(-length // self.multiple) * self.multiple)
            self._stacks[key] = [np.concatenate([np.asarray(a[k])[:, :length] for a in arrays])
                                 for k in ("input_ids", "attention_mask", "loss_mask")]
        return self._stacks[key]

    def __call__(self, params, probe_set, families=None):
        import jax

        from ldjax.probes import FamilyScores

        params = self._default_params if params is None else params
        families = probe_set.families if families is None else tuple(families)
        out = jax.device_get(self._run(params, *self._stack(probe_set, families)))
        p = probe_set.num_prompts
        return {f: FamilyScores(**{k: np.asarray(v)[i * p:(i + 1) * p] for k, v in out.items()})
                for i, f in enumerate(families)}


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
    host_params = jax.device_get(s["params"])
    probe_batch = sft.track_batch_size or sft.batch_size
    scorers = {"tracker": probes.ProbeScorer(s["model"], batch_size=probe_batch),
               "tracker_fused": FusedProbeScorer(s["model"])}

    def fresh_state():
        params = jax.tree.map(jnp.asarray, host_params)
        return sharding.replicate(steps.init_train_state(params, s["optimizer"], sft.seed), s["mesh"])

    compile_s = {}
    t = time.perf_counter()
    warm, _ = s["step"](fresh_state(), next(iter(batches(s["arrays"], sft.batch_size, seed=sft.seed, epoch=0))))
    _block(warm)
    compile_s["train_step"] = time.perf_counter() - t
    # Warm the scorers with parameters of the kind the loop hands them (device arrays placed as
    # the train state is), so that the timed runs never compile.
    live_params = warm.params
    score_check = {}
    reference = None
    for name, scorer in scorers.items():
        t = time.perf_counter()
        scores = scorer(live_params, s["probe_set"])
        scorer(fresh_state().params, s["probe_set"])  # step 0 sees the initial state's placement
        compile_s[name] = time.perf_counter() - t
        if reference is None:
            reference = scores
        else:
            score_check[name] = max(float(np.max(np.abs(np.asarray(getattr(scores[f], k)) - np.asarray(getattr(reference[f], k)))))
                                    for f in reference for k in ("logps", "argmax_logps", "a_norm", "residual_norm"))
    eval_s = {name: statistics.median(_timed(lambda sc=sc: sc(live_params, s["probe_set"])) for _ in range(3))
              for name, sc in scorers.items()}

    variants = ("none", "tracker", "tracker_fused")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="ldjax-bench-dynamics-") as tmp:
        for r in range(config.track_repeats):
            rotated = variants[r % 3:] + variants[:r % 3]
            for v in rotated:
                out = pathlib.Path(tmp) / f"{v}-{r}"
                loop = LoopConfig(num_steps=sft.num_steps, batch_size=sft.batch_size, seed=sft.seed, out=str(out),
                                  log_every=sft.log_every, progress=False)
                tracker = None
                if v != "none":
                    tracker = tracking.Tracker(s["probe_set"], s["model"], every=sft.track_every,
                                               path=out / tracking.TRACKING_FILE, scorer=scorers[v], progress=False)
                state = fresh_state()
                load = os.getloadavg()[0]
                start = time.perf_counter()
                result = train(s["step"], state, lambda epoch: batches(s["arrays"], sft.batch_size, seed=sft.seed,
                                                                        epoch=epoch), loop, tracker=tracker)
                _block(result.state.params)
                wall = time.perf_counter() - start
                evals = len(tracking.read_tracking(out / tracking.TRACKING_FILE)) if tracker else 0
                runs[v].append({"wall_s": wall, "train_s": result.train_seconds,
                                "track_s": tracker.track_seconds if tracker else 0.0, "evals": evals, "load_1min": load})
    base = statistics.median(r["wall_s"] for r in runs["none"])
    base_train = statistics.median(r["train_s"] for r in runs["none"])
    step_s = base_train / sft.num_steps
    summary = {}
    for v in variants:
        wall = statistics.median(r["wall_s"] for r in runs[v])
        evals = runs[v][0]["evals"]
        per_eval = statistics.median(r["track_s"] / r["evals"] for r in runs[v]) if evals else 0.0
        paired = [w["wall_s"] / n["wall_s"] - 1 for w, n in zip(runs[v], runs["none"])]
        summary[v] = {"wall_s": wall, "overhead": wall / base - 1, "paired_overheads": paired, "evals": evals,
                      "per_eval_s": per_eval, "per_eval_in_train_steps": per_eval / step_s,
                      # the interval at which this per-evaluation cost would add 10 % to the steps' time
                      "every_for_10pct": per_eval / (0.1 * step_s) if per_eval else 0.0}
    return {"size": size_name, "num_params": num_params(s["params"]), "vocab_size": s["vocab"],
            "train_batch_size": sft.batch_size, "max_length": sft.max_length, "steps": sft.num_steps,
            "every": sft.track_every, "num_prompts": s["probe_set"].num_prompts,
            "families": list(s["probe_set"].families), "probe_length": s["probe_set"].length,
            "probe_batch_size": probe_batch, "train_step_s": step_s, "compile_s": compile_s,
            "eval_only_s": eval_s, "score_max_abs_diff_vs_library": score_check, "variants": summary, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Driver and report


def machine_info() -> dict[str, Any]:
    import jax
    import flax
    import optax
    return {"cpu": process_stats.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_start": os.getloadavg(),
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                         "numpy": np.__version__},
            "peak_rss_reset": reset_peak_rss()}


def main(config: Config) -> dict[str, Any]:
    config = resolve(config)
    unknown = [s for s in config.sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"--sizes: unknown {unknown}; known are {sorted(SIZES)}")
    out_dir = pathlib.Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    started = time.time()
    decomposition, tracking_results = [], []
    for size in config.sizes:
        print(f"[dynamics] decomposition {size} ...", file=sys.stderr, flush=True)
        decomposition.append(bench_decomposition(size, config))
    if config.track:
        for size in config.sizes:
            print(f"[dynamics] tracking {size} ...", file=sys.stderr, flush=True)
            tracking_results.append(bench_tracking(size, config))
    info["load_average_end"] = os.getloadavg()
    info["wall_seconds"] = time.time() - started
    report = {"config": dataclasses.asdict(config), "machine": info, "decomposition": decomposition,
              "tracking": tracking_results, "must_show": must_show(decomposition, tracking_results),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "dynamics.json").write_text(json.dumps(report, indent=2))
    (out_dir / "dynamics.md").write_text(render_markdown(report))
    print(f"wrote {out_dir / 'dynamics.md'} and {out_dir / 'dynamics.json'}", file=sys.stderr)
    return report


def must_show(decomposition, tracking_results) -> dict[str, Any]:
    out = {}
    for d in decomposition:
        out[f"decomposition_{d['size']}_ratio_to_floor"] = {"value": d["best_ratio_to_floor"], "limit": 1.5,
                                                            "met": d["best_ratio_to_floor"] <= 1.5}
    for t in tracking_results:
        for v in ("tracker", "tracker_fused"):
            o = t["variants"][v]["overhead"]
            out[f"tracking_{t['size']}_{v}_overhead"] = {"value": o, "limit": 0.10, "met": o <= 0.10}
    return out


def _f(x, spec=".1f", missing="–"):
    return missing if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    info, cfg = report["machine"], report["config"]
    lines = [
        "# Decomposition and tracking cost",
        "",
        f"Generated by `benchmarks/dynamics.py` on {report['date']}{' (QUICK smoke run)' if cfg['quick'] else ''}. "
        f"GPT-NeoX-style `CausalLM` (`--arch {cfg['arch']}`), float32, CPU, sizes of `benchmarks/train.py`.",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())),
        f"- load average (1/5/15 min) at start {tuple(round(x, 2) for x in info['load_average_start'])}, at end "
        f"{tuple(round(x, 2) for x in info['load_average_end'])}: other processes shared the cores, so every cell "
        "is the median of interleaved repeats (per-round loads in dynamics.json)",
        f"- total wall time {info['wall_seconds']:.0f} s",
        "",
        "## Must-show",
        "",
        "| claim | value | limit | met |",
        "|---|---:|---:|:---:|",
    ]
    for k, v in report["must_show"].items():
        val = f"{v['value']:.2f}×" if "ratio" in k else f"{100 * v['value']:+.1f} %"
        lim = f"{v['limit']:.2f}×" if "ratio" in k else f"{100 * v['limit']:.0f} %"
        lines.append(f"| {k} | {val} | {lim} | {'yes' if v['met'] else 'NO'} |")
    lines += [
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
    for d in report["decomposition"]:
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
    if report["tracking"]:
        t0 = report["tracking"][0]
        lines += [
            "## 2. Tracker overhead during training",
            "",
            f"`ldjax.train.loop.train` for {t0['steps']} SFT steps on the embedded world, set up as `ldjax sft` "
            f"(batch {t0['train_batch_size']}, sequences padded to {t0['max_length']} tokens, AdamW 1e-4, log every "
            f"step, no checkpoints), with `Tracker(every={t0['every']})` on {t0['num_prompts']} probe prompts × "
            f"{len(t0['families'])} families (evaluations at steps 0, {t0['every']}, …, {t0['steps']}). Variants "
            f"interleaved, {cfg['track_repeats']} repeats, medians; compilation done before (column `compile`).",
            "",
            "- `tracker`: the library's `ProbeScorer` with the CLI's probe batch size (one compiled pass per "
            "family and per chunk of prompts).",
            "- `tracker_fused`: the same `Tracker` given `FusedProbeScorer` (this file): all families stacked "
            "into one pass, padding trimmed to the longest real probe (rounded up to 8); the scores equal "
            "the library's (`max |Δ|`).",
            "- overhead = median wall(with) / median wall(without) − 1; `per eval` = the tracker's own time per "
            "evaluation; `every for 10 %` = the interval at which that cost is 10 % of the steps' time.",
            "",
            "| size | params | V | train step ms | variant | wall s | overhead | per eval ms | per eval in train steps "
            "| every for 10 % | compile s | max \\|Δ\\| |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for t in report["tracking"]:
            for v, s in t["variants"].items():
                over = "–" if v == "none" else f"{100 * s['overhead']:+.1f} %"
                lines.append(
                    f"| {t['size']} | {t['num_params']:,} | {t['vocab_size']} | {t['train_step_s'] * 1e3:.1f} | {v} "
                    f"| {s['wall_s']:.2f} | {over} | {_f(s['per_eval_s'] * 1e3 if s['evals'] else None)} "
                    f"| {_f(s['per_eval_in_train_steps'] if s['evals'] else None)} "
                    f"| {_f(s['every_for_10pct'] if s['evals'] else None, '.0f')} "
                    f"| {_f(t['compile_s'].get(v), '.2f')} | {_f(t['score_max_abs_diff_vs_library'].get(v), '.1e')} |")
        lines.append("")
    lines += ["## Observations (computed from the table)", ""] + observations(report) + [""]
    lines += ["## Notes", "",
              "- Peak RSS growth of a warm call is 0 MiB in every cell: `import ldjax` makes glibc keep freed "
              "memory (`ldjax.host_memory`), so a warm call reuses the buffers of the warm-up call; XLA temp is the "
              "memory figure to read (the chunk bounds it: the JVP kernel's temp grows with the chunk).",
              "- Tracking cost is compute, not overhead: one evaluation forwards F × P probe sequences (11 × 32 = "
              "352 of up to `max_length` tokens, ≈ 2N FLOPs/token) while a train step processes B = 8 sequences "
              "(≈ 6N FLOPs/token), so one evaluation ≈ 352·2 / (8·6) ≈ 15 train steps at equal length; at "
              "every = 10 that is ≈ +150 %, whatever the implementation. Fusing the families into one pass and "
              "trimming padding (`tracker_fused`) removes the dispatches and ~25 % of the tokens, not the work.",
              "- At `tiny` size every kernel takes milliseconds and the fixed per-call cost of `predict_sgd` "
              "(input checks: `jax.eval_shape` of the model on the observed and the update batch, the "
              "coefficient kernel, three dispatches) is a visible share; at `4m` it is lost in the JVPs.",
              ""]
    return "\n".join(lines)


def observations(report: dict[str, Any]) -> list[str]:
    out = []
    for d in report["decomposition"]:
        best = next(r for r in d["rows"] if r["chunk"] == d["best_chunk"])
        out.append(f"- decomposition `{d['size']}`: {best['decomposition_s'] * 1e3:.0f} ms at chunk {d['best_chunk']} = "
                   f"{d['best_ratio_to_floor']:.2f}× the floor ({best['floor_s'] * 1e3:.0f} ms) and "
                   f"{d['best_ratio_to_train_step']:.1f}× one train step; the softmax Jacobian `A` costs "
                   f"{_f(best['floor_logits_s'] and 100 * (best['floor_s'] / best['floor_logits_s'] - 1), '+.0f')} % "
                   "over the bare logits JVP; "
                   f"decomposition − floor = {1e3 * (best['decomposition_s'] - best['floor_s']):+.0f} ms.")
    for t in report["tracking"]:
        lib, fused = t["variants"]["tracker"], t["variants"]["tracker_fused"]
        out.append(f"- tracking `{t['size']}`: one evaluation costs {lib['per_eval_s'] * 1e3:.0f} ms "
                   f"({lib['per_eval_in_train_steps']:.1f} train steps) with the library scorer, "
                   f"{fused['per_eval_s'] * 1e3:.0f} ms ({fused['per_eval_in_train_steps']:.1f}) fused; at every="
                   f"{t['every']} that is {100 * lib['overhead']:+.0f} % / {100 * fused['overhead']:+.0f} % of "
                   f"training time; 10 % would need every ≈ {lib['every_for_10pct']:.0f} / "
                   f"{fused['every_for_10pct']:.0f} steps.")
    return out


if __name__ == "__main__":
    _config = parse_config(Config)
    if _config.render:
        _path = pathlib.Path(_config.render)
        _path.with_suffix(".md").write_text(render_markdown(json.loads(_path.read_text())))
    else:
        main(_config)
