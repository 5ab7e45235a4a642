"""Data parallelism over a 1-D ``jax.sharding.Mesh``: batch split on ``"data"``, params replicated.

The same code runs on one CPU, on 8 fake host devices (tests) and on a TPU/GPU: the train step
is jit-compiled with these shardings and XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


class ShardingError(ValueError):
    """A batch cannot be split evenly over the mesh."""


def data_mesh(devices: Sequence[jax.Device] | None = None, num_devices: int = 0) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: the first ``num_devices``, 0 = all)."""
    if devices is None:
        devices = jax.devices()
        if num_devices:
            if num_devices > len(devices):
                raise ShardingError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
            devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places each array of ``batch`` (a pytree, leading axis = examples) split over the mesh.

    Raises:
      ShardingError: an array's leading size is not a multiple of the number of devices.
    """
    n = mesh.devices.size

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ShardingError(
                f"batch field {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}; its leading (batch) "
                f"size must be a multiple of the {n} devices of the mesh")
        return jax.device_put(x, batch_sharding(mesh))

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on all devices of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def fsdp_partition_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Where one parameter (or its gradient / optimizer moment) lives on the ``"fsdp"`` axis.

    The rule: split the largest axis whose size ``fsdp_size`` divides (the first of equal
    sizes); replicate when no axis divides, when the array is a scalar, or when
    ``fsdp_size <= 1``. Shapes only — the same rule serves the train step's shardings and
    ``ldjax plan``'s byte counts (:mod:`ldjax.memory_plan`).

    Args:
      shape: the array's shape, e.g. ``(vocab, d_model)``.
      fsdp_size: devices on the ``"fsdp"`` mesh axis.

    Returns:
      ``PartitionSpec`` with ``"fsdp"`` at the chosen axis and ``None`` elsewhere, or
      ``PartitionSpec()`` (replicated).
    """
    if fsdp_size <= 1 or len(shape) == 0:
        return PartitionSpec()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp_size == 0 and size >= fsdp_size]
    if not candidates:
        return PartitionSpec()
    _, neg_axis = max(candidates)
    axis = -neg_axis
    return PartitionSpec(*([None] * axis + [FSDP_AXIS] + [None] * (len(shape) - axis - 1)))
