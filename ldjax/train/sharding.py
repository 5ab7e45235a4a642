"""Data parallelism and FSDP over a ``jax.sharding.Mesh`` with axes ``("data", "fsdp")``.

* :func:`data_mesh`: a 1-D ``"data"`` mesh, batch split on ``"data"``, params replicated.
* :func:`make_mesh`: the 2-D ``("data", "fsdp")`` mesh. The batch is split over **both**
  axes, every device computing its own rows (ZeRO-3 / FSDP as in MaxText: the fsdp devices
  are data-parallel too, they only also split the parameters); each parameter, its gradient
  and its optimizer moments are split over ``"fsdp"`` along the axis
  :func:`fsdp_partition_spec` picks (the largest divisible one), scalars and indivisible
  shapes replicated. ``fsdp=1`` is plain data parallelism (every spec is ``PartitionSpec()``).

The same code runs on one CPU, on 8 fake host devices (tests), on a TPU/GPU and on several
processes joined by ``jax.distributed`` (:mod:`ldjax.train.distributed`): the train step is
jit-compiled with these shardings and XLA's SPMD partitioner inserts the all-gathers of the
parameters and the reduce-scatter / all-reduce of the gradients.
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
    return Mesh(np.asarray(_devices(devices, num_devices)), (DATA_AXIS,))


def _devices(devices: Sequence[jax.Device] | None, num_devices: int) -> list[jax.Device]:
    """``devices``, or the first ``num_devices`` of ``jax.devices()`` (0 = all)."""
    if devices is not None:
        return list(devices)
    visible = jax.devices()
    if num_devices > len(visible):
        raise ShardingError(f"num_devices={num_devices} but only {len(visible)} devices are visible")
    return list(visible[:num_devices] if num_devices else visible)


def make_mesh(num_devices: int = 0, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 2-D mesh ``("data", "fsdp")`` of shape ``(n // fsdp, fsdp)``.

    Args:
      num_devices: how many of ``jax.devices()`` (all processes' devices in a multi-process
        run) to use, the first ones; 0 = all.
      fsdp: devices on the ``"fsdp"`` axis; must divide the device count. Devices next to each
        other (same host first) share an fsdp group, so parameter all-gathers stay local
        where they can.
      devices: explicit devices (overrides ``num_devices``).

    Raises:
      ShardingError: more devices asked for than visible, or ``fsdp`` does not divide them.
    """
    devices = _devices(devices, num_devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ShardingError(f"fsdp={fsdp} does not divide the {len(devices)} devices of the mesh")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def axis_size(mesh: Mesh, axis: str) -> int:
    """Devices along ``axis`` (1 when the mesh has no such axis)."""
    return int(dict(mesh.shape).get(axis, 1))


def data_size(mesh: Mesh) -> int:
    """Devices along the ``"data"`` axis (replicas of each parameter shard)."""
    return axis_size(mesh, DATA_AXIS)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ``"data"`` and, on a 2-D mesh, ``"fsdp"``."""
    return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def batch_devices(mesh: Mesh) -> int:
    """Devices the batch is split over (every device of the mesh): the batch must be a multiple."""
    return int(np.prod([axis_size(mesh, a) for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"`` × ``"fsdp"``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put`` in one process; in several (``jax.distributed``) every process holds the
    same global value and builds its own shards of the global array from it."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places each array of ``batch`` (a pytree, leading axis = examples) split over every
    device of the mesh (``"data"`` × ``"fsdp"``).

    Raises:
      ShardingError: an array's leading size is not a multiple of the mesh's devices.
    """
    n = batch_devices(mesh)
    where = f"the {n} devices of the mesh"

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ShardingError(
                f"batch field {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}; its leading (batch) "
                f"size must be a multiple of {where}")
        return _put(x, batch_sharding(mesh))

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on all devices of the mesh."""
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


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


def param_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` of one array of ``shape`` under the FSDP rule (:func:`fsdp_partition_spec`)."""
    return NamedSharding(mesh, fsdp_partition_spec(tuple(shape), axis_size(mesh, FSDP_AXIS)))


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """:func:`param_sharding` of every array leaf of ``tree`` (params, gradients, moments...).

    The rule reads shapes only, so an optimizer state (whose moments have the parameters'
    shapes and whose counters are scalars) gets its moments sharded like their parameters and
    its counters replicated. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
    """
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), tree)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings of a :class:`ldjax.train.steps.TrainState`: step and RNG key replicated,
    params and optimizer state by the FSDP rule."""
    rep = replicated(mesh)
    return type(state)(step=rep, params=param_shardings(state.params, mesh),
                       opt_state=param_shardings(state.opt_state, mesh), rng=rep)


def shard_train_state(state: Any, mesh: Mesh) -> Any:
    """Places a ``TrainState`` on ``mesh``: params and optimizer state split over ``"fsdp"`` by
    :func:`fsdp_partition_spec`, step and RNG key replicated (``fsdp=1``: all replicated, as
    :func:`replicate`). Works in a multi-process run when every process holds the same state
    (the same seeded init)."""
    shardings = state_shardings(state, mesh)
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)
    return jax.tree.map(_put, state, shardings)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places a parameter tree on ``mesh`` by the FSDP rule (e.g. for the analysis on the mesh)."""
    shardings = param_shardings(params, mesh)
    if jax.process_count() == 1:
        return jax.device_put(params, shardings)
    return jax.tree.map(_put, params, shardings)


def gather(tree: Any) -> Any:
    """Host numpy copies of every array of ``tree``, also of arrays spread over several
    processes (then every process must call it: ``multihost_utils.process_allgather``)."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
