"""Pure, jit-compiled train steps over the functional view of an NNX module.

A step maps ``(TrainState, batch) -> (TrainState, metrics)``. The module's graph definition is
static (closed over); parameters, optimizer state, step counter and RNG key are a pytree that
is donated to the compiled call. Gradient accumulation splits the batch into micro-batches
inside the same call (``lax.scan``) and averages their gradients, so one optimizer step sees
exactly the mean gradient of the whole batch whatever the accumulation factor.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ldjax.train import sharding as sharding_lib
from ldjax.train.config import ConfigError

Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, Metrics]]
PrepareFn = Callable[[Any, Batch, jax.Array, Any], Batch]


class TrainState(NamedTuple):
    """Everything a step changes. ``rng`` is a raw ``uint32[2]`` key (serialisable as is)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: fresh optimizer state for ``params`` and the key ``PRNGKey(seed)``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed).astype(jnp.uint32),
    )


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: trainable ``nnx.Param`` state and everything else."""
    return nnx.split(model, nnx.Param, ...)


def _micro_batches(batch: Batch, k: int) -> Batch:
    # Micro-batch j takes rows j, j+k, j+2k, ...: each device's contiguous shard of the
    # batch then stays on that device (no resharding) when B/k is a multiple of the mesh size.
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    rest: nnx.State | None = None,
    accumulation_steps: int = 1,
    learning_rate: optax.Schedule | float | None = None,
    prepare_fn: PrepareFn | None = None,
    constants: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the compiled step ``(state, batch) -> (new_state, metrics)``.

    Args:
      graphdef: static structure of the model (from :func:`split_model`).
      loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; ``loss`` a scalar mean over the
        batch's examples (so equal-size micro-batches average to the full-batch loss), metrics
        a dict of scalars.
      optimizer: an optax transformation (e.g. :func:`ldjax.train.optim.build_optimizer`).
      rest: non-parameter module state (buffers), passed through unchanged.
      accumulation_steps: micro-batches per step; the batch size must be a multiple of it.
      learning_rate: the schedule, only to log ``lr`` in the metrics.
      prepare_fn: ``prepare_fn(params, batch, key, constants) -> batch`` run before the
        gradient and outside it (e.g. on-policy sampling and the reference log-probs of the
        samples); gets a fresh key per step.
      constants: a pytree handed to ``prepare_fn`` as an argument of the compiled call (not
        baked into it), e.g. frozen reference parameters.
      mesh: a data mesh (:func:`ldjax.train.sharding.data_mesh`) or a ``("data", "fsdp")``
        mesh (:func:`ldjax.train.sharding.make_mesh`): batch split on ``"data"``; params,
        gradients and optimizer state split over ``"fsdp"`` by
        :func:`ldjax.train.sharding.fsdp_partition_spec` (replicated when there is no
        ``"fsdp"`` axis or it has size 1); step, RNG key, ``rest`` and metrics replicated;
        ``constants`` by the same FSDP rule. The incoming state must be placed so
        (:func:`ldjax.train.sharding.shard_train_state`); the new state keeps those
        shardings, so donation reuses its buffers. ``None``: no sharding constraints.
      donate: donate the incoming state's buffers to the new state.

    Returns:
      ``step(state, batch)``; metrics hold ``loss``, ``grad_norm`` (before clipping), ``lr``
      and the loss function's own metrics (averaged over micro-batches).
    """
    if rest is None:
        rest = nnx.State({})
    k = int(accumulation_steps)
    if k < 1:
        raise ConfigError(f"accumulation_steps: must be >= 1, got {k}")

    def loss_of_params(params, rest_state, batch):
        return loss_fn(nnx.merge(graphdef, params, rest_state), batch)

    grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

    def gradients(params, rest_state, batch):
        if k == 1:
            (loss, metrics), grads = grad_fn(params, rest_state, batch)
            return loss, metrics, grads
        micro = _micro_batches(batch, k)

        def body(acc, mb):
            (loss, metrics), grads = grad_fn(params, rest_state, mb)
            return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

        (loss0, metrics0), grads0 = jax.eval_shape(grad_fn, params, rest_state, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, metrics0, grads0))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / k, total)

    def step(state: TrainState, batch: Batch, rest_value: nnx.State, constants_value: Any) -> tuple[TrainState, Metrics]:
        rng, prepare_key = jax.random.split(state.rng)
        if prepare_fn is not None:
            batch = jax.lax.stop_gradient(prepare_fn(state.params, batch, prepare_key, constants_value))
        loss, metrics, grads = gradients(state.params, rest_value, batch)
        if mesh is not None:  # the gradient lives where its parameter lives (a reduce-scatter under FSDP)
            grads = jax.lax.with_sharding_constraint(grads, sharding_lib.param_shardings(grads, mesh))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        if learning_rate is not None:
            lr = learning_rate(state.step) if callable(learning_rate) else learning_rate
            metrics["lr"] = jnp.asarray(lr, jnp.float32)
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    jit_kwargs: dict[str, Any] = dict(donate_argnums=(0,) if donate else ())
    compiled_for: dict[Any, Callable] = {}

    def compiled_step(state: TrainState) -> Callable:
        # The state's shardings follow from its shapes (the FSDP rule), known at the first call.
        if mesh is None:
            key = None
        else:
            key = jax.tree.structure(state), tuple(tuple(x.shape) for x in jax.tree.leaves(state))
        if key not in compiled_for:
            kwargs = dict(jit_kwargs)
            if mesh is not None:
                rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
                state_sh = sharding_lib.state_shardings(state, mesh)
                const_sh = sharding_lib.param_shardings(constants, mesh)
                kwargs.update(in_shardings=(state_sh, data, rep, const_sh), out_shardings=(state_sh, rep))
            compiled_for[key] = jax.jit(step, **kwargs)
        return compiled_for[key]

    num_devices = 1 if mesh is None else sharding_lib.batch_devices(mesh)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
        if len(sizes) != 1:
            raise ConfigError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
        (size,) = sizes
        if size % k:
            raise ConfigError(f"batch size {size} is not a multiple of accumulation_steps={k}")
        if mesh is not None and size % num_devices:
            raise sharding_lib.ShardingError(f"batch size {size} is not a multiple of the {num_devices} devices of the "
                                             f"mesh")
        if mesh is not None:
            batch = sharding_lib.shard_batch(batch, mesh)
        return compiled_step(state)(state, batch, rest, constants)

    return run
