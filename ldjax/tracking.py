"""Probe tracking during finetuning (SPEC §3): every k steps, score a :class:`~ldjax.probes.ProbeSet`.

A :class:`Tracker` writes one JSON line per tracked step to ``path`` (``tracking.jsonl`` in a
run directory)::

    {"step": 40, "num_prompts": 32,
     "time": {"wall": <unix time>, "track_s": 0.21, "decompose_s": 0.0,
              "track_total_s": 1.9, "train_total_s": 30.2, "track_fraction": 0.059},
     "logps":         {"chosen": STATS, …, "argmax_chosen": STATS, "argmax_rejected": STATS},
     "a_norm":        {family: STATS},   # mean over positions of ‖A_t‖_F, per prompt
     "off_argmax":    {family: STATS},   # Σ_t log(1 − max_v π_t)
     "residual_norm": {family: STATS},   # ‖π − e_y‖_F over positions (G with c = 1)
     "dpo": {"margin": STATS, "loss": STATS, "coef_chosen": STATS, "coef_rejected": STATS,
             "G_chosen": STATS, "G_rejected": STATS},          # only with ``preference=``
     "decompose": {…},                                        # only with ``decompose_fn=``
     "prompts": [i, …], "estimate": {…}, "baseline": {…}}     # only with ``subset=``

``STATS`` is the spread over the probe prompts of a per-prompt number:
``{"mean", "std", "min", "q25", "median", "q75", "max"}`` (``std`` with ``ddof=0``). The
``logps`` families are summed response log-probabilities (:class:`~ldjax.probes.FamilyScores`);
``argmax_chosen`` / ``argmax_rejected`` are the teacher-forced argmax paths ``y*`` along
chosen and rejected.

Cost is reported, not hidden: ``time.track_s`` is the wall time of this tracking call
(scoring, DPO quantities, ``decompose_fn`` and writing; the first call includes compilation),
``time.train_total_s`` the seconds the training loop spent in its steps so far, and
``time.track_fraction = track_total_s / (track_total_s + train_total_s)``. Both totals count
from the start of the current process (a resumed run restarts them).

**Subsets of prompts** (``subset=m``, CLI ``--track-subset m``). One evaluation forwards every
family for every probe prompt (F·P sequences, ≈ 2N FLOPs per token) while a train step processes
B sequences (≈ 6N): with P = 32, F = 11 and B = 8 that is ≈ 15 train steps per evaluation,
whatever the implementation. With ``subset=m`` the first evaluation (step 0) and the last one
score all P prompts; every evaluation in between scores a rotating window of m prompts
(evaluation j = step // every covers prompts ``(j−1)·m … j·m − 1`` mod P, so every prompt is
seen every ⌈P/m⌉ evaluations and a resumed run scores the same windows). Its ``STATS`` are
over the m scored prompts (``"prompts"`` lists them) and ``"estimate"`` holds, per
quantity and family, the control-variate estimate of the all-prompt mean,
``mean_P(x₀) + mean_m(x_t − x₀)``, which uses each prompt's own step-0 value (logged once as
``"baseline"`` in the step-0 record) so the prompt-to-prompt spread of the levels cancels; at the
full evaluations it is the exact mean. End − start over the run stays exact.

Tracking never touches the training state's RNG key nor the batches: a run with and without
tracking follows the same trajectory, and a resumed run writes the same records (up to the
``time`` fields) as an uninterrupted one.

``decompose_fn(params_before, params_after, batch) -> dict`` is a hook for the per-step
decomposition of a sampled subset: at every tracked step s ≥ 1 the training loop hands it the
parameters before and after step s and the batch of step s (as the data iterator yielded it:
on-policy samples drawn inside the step are not in it), and its JSON-ready return value is
logged under ``"decompose"``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from ldjax.probes import FamilyScores, ProbeScorer, ProbeSet, preference_diagnostics

__all__ = ["PreferenceTracking", "Tracker", "TrackingMismatch", "check_tracking_resumable", "spread", "read_tracking",
           "truncate_tracking", "TRACKING_FILE", "PROBES_FILE"]

TRACKING_FILE = "tracking.jsonl"
PROBES_FILE = "probes.json"
DecomposeFn = Callable[[Any, Any, Any], Mapping[str, Any]]


class TrackingMismatch(ValueError):
    """A resumed run would append records of another probe set to an existing tracking log."""


@dataclasses.dataclass(frozen=True)
class PreferenceTracking:
    """The preference loss whose margin, coefficients and ‖G‖ are logged (as the training objective)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def spread(values: np.ndarray) -> dict[str, float]:
    """``{mean, std, min, q25, median, q75, max}`` of a (P,) array; NaN/inf stay (JSON ``NaN``/``-Infinity``)."""
    v = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "q25": float(q25),
            "median": float(q50), "q75": float(q75), "max": float(v.max())}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = np.asarray(jax.device_get(value))
        return array.item() if array.ndim == 0 else array.tolist()
    return value


def read_tracking(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a tracking log, in order."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_tracking(path: str | os.PathLike, last_step: int) -> int:
    """Drops the records after ``last_step`` (steps a resumed run will redo); returns how many remain."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(kept)


def check_tracking_resumable(path: str | os.PathLike, texts, resumed_from: int | None) -> None:
    """Refuses to resume a tracking log written for another probe set.

    Args:
      path: the tracking log; the digest of its probe set is read from ``probes.json`` beside it.
      texts: this run's :class:`~ldjax.probes.ProbeTexts`.
      resumed_from: the step the run resumes from (``None``: a fresh run, always fine).

    Raises:
      TrackingMismatch: the log keeps records (steps ≤ ``resumed_from``) of a probe set with
        another digest, or without a ``probes.json``.
    """
    path = pathlib.Path(path)
    if resumed_from is None or not path.exists():
        return
    kept = [r for r in read_tracking(path) if r["step"] <= resumed_from]
    probes_path = path.parent / PROBES_FILE
    old = json.loads(probes_path.read_text()).get("digest") if probes_path.exists() else None
    digest = texts.digest()
    if kept and old != digest:
        raise TrackingMismatch(
            f"{path} holds {len(kept)} records of the probe set {old} but this run's probes are {digest} "
            f"(another --track-prompts or data?): keep the run's tracking settings, or use another --out")


class Tracker:
    """Scores a probe set every ``every`` steps and appends a record to a JSONL file.

    Args:
      probe_set: the probes (:mod:`ldjax.probes`).
      model: the NNX module being trained (its graph is used; parameters come with each call)
        or a functional ``apply_fn(params, input_ids)``.
      every: track at steps ``0, every, 2·every, …`` and at the last step (0 = never).
      path: the JSONL file; ``probes.json`` (the probe texts and their digest) is written next
        to it by :meth:`begin`.
      preference: log DPO-family quantities of the probe pairs for this loss; needs the
        reference log-probs (``reference_logps=`` or :meth:`set_reference`).
      reference_logps: ``(ref_chosen, ref_rejected)``, each (P,).
      decompose_fn: ``(params_before, params_after, batch) -> dict``, see the module docstring.
      batch_size: probe prompts per forward pass (default all).
      scorer: a :class:`~ldjax.probes.ProbeScorer` of ``model`` to reuse (and its compiled pass);
        by default one is made from ``model`` and ``batch_size``.
      per_prompt: also log the per-prompt summed log-probs (``"per_prompt": {family: [p]}``, over
        the prompts scored).
      progress: show a tqdm bar of the tracked steps (only when stderr is a terminal).
      subset: prompts scored at each evaluation between the first and the last (0 = all); see
        the module docstring.
      fused: score every family in one pass (:class:`~ldjax.probes.ProbeScorer` ``fused=True``);
        ignored when ``scorer`` is given.
    """

    def __init__(self, probe_set: ProbeSet, model, *, every: int, path: str | os.PathLike,
                 preference: PreferenceTracking | None = None, reference_logps: tuple[Any, Any] | None = None,
                 decompose_fn: DecomposeFn | None = None, batch_size: int | None = None, per_prompt: bool = False,
                 progress: bool = True, scorer: ProbeScorer | None = None, subset: int = 0, fused: bool = False):
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        if subset < 0:
            raise ValueError(f"subset must be >= 0, got {subset}")
        if preference is not None and not {"chosen", "rejected"} <= set(probe_set.families):
            raise ValueError("preference tracking needs the chosen and rejected probe families")
        self.probe_set = probe_set
        self.every = int(every)
        self.path = pathlib.Path(path)
        self.preference = preference
        self.decompose_fn = decompose_fn
        self.per_prompt = per_prompt
        self.scorer = scorer if scorer is not None else ProbeScorer(model, batch_size=batch_size, fused=fused)
        self.subset = int(subset) if 0 < subset < probe_set.num_prompts else 0
        self._baseline: dict[str, dict[str, np.ndarray]] | None = None
        self.reference_logps = None
        if reference_logps is not None:
            self.reference_logps = tuple(np.asarray(r) for r in reference_logps)
        self.track_seconds = 0.0
        self._progress = progress
        self._bar: tqdm | None = None

    # -- schedule

    def due(self, step: int, num_steps: int | None = None) -> bool:
        """Whether ``step`` is tracked: a multiple of ``every``, or the last step ``num_steps``."""
        if not self.every:
            return False
        return step % self.every == 0 or (num_steps is not None and step == num_steps)

    def wants_params_before(self, next_step: int, num_steps: int | None = None) -> bool:
        """Whether the loop must keep a copy of the parameters before ``next_step`` (for ``decompose_fn``)."""
        return self.decompose_fn is not None and next_step >= 1 and self.due(next_step, num_steps)

    # -- lifecycle

    def set_reference(self, params) -> None:
        """Scores chosen and rejected with the reference parameters (before training)."""
        scores = self.scorer(params, self.probe_set, ("chosen", "rejected"))
        self.reference_logps = (scores["chosen"].logps, scores["rejected"].logps)

    def begin(self, resumed_from: int | None = None) -> None:
        """Prepares the log: a fresh run deletes an old one; a resumed run keeps the records up to
        ``resumed_from`` (and refuses to continue a log written for another probe set).

        Raises:
          TrackingMismatch: resuming with records of another probe set (names both digests).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        probes_path = self.path.parent / PROBES_FILE
        primary = jax.process_index() == 0  # a multi-process run: process 0 alone writes the files
        if resumed_from is None:
            if primary and self.path.exists():
                self.path.unlink()
        else:
            check_tracking_resumable(self.path, self.probe_set.texts, resumed_from)
            if primary:
                truncate_tracking(self.path, resumed_from)
            first = [r for r in read_tracking(self.path)[:1] if r.get("step", 0) <= resumed_from]
            if first and "baseline" in first[0]:
                self._baseline = {q: {f: np.asarray(v, np.float64) for f, v in fam.items()}
                                  for q, fam in first[0]["baseline"].items()}
        if primary:
            probes_path.write_text(json.dumps(self.probe_set.texts.to_json(), indent=1, ensure_ascii=False))
        self.track_seconds = 0.0
        if self._bar is None and self.every:
            self._bar = tqdm(desc="track", unit="eval", position=1, leave=False, dynamic_ncols=True,
                             disable=not self._progress or not sys.stderr.isatty())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- one record

    def prompts_at(self, step: int, last: bool = False) -> np.ndarray | None:
        """The prompt indices scored at ``step`` (``None`` = all): see ``subset``."""
        if not self.subset or step == 0 or last:
            return None
        j = step // self.every if self.every else step
        return (np.arange(self.subset) + (j - 1) * self.subset) % self.probe_set.num_prompts

    def evaluate(self, params, prompts: np.ndarray | None = None) -> dict[str, Any]:
        """The record body (without ``step`` and ``time``) at ``params``, over ``prompts`` (default all)."""
        scores: dict[str, FamilyScores] = self.scorer(params, self.probe_set, prompts=prompts)
        record: dict[str, Any] = {"num_prompts": self.probe_set.num_prompts if prompts is None else len(prompts)}
        logps = {f: spread(s.logps) for f, s in scores.items()}
        for side in ("chosen", "rejected"):
            if side in scores:
                logps[f"argmax_{side}"] = spread(scores[side].argmax_logps)
        record["logps"] = logps
        for name in ("a_norm", "off_argmax", "residual_norm"):
            record[name] = {f: spread(getattr(s, name)) for f, s in scores.items()}
        if self.preference is not None:
            if self.reference_logps is None and self.preference.loss_type != "simpo":
                raise ValueError("preference tracking needs the reference log-probs: pass reference_logps= "
                                 "or call set_reference(params) before training")
            ref = self.reference_logps or (None, None)
            if prompts is not None and self.reference_logps is not None:
                ref = tuple(np.asarray(r)[prompts] for r in ref)
            p = self.preference
            dpo = preference_diagnostics(scores["chosen"], scores["rejected"], ref[0], ref[1], loss_type=p.loss_type,
                                         beta=p.beta, label_smoothing=p.label_smoothing, **dict(p.loss_kwargs))
            record["dpo"] = {k: spread(v) for k, v in dpo.items()}
        if self.per_prompt:
            per = {f: np.asarray(s.logps).tolist() for f, s in scores.items()}
            for side in ("chosen", "rejected"):
                if side in scores:
                    per[f"argmax_{side}"] = np.asarray(scores[side].argmax_logps).tolist()
            record["per_prompt"] = per
        if self.subset:
            self._add_estimate(record, scores, prompts)
        return record

    def _add_estimate(self, record: dict[str, Any], scores: dict[str, FamilyScores], prompts) -> None:
        """``prompts``, ``estimate`` (and at the first full evaluation ``baseline``) of a subset tracker."""
        values = {"logps": {f: np.asarray(s.logps, np.float64) for f, s in scores.items()},
                  "a_norm": {f: np.asarray(s.a_norm, np.float64) for f, s in scores.items()},
                  "off_argmax": {f: np.asarray(s.off_argmax, np.float64) for f, s in scores.items()}}
        for side in ("chosen", "rejected"):
            if side in scores:
                values["logps"][f"argmax_{side}"] = np.asarray(scores[side].argmax_logps, np.float64)
        if prompts is None:
            record["prompts"] = list(range(self.probe_set.num_prompts))
            record["estimate"] = {q: {f: float(v.mean()) for f, v in fam.items()} for q, fam in values.items()}
            if self._baseline is None:
                self._baseline = values
                record["baseline"] = {q: {f: v.tolist() for f, v in fam.items()} for q, fam in values.items()}
            return
        if self._baseline is None:
            raise RuntimeError("a subset evaluation needs the step-0 baseline (track step 0 first)")
        record["prompts"] = [int(i) for i in prompts]
        record["estimate"] = {q: {f: float(self._baseline[q][f].mean() + (v - self._baseline[q][f][prompts]).mean())
                                  for f, v in fam.items()} for q, fam in values.items()}

    def track(self, step: int, params, *, params_before=None, batch=None,
              train_seconds: float | None = None, last: bool = False) -> dict[str, Any]:
        """Scores the probes at ``params`` (the state after ``step`` steps) and appends the record.

        Args:
          step: the number of optimizer steps taken.
          params: the parameters (e.g. ``TrainState.params``).
          params_before, batch: the parameters before step ``step`` and its batch, handed to
            ``decompose_fn`` (called only when both are given).
          train_seconds: seconds the caller spent training so far (logged as
            ``time.train_total_s`` with the overhead fraction).
          last: the run's last step (a subset tracker scores every prompt there).

        Returns:
          The record written.
        """
        start = time.perf_counter()
        record: dict[str, Any] = {"step": int(step), **self.evaluate(params, self.prompts_at(step, last))}
        decompose_s = 0.0
        if self.decompose_fn is not None and params_before is not None and batch is not None:
            t = time.perf_counter()
            record["decompose"] = _jsonable(dict(self.decompose_fn(params_before, params, batch)))
            decompose_s = time.perf_counter() - t
        elapsed = time.perf_counter() - start
        self.track_seconds += elapsed
        timing = {"wall": time.time(), "track_s": elapsed, "decompose_s": decompose_s,
                  "track_total_s": self.track_seconds}
        if train_seconds is not None:
            timing["train_total_s"] = float(train_seconds)
            total = self.track_seconds + float(train_seconds)
            timing["track_fraction"] = self.track_seconds / total if total > 0 else 0.0
        record["time"] = timing
        if jax.process_index() == 0:  # every process scores (the arrays span them all); one writes
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        self._show(record)
        return record

    def _show(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        logps = record["logps"]
        post = {k: f"{logps[k]['mean']:.1f}" for k in ("chosen", "rejected", "argmax_chosen") if k in logps}
        fraction = record["time"].get("track_fraction")
        if fraction is not None and math.isfinite(fraction):
            post["overhead"] = f"{100 * fraction:.0f}%"
        self._bar.set_postfix(step=record["step"], **post)
        self._bar.update(1)
