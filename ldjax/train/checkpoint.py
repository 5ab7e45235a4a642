"""Orbax checkpoints of a training run: state, data position, RNG and the config, atomically.

Layout: ``<run>/checkpoints/<step>/{state,meta}``. ``state`` is the :class:`TrainState` pytree
(params, optimizer state, step, RNG key); ``meta`` a JSON item with the data position
(epoch, batch index), the model config and the resume signature (both checked before any
restore: :func:`ldjax.train.config.resume_signature`) and the whole run config (for the record).
Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous checkpoint as the latest one. In a multi-process run
(:mod:`ldjax.train.distributed`) every process calls :meth:`RunCheckpointer.save` and
:meth:`RunCheckpointer.restore` (Orbax coordinates them; the directory must be shared).
"""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Iterable, Mapping

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is restored into."""


class CheckpointConfigMismatch(CheckpointError):
    """The checkpoint was written for a different model, or by a run on another trajectory."""


def _diff(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{prefix}{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def file_digest(paths: Iterable[str | pathlib.Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` in order (identifies a data file or a model dir).

    Raises:
      CheckpointError: a path is not a readable file.
    """
    digest = hashlib.sha256()
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise CheckpointError(f"cannot fingerprint {path}: not a file")
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


class RunCheckpointer:
    """Saves and restores a run every N steps, keeping the last K.

    Args:
      directory: where the step directories go (created).
      model_config: a JSON-ready dict that identifies the model architecture; stored with each
        checkpoint and compared before restoring.
      run_config: a JSON-ready dict of the whole run config (stored for the record only).
      resume_signature: a JSON-ready dict of everything that determines the trajectory
        (:func:`ldjax.train.config.resume_signature`); stored and compared before restoring.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str | pathlib.Path, *, model_config: Mapping[str, Any],
                 run_config: Mapping[str, Any] | None = None, resume_signature: Mapping[str, Any] | None = None,
                 keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.model_config = dict(model_config)
        self.run_config = dict(run_config or {})
        self.resume_signature = dict(resume_signature or {})
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous: the next (donating) step must not overwrite buffers still being written.
            enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: Any, *, epoch: int, batch_index: int) -> int:
        """Writes ``state`` at ``int(state.step)`` with the data position; returns the step."""
        step = int(jax.device_get(state.step))
        meta = dict(step=step, epoch=int(epoch), batch_index=int(batch_index),
                    model_config=self.model_config, resume_signature=self.resume_signature,
                    run_config=self.run_config)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        return step

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of ``step`` (default: latest)."""
        step = self._require_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_resumable(self, step: int | None = None) -> dict[str, Any]:
        """Compares the model config and resume signature of ``step`` (default: latest) with ours.

        Returns:
          the checkpoint's meta (no array is read).

        Raises:
          CheckpointConfigMismatch: listing every differing field (``model_config.*`` for the
            architecture, the bare name for run settings).
          CheckpointError: no such checkpoint.
        """
        step = self._require_step(step)
        meta = self.read_meta(step)
        diffs = _diff(meta.get("model_config", {}), self.model_config, prefix="model_config.")
        if "resume_signature" not in meta and self.resume_signature:
            diffs.append("the checkpoint has no resume signature (written by an older ldjax), so its run "
                         "settings cannot be checked")
        else:
            diffs += _diff(meta.get("resume_signature", {}), self.resume_signature)
        if diffs:
            raise CheckpointConfigMismatch(
                f"checkpoint {self.directory / str(step)} was written by a run with other settings; resuming "
                f"would continue another trajectory (use another output directory, or the old settings): "
                + "; ".join(diffs))
        return meta

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the state of ``step`` (default: latest) shaped and sharded like ``template``.

        The checkpoint holds each array once, as shards (every process of a multi-process run
        writes its own); Orbax reads into ``template``'s shardings, so a state saved on one
        mesh (say ``fsdp=8``) restores onto another (``data=2 x fsdp=4``, one device, more or
        fewer processes): place the template there first
        (:func:`ldjax.train.sharding.shard_train_state`). The values are bitwise those saved.

        Returns:
          ``(state, meta)`` with ``meta['epoch']``, ``meta['batch_index']`` the data position.

        Raises:
          CheckpointConfigMismatch: the stored model config or resume signature differs from
            this one (checked before any array is read; see :meth:`check_resumable`).
          CheckpointError: no checkpoint, or arrays that do not fit ``template``.
        """
        step = self._require_step(step)
        meta = self.check_resumable(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not fit the current state: {e}") from e
        return restored["state"], meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        return step
