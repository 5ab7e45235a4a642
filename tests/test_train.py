"""ldjax.train: schedules, optimizers, the compiled step, gradient accumulation, the loop."""
from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from ldjax.train import loop as loop_lib
from ldjax.train import optim, steps
from ldjax.train.config import ConfigError, LoopConfig, OptimizerConfig, SFTConfig, DPOConfig, paper_rmsprop


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d_in: int = 6, hidden: int = 8, classes: int = 4):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def ce_loss(model, batch):
    logits = model(batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses.mean(), {"accuracy": (logits.argmax(-1) == batch["y"]).mean().astype(jnp.float32)}


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 4, size=n).astype(np.int32)}


def setup(opt_config: OptimizerConfig, seed: int = 0, accumulation_steps: int | None = None):
    graphdef, params, rest = steps.split_model(TinyNet(nnx.Rngs(seed)))
    opt = optim.build_optimizer(opt_config)
    state = steps.init_train_state(params, opt, seed)
    step = steps.make_train_step(graphdef, ce_loss, opt, rest=rest,
                                 accumulation_steps=accumulation_steps or opt_config.accumulation_steps,
                                 learning_rate=optim.learning_rate_schedule(opt_config), donate=False)
    return graphdef, rest, state, step


# ---------------------------------------------------------------- schedules and optimizers

@settings(max_examples=25, deadline=None)
@given(warm=st.integers(1, 200), step=st.integers(0, 400), lr=st.floats(1e-7, 1e-2))
def test_warmup_is_linear_then_constant(warm, step, lr):
    sched = optim.learning_rate_schedule(OptimizerConfig(learning_rate=lr, warmup_steps=warm))
    expected = lr * min(1.0, (step + 1) / (warm + 1))
    np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-5)


def test_linear_decay_reaches_zero_at_num_steps():
    sched = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="linear"), num_steps=110)
    np.testing.assert_allclose([float(sched(s)) for s in (10, 60, 110)], [1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ConfigError, match="num_steps"):
        optim.learning_rate_schedule(OptimizerConfig(schedule="cosine", warmup_steps=5), num_steps=5)


def test_paper_preset():
    c = paper_rmsprop()
    assert (c.optimizer, c.learning_rate, c.warmup_steps, c.clip_norm) == ("rmsprop", 5e-7, 150, 10.0)
    assert DPOConfig().beta == 0.1


def test_rmsprop_with_clipping_matches_pytorch_recipe_by_hand():
    """optax chain vs a NumPy transcription of torch.optim.RMSprop (alpha, eps outside sqrt) after clipping."""
    cfg = OptimizerConfig(optimizer="rmsprop", learning_rate=0.01, warmup_steps=3, clip_norm=1.5)
    opt = optim.build_optimizer(cfg)
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
    state = opt.init(params)
    p_ref = {k: v.copy() for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t in range(6):
        g = {k: rng.normal(size=x.shape) * 3 for k, x in params.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        g_clipped = {k: x * min(1.0, 1.5 / norm) for k, x in g.items()}
        lr = 0.01 * min(1.0, (t + 1) / 4)
        for k in p_ref:
            v[k] = 0.99 * v[k] + 0.01 * g_clipped[k] ** 2
            p_ref[k] = p_ref[k] - lr * g_clipped[k] / (np.sqrt(v[k]) + 1e-8)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    # The schedule runs in float32 (int32 step count), so lr carries ~1e-7 relative rounding;
    # a wrong decay, eps placement or clip would show at 1e-3 or more.
    for k in p_ref:
        np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_decreases_loss(name):
    cfg = OptimizerConfig(optimizer=name, learning_rate=0.05 if name == "sgd" else 0.01, momentum=0.0)
    _, _, state, step = setup(cfg)
    batch = make_data(16)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]


def test_bad_optimizer_config_is_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        OptimizerConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="accumulation_steps"):
        SFTConfig(accumulation_steps=0)
    with pytest.raises(ConfigError, match="num_steps"):
        LoopConfig(num_steps=0)


# ---------------------------------------------------------------- the compiled step

def test_step_equals_manual_optax_update():
    cfg = OptimizerConfig(optimizer="adamw", learning_rate=0.01, weight_decay=0.1, clip_norm=0.5)
    graphdef, rest, state, step = setup(cfg)
    batch = make_data(8)
    opt = optim.build_optimizer(cfg)

    def loss(p):
        return ce_loss(nnx.merge(graphdef, p, rest), batch)[0]

    params, opt_state = state.params, opt.init(state.params)
    for _ in range(3):
        g = jax.grad(loss)(params)
        u, opt_state = opt.update(g, opt_state, params)
        expected_norm = optax.tree.norm(g)
        params = optax.apply_updates(params, u)
        state, m = step(state, batch)
        np.testing.assert_allclose(float(m["grad_norm"]), float(expected_norm), rtol=1e-5)
    chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    assert int(state.step) == 3
    assert set(m) >= {"loss", "grad_norm", "lr", "accuracy"}


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_big_batch(k):
    cfg = OptimizerConfig(optimizer="adam", learning_rate=0.01, clip_norm=1.0)
    _, _, big_state, big_step = setup(cfg, accumulation_steps=1)
    _, _, acc_state, acc_step = setup(cfg, accumulation_steps=k)
    for i in range(4):
        batch = make_data(8, seed=i)
        big_state, m_big = big_step(big_state, batch)
        acc_state, m_acc = acc_step(acc_state, batch)
        np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(acc_state.params, big_state.params, rtol=1e-5, atol=1e-6)


def test_accumulation_must_divide_batch():
    _, _, state, step = setup(OptimizerConfig(), accumulation_steps=3)
    with pytest.raises(ConfigError, match="accumulation_steps=3"):
        step(state, make_data(8))


def test_prepare_fn_gets_a_fresh_key_each_step():
    graphdef, params, rest = steps.split_model(TinyNet(nnx.Rngs(0)))
    opt = optax.sgd(0.0)
    seen = []

    def prepare(p, batch, key, constants):  # replaces the labels by random ones drawn from the key
        return {**batch, "y": jax.random.randint(key, batch["y"].shape, 0, 4, dtype=jnp.int32)}

    def loss(model, batch):
        seen_y = batch["y"]
        return ce_loss(model, batch)[0], {"y_sum": seen_y.sum().astype(jnp.float32)}

    step = steps.make_train_step(graphdef, loss, opt, rest=rest, prepare_fn=prepare, donate=False)
    state = steps.init_train_state(params, opt, seed=3)
    batch = make_data(64)
    for _ in range(3):
        state, m = step(state, batch)
        seen.append(float(m["y_sum"]))
    assert len(set(seen)) == 3  # different keys, different draws
    state2 = steps.init_train_state(params, opt, seed=3)
    _, m2 = step(state2, batch)
    assert float(m2["y_sum"]) == seen[0]  # same seed, same draw


# ---------------------------------------------------------------- the loop

def epochs_of(data, batch_size):
    def epoch_batches(epoch):
        order = np.random.default_rng(epoch).permutation(len(data["y"]))
        for i in range(len(order) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield {k: v[idx] for k, v in data.items()}
    return epoch_batches


def test_loop_writes_metrics_and_crosses_epochs(tmp_path):
    cfg = LoopConfig(num_steps=7, batch_size=4, out=str(tmp_path), log_every=2, eval_every=3, progress=False)
    _, _, state, step = setup(OptimizerConfig(learning_rate=0.01))
    evals = []
    result = loop_lib.train(step, state, epochs_of(make_data(12), 4), cfg,
                            eval_fn=lambda s, t: evals.append(t) or {"n": float(t)})
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6, 7]
    assert all({"loss", "lr", "grad_norm", "epoch"} <= set(l) for l in train_lines)
    assert evals == [3, 6, 7]
    assert (result.epoch, result.batch_index) == (2, 1)  # 3 batches per epoch: 7 = 3 + 3 + 1
    assert int(result.state.step) == 7


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    from ldjax.train.checkpoint import RunCheckpointer
    graphdef, params, rest = steps.split_model(TinyNet(nnx.Rngs(0)))
    opt = optax.sgd(0.01)

    def loss(model, batch):
        l, m = ce_loss(model, batch)
        return l * batch["scale"][0], m

    step = steps.make_train_step(graphdef, loss, opt, rest=rest, donate=False)
    state = steps.init_train_state(params, opt, 0)
    data = make_data(8)

    def epoch_batches(epoch):
        for i in range(100):
            yield {**data, "scale": np.full((8,), np.nan if i == 4 else 1.0, np.float32)}

    cfg = LoopConfig(num_steps=10, out=str(tmp_path), checkpoint_every=2, progress=False)
    ckpt = RunCheckpointer(tmp_path / "checkpoints", model_config={"m": 1})
    with pytest.raises(loop_lib.NonFiniteLossError, match=r"step 5 .*loss = nan.*last good checkpoint: step 4"):
        loop_lib.train(step, state, epoch_batches, cfg, checkpointer=ckpt)
    assert ckpt.all_steps() == [2, 4]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(l["step"] for l in lines) == 4
    ckpt.close()
