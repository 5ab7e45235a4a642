"""The training loop: resumable data position, metrics JSONL, eval hooks, NaN guard, checkpoints.

The loop is plain Python around a compiled step (:func:`ldjax.train.steps.make_train_step`).
Data comes from ``epoch_batches(epoch)``, a deterministic function of the epoch (e.g.
:func:`ldjax.data.preference.batches` with a fixed seed), so the position ``(epoch, batch
index)`` saved in a checkpoint is enough to continue exactly where a killed run stopped.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ldjax.train.checkpoint import RunCheckpointer
from ldjax.train.config import LoopConfig
from ldjax.train.steps import TrainState

if TYPE_CHECKING:
    from ldjax.tracking import Tracker

Batch = Any
EpochBatches = Callable[[int], Iterable[Batch]]
EvalFn = Callable[[TrainState, int], dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stopped before saving the bad state."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` leaves behind (the same numbers are in ``metrics.jsonl``)."""

    state: TrainState
    history: list[dict[str, Any]]
    epoch: int
    batch_index: int
    resumed_from: int | None
    train_seconds: float = 0.0  # wall time inside the steps of this call (tracking, logging, saving excluded)


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    # Lines logged after the checkpoint we resume from describe steps that will be redone.
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def count_tokens(batch: Batch) -> int:
    """Real tokens of a batch: the sum of every ``*attention_mask`` field (0 when none)."""
    if not isinstance(batch, dict):
        return 0
    return int(sum(np.asarray(v).sum() for k, v in batch.items() if k.endswith("attention_mask")))


def train(
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]],
    state: TrainState,
    epoch_batches: EpochBatches,
    config: LoopConfig,
    *,
    checkpointer: RunCheckpointer | None = None,
    eval_fn: EvalFn | None = None,
    tracker: "Tracker | None" = None,
    desc: str = "train",
) -> TrainResult:
    """Runs ``step_fn`` until ``state.step == config.num_steps``.

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``; metrics must contain ``loss``.
      state: the initial state (also the template a checkpoint is restored into).
      epoch_batches: ``epoch -> iterable of batches``, the same every time for the same epoch.
      config: loop fields (steps, logging, checkpointing, resume, progress).
      checkpointer: where checkpoints go; with ``config.resume`` the latest one is restored
        first (state, RNG key and data position).
      eval_fn: ``(state, step) -> {name: value}``, called every ``config.eval_every`` steps
        and at the end; its numbers are logged with an ``eval/`` prefix.
      tracker: a :class:`ldjax.tracking.Tracker`, evaluated at step 0 of a fresh run, at every
        step it marks as due and at the last step, after logging and evaluation and before
        checkpointing. A resumed run truncates its log past the restored step. It reads the
        parameters only (never the RNG key or the batches); with a ``decompose_fn`` the
        parameters before a tracked step are copied for it (not donated).

    Raises:
      NonFiniteLossError: a step's loss or gradient norm is NaN/inf. The bad state is not
        saved; the message names the step and the last good checkpoint.
    """
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    # In a multi-process run (ldjax.train.distributed) every process runs this loop and saves its
    # checkpoint shards; only process 0 writes the metrics log.
    primary = jax.process_index() == 0
    epoch, batch_index, resumed_from = 0, 0, None
    if checkpointer is not None and config.resume and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        epoch, batch_index, resumed_from = meta["epoch"], meta["batch_index"], meta["step"]
        if primary:
            _truncate_metrics(metrics_path, resumed_from)
    elif primary and metrics_path.exists():
        metrics_path.unlink()  # a fresh run must not append to an old run's log
    if tracker is not None:
        tracker.begin(resumed_from)

    step = int(jax.device_get(state.step))
    last_saved = resumed_from
    history: list[dict[str, Any]] = []
    bar = tqdm(total=config.num_steps, initial=step, desc=desc, dynamic_ncols=True,
               disable=not config.progress or not sys.stderr.isatty())

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if primary:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval() -> None:
        if eval_fn is not None:
            log({"step": step, **{f"eval/{k}": float(v) for k, v in eval_fn(state, step).items()}})

    def save() -> None:
        nonlocal last_saved
        if checkpointer is not None and last_saved != step:
            last_saved = checkpointer.save(state, epoch=epoch, batch_index=batch_index)

    train_seconds = 0.0  # time inside the steps, for the tracker's overhead report

    def run_tracker(before=None, batch=None) -> None:
        if tracker is not None and tracker.due(step, config.num_steps):
            tracker.track(step, state.params, params_before=before, batch=batch, train_seconds=train_seconds,
                          last=step == config.num_steps)

    try:
        if resumed_from is None:
            run_tracker()  # the starting point
        tokens, t0 = 0, time.perf_counter()
        while step < config.num_steps:
            epoch_iter = iter(epoch_batches(epoch))
            consumed = batch_index
            for batch in itertools.islice(epoch_iter, batch_index, None):
                before = None
                if tracker is not None and tracker.wants_params_before(step + 1, config.num_steps):
                    before = jax.tree.map(jnp.copy, state.params)  # the step donates its input
                started = time.perf_counter()
                new_state, metrics = step_fn(state, batch)
                values = _scalars(metrics)
                train_seconds += time.perf_counter() - started
                bad = [k for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])]
                if bad:
                    where = (f"step {last_saved} in {checkpointer.directory}" if checkpointer is not None and last_saved is not None
                             else "none saved")
                    raise NonFiniteLossError(
                        f"step {step + 1} (epoch {epoch}, batch {consumed}): "
                        + ", ".join(f"{k} = {values[k]}" for k in bad)
                        + f"; training stopped and this state was not saved; last good checkpoint: {where}")
                state = new_state
                step += 1
                consumed += 1
                batch_index = consumed
                tokens += count_tokens(batch)
                bar.update(1)
                if step % config.log_every == 0 or step == config.num_steps:
                    elapsed = time.perf_counter() - t0
                    record = {"step": step, "epoch": epoch, **values}
                    if tokens:
                        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                    log(record)
                    bar.set_postfix(loss=f"{values['loss']:.4g}")
                    tokens, t0 = 0, time.perf_counter()
                if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                    run_eval()
                run_tracker(before, batch)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save()
                if step >= config.num_steps:
                    break
            else:
                if consumed == batch_index and consumed == 0:
                    raise ValueError(f"epoch {epoch} yielded no batches (is the dataset smaller than batch_size={config.batch_size}?)")
                epoch, batch_index = epoch + 1, 0
        run_eval()
        save()
    finally:
        bar.close()
        if tracker is not None:
            tracker.close()
    return TrainResult(state=state, history=history, epoch=epoch, batch_index=batch_index, resumed_from=resumed_from,
                       train_seconds=train_seconds)
