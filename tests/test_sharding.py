"""Data parallelism: the same training on 1 device and on 8 (fake CPU) devices."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ldjax.train import sharding, steps


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(5, 16, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.l2 = nnx.Linear(16, 3, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


def loss_fn(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean(), {}


def batches(n_steps, size=16):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(size, 5)).astype(np.float32), "y": rng.integers(0, 3, size).astype(np.int32)}
            for _ in range(n_steps)]


def run(mesh, data, accumulation_steps=1):
    graphdef, params, rest = steps.split_model(TinyNet(nnx.Rngs(0)))
    opt = optax.adam(1e-2)
    state = sharding.replicate(steps.init_train_state(params, opt, 0), mesh)
    step = steps.make_train_step(graphdef, loss_fn, opt, rest=rest, mesh=mesh, accumulation_steps=accumulation_steps)
    for batch in data:
        state, metrics = step(state, batch)
    return state, metrics


def test_eight_fake_devices_are_there():
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 host devices"


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_one_device_and_eight_devices_train_the_same(accumulation_steps):
    data = batches(6)
    one, m1 = run(sharding.data_mesh(jax.devices()[:1]), data, accumulation_steps)
    eight, m8 = run(sharding.data_mesh(), data, accumulation_steps)
    # The batch really was split over 8 devices and the params stayed replicated.
    assert eight.params["l1"]["kernel"][...].sharding.is_fully_replicated
    assert len(eight.params["l1"]["kernel"][...].sharding.device_set) == 8
    assert len(one.params["l1"]["kernel"][...].sharding.device_set) == 1
    # Only the order of the cross-device gradient sum differs: float32 rounding, amplified
    # a little by Adam's normalisation over 6 steps.
    chex.assert_trees_all_close(jax.device_get(one.params), jax.device_get(eight.params), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    # and training moved the params (so the comparison is not trivially of the init).
    graphdef, init, _ = steps.split_model(TinyNet(nnx.Rngs(0)))
    assert not np.allclose(np.asarray(init["l1"]["kernel"][...]), np.asarray(eight.params["l1"]["kernel"][...]))


def test_shard_batch_places_rows_on_devices():
    mesh = sharding.data_mesh()
    sharded = sharding.shard_batch({"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}, mesh)
    shards = sharded["x"].addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)


def test_indivisible_batch_is_a_clear_error():
    mesh = sharding.data_mesh()
    with pytest.raises(sharding.ShardingError, match=r"\['x'\].*\(12, 3\).*8 devices"):
        sharding.shard_batch({"x": np.zeros((12, 3), np.float32)}, mesh)
    with pytest.raises(sharding.ShardingError, match="num_devices=9"):
        sharding.data_mesh(num_devices=9)
