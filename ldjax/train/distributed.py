"""Multi-process (multi-host) runs: JAX's own runtime, ``jax.distributed``, started from the environment.

One ldjax process runs per host (or per GPU); :func:`maybe_initialize` joins them with
:func:`jax.distributed.initialize` before any computation, after which ``jax.devices()`` lists
every process's devices, the mesh (:func:`ldjax.train.sharding.make_mesh`) spans them all and
the compiled train step runs as one SPMD program. Every process runs the same command with the
same flags: it builds the same seeded model and reads the same data order, and places only its
own shards (:func:`ldjax.train.sharding.shard_batch` / ``shard_train_state``).

What each process writes:

* ``metrics.jsonl``, ``config.json``, ``summary.json``, ``tracking.jsonl``, ``probes.json`` and
  the final ``model/`` directory: process 0 only (:func:`is_primary`); ``--out`` should be on a
  filesystem every process sees (for the checkpoints), but only process 0 writes these files.
* ``checkpoints/``: every process calls Orbax's save and restore, as Orbax expects in a
  multi-process run; each writes the shards it holds (Orbax coordinates through the
  ``jax.distributed`` client), so ``--out`` must be shared (NFS, GCS via ``gs://`` paths, ...).

How to launch (``--distributed``):

``--distributed env`` (or ``auto`` with ``LDJAX_COORDINATOR`` set) reads
  ``LDJAX_COORDINATOR=host:port`` (process 0's address and a free port), ``LDJAX_NUM_PROCESSES``
  and ``LDJAX_PROCESS_ID`` (0 … n−1), optionally ``LDJAX_LOCAL_DEVICE_IDS=0,1`` (the
  accelerators this process drives) and ``LDJAX_INIT_TIMEOUT`` (seconds, default 300). E.g. two
  processes on one machine, CPU only (collectives over gloo, JAX's CPU default)::

      LDJAX_COORDINATOR=127.0.0.1:12355 LDJAX_NUM_PROCESSES=2 LDJAX_PROCESS_ID=0 ldjax sft --distributed env ... &
      LDJAX_COORDINATOR=127.0.0.1:12355 LDJAX_NUM_PROCESSES=2 LDJAX_PROCESS_ID=1 ldjax sft --distributed env ...

``--distributed auto`` without ``LDJAX_COORDINATOR`` lets JAX detect the cluster
  (``jax.distributed.initialize()`` with no arguments):

  * **Cloud TPU pods** (``gcloud compute tpus tpu-vm ssh NAME --worker=all --command "ldjax sft
    --distributed auto ..."``): the TPU metadata gives the coordinator, process count and id.
  * **SLURM** (``srun --ntasks-per-node=G --gpus-per-task=1 ldjax sft --distributed auto ...``):
    read from ``SLURM_*``; one process per GPU by default.
  * **Open MPI** (``mpirun -n N ldjax sft --distributed auto ...``): read from ``OMPI_*``.
  * Other GPU launchers (``torchrun``-style, Kubernetes): set the ``LDJAX_*`` variables from
    theirs (e.g. ``LDJAX_COORDINATOR=$MASTER_ADDR:$MASTER_PORT LDJAX_NUM_PROCESSES=$WORLD_SIZE
    LDJAX_PROCESS_ID=$RANK``) and pass ``--distributed env``.

``--distributed off`` (the default) never initialises: a single process, as before.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from ldjax.train.config import ConfigError

ENV_COORDINATOR = "LDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "LDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LDJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LDJAX_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "LDJAX_INIT_TIMEOUT"
MODES = ("off", "env", "auto")


class DistributedError(ConfigError):
    """The environment does not describe a multi-process run that can be joined."""


_initialized_here = False


def env_arguments(environ: Any = None) -> dict[str, Any] | None:
    """The :func:`jax.distributed.initialize` arguments of the ``LDJAX_*`` variables, or None
    when ``LDJAX_COORDINATOR`` is unset.

    Raises:
      DistributedError: a variable is missing or malformed (names it).
    """
    environ = os.environ if environ is None else environ
    coordinator = environ.get(ENV_COORDINATOR)
    if not coordinator:
        return None
    if ":" not in coordinator:
        raise DistributedError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port (process 0's address and a free port)")
    args: dict[str, Any] = {"coordinator_address": coordinator}
    for key, name in ((ENV_NUM_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id")):
        value = environ.get(key)
        if value is None:
            raise DistributedError(f"{ENV_COORDINATOR} is set but {key} is not: set both {ENV_NUM_PROCESSES} and "
                                   f"{ENV_PROCESS_ID} on every process")
        try:
            args[name] = int(value)
        except ValueError:
            raise DistributedError(f"{key}={value!r} is not an integer") from None
    if not 0 <= args["process_id"] < args["num_processes"]:
        raise DistributedError(f"{ENV_PROCESS_ID}={args['process_id']} must be in [0, {ENV_NUM_PROCESSES}="
                               f"{args['num_processes']})")
    if environ.get(ENV_LOCAL_DEVICE_IDS):
        args["local_device_ids"] = [int(i) for i in environ[ENV_LOCAL_DEVICE_IDS].split(",")]
    if environ.get(ENV_TIMEOUT):
        args["initialization_timeout"] = int(environ[ENV_TIMEOUT])
    return args


def maybe_initialize(mode: str = "env", environ: Any = None) -> bool:
    """Joins the processes of a multi-process run (once); returns whether this run is distributed.

    Args:
      mode: ``"off"`` (never), ``"env"`` (only when ``LDJAX_COORDINATOR`` is set: see the module
        docstring), ``"auto"`` (the ``LDJAX_*`` variables when set, else JAX's own cluster
        detection: TPU pods, SLURM, Open MPI).
      environ: the environment (default ``os.environ``).

    Must run before any JAX computation of the process. A second call is a no-op.

    Raises:
      DistributedError: ``mode="env"`` with malformed variables, or an unknown mode.
    """
    global _initialized_here
    if mode not in MODES:
        raise DistributedError(f"distributed mode {mode!r} is not one of {MODES}")
    if mode == "off":
        return jax.process_count() > 1 if _initialized_here else False
    if _initialized_here or _already_initialized():
        return jax.process_count() > 1
    args = env_arguments(environ)
    if args is None and mode == "env":
        return False
    try:
        jax.distributed.initialize(**(args or {}))
    except ValueError as e:  # raised before anything is started: nothing detected
        if args is not None:
            raise DistributedError(f"jax.distributed.initialize: {e}") from e
        raise DistributedError(
            f"--distributed auto: JAX detected no cluster (TPU pod, SLURM, Open MPI): {e} — set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (then --distributed env), or pass --distributed off") from e
    _initialized_here = True
    return jax.process_count() > 1


def _already_initialized() -> bool:
    try:
        from jax._src import distributed as _dist  # the only place the state is kept
        return _dist.global_state.client is not None
    except (ImportError, AttributeError):  # pragma: no cover - a future jax
        return False


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in a single process)."""
    return jax.process_index() == 0


def shutdown() -> None:
    """Leaves the multi-process run (if this module joined it)."""
    global _initialized_here
    if _initialized_here:
        jax.distributed.shutdown()
        _initialized_here = False
