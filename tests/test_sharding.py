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


# ---------------------------------------------------------------- a causal LM: SFT and DPO steps

from ldjax.models.transformer import CausalLM, TransformerConfig  # noqa: E402
from ldjax.train import objectives  # noqa: E402

V, T, B = 32, 12, 16


def lm_batches(n_steps, seed=0, size=B):
    """Right-padded preference batches of ``size`` pairs (prompt 2-4 tokens, response 3-7), both sides."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        batch = {}
        for side in ("chosen", "rejected"):
            prompt = rng.integers(2, 5, size=size)
            total = prompt + rng.integers(3, 8, size=size)
            pos = np.arange(T)[None]
            batch[f"{side}_input_ids"] = np.where(pos < total[:, None], rng.integers(0, V, (size, T)), 0).astype(np.int32)
            batch[f"{side}_attention_mask"] = (pos < total[:, None]).astype(np.int32)
            batch[f"{side}_loss_mask"] = ((pos >= prompt[:, None]) & (pos < total[:, None])).astype(np.int32)
        out.append(batch)
    return out


def tiny_lm():
    cfg = TransformerConfig.tiny("qwen2", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, initializer_range=0.2)
    return CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


def sft_view(batch):
    return {k[len("chosen_"):]: v for k, v in batch.items() if k.startswith("chosen_")}


def run_lm(mesh, loss_fn, data, learning_rate):
    graphdef, params, rest = steps.split_model(tiny_lm())
    init = jax.device_get(params)  # the step donates the state's buffers
    opt = optax.sgd(learning_rate)
    state = sharding.replicate(steps.init_train_state(params, opt, 0), mesh)
    step = steps.make_train_step(graphdef, loss_fn, opt, rest=rest, mesh=mesh)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert len(state.params["embed"]["embedding"][...].sharding.device_set) == mesh.devices.size
    return jax.device_get(state.params), losses, init


def assert_one_equals_eight(loss_fn, data, learning_rate):
    one, losses1, init = run_lm(sharding.data_mesh(jax.devices()[:1]), loss_fn, data, learning_rate)
    eight, losses8, _ = run_lm(sharding.data_mesh(), loss_fn, data, learning_rate)
    # Tolerance: the two runs differ only in how the batch's gradient is summed (8 partial sums
    # all-reduced vs one reduction) and in XLA's per-device tiling, i.e. float32 rounding of
    # O(1e-7) relative per gradient entry. Plain SGD adds lr * that per step, without Adam's
    # division by a tiny sqrt(v) that can amplify it (a too large step amplifies it too: DPO at
    # lr 1.0 moved params by 1.3 and the gap grew to 2e-4). Measured max |diff| after 4 steps:
    # 1.8e-7 (SFT), 4.1e-7 (DPO), on params that moved by 0.08-0.11; atol=2e-6 leaves a 5x
    # margin and is still 4e4 times smaller than the change training made.
    change = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(one)))
    assert change > 1e-2  # training moved the params, so the comparison is not of the init
    chex.assert_trees_all_close(one, eight, rtol=0, atol=2e-6)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-6)


def test_causal_lm_sft_steps_agree_on_one_and_eight_devices():
    data = [sft_view(b) for b in lm_batches(4)]
    assert_one_equals_eight(objectives.sft_objective(), data, learning_rate=0.05)


def test_causal_lm_dpo_steps_agree_on_one_and_eight_devices():
    data = lm_batches(4, seed=1)
    # Reference log-probs precomputed once from the starting model (on one device), as the CLI does.
    graphdef, params, rest = steps.split_model(tiny_lm())
    all_rows = {k: np.concatenate([b[k] for b in data]) for k in data[0]}
    ref = objectives.reference_logps(graphdef, params, rest, all_rows, batch_size=B)
    data = [{**b, "ref_chosen_logps": ref["ref_chosen_logps"][i * B:(i + 1) * B],
             "ref_rejected_logps": ref["ref_rejected_logps"][i * B:(i + 1) * B]} for i, b in enumerate(data)]
    assert_one_equals_eight(objectives.preference_objective("sigmoid", beta=0.5), data, learning_rate=0.1)
