"""Orbax checkpoints of a training run: state, data position, RNG and the config, atomically.

Layout: ``<run>/checkpoints/<step>/{state,meta}``. ``state`` is the :class:`TrainState` pytree
(params, optimizer state, step, RNG key); ``meta`` a JSON item with the data position
(epoch, batch index), the model config (checked before any restore) and the run config.
Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is restored into."""


class CheckpointConfigMismatch(CheckpointError):
    """The checkpoint was written for a different model config."""


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k, '<absent>')!r} vs now {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


class RunCheckpointer:
    """Saves and restores a run every N steps, keeping the last K.

    Args:
      directory: where the step directories go (created).
      model_config: a JSON-ready dict that identifies the model architecture; stored with each
        checkpoint and compared before restoring.
      run_config: a JSON-ready dict of the whole run config (stored for the record).
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str | pathlib.Path, *, model_config: dict[str, Any],
                 run_config: dict[str, Any] | None = None, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.model_config = dict(model_config)
        self.run_config = dict(run_config or {})
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
                    model_config=self.model_config, run_config=self.run_config)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
        return step

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of ``step`` (default: latest)."""
        step = self._require_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the state of ``step`` (default: latest) shaped and sharded like ``template``.

        Returns:
          ``(state, meta)`` with ``meta['epoch']``, ``meta['batch_index']`` the data position.

        Raises:
          CheckpointConfigMismatch: the stored model config differs from this one (checked
            before any array is read).
          CheckpointError: no checkpoint, or arrays that do not fit ``template``.
        """
        step = self._require_step(step)
        meta = self.read_meta(step)
        diffs = _diff(meta.get("model_config", {}), self.model_config)
        if diffs:
            raise CheckpointConfigMismatch(
                f"checkpoint {self.directory / str(step)} was written for another model config: " + "; ".join(diffs))
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
