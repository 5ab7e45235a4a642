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


def torch_rmsprop_by_hand(params, grads_per_step, *, lrs, momentum, clip, alpha=0.99, eps=1e-8):
    """NumPy transcription of torch.optim.RMSprop.step (not centred) after clip_grad_norm_, with a per-step lr."""
    p = {k: v.copy() for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    buf = {k: np.zeros_like(x) for k, x in params.items()}
    for g, lr in zip(grads_per_step, lrs):
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in p:
            v[k] = alpha * v[k] + (1 - alpha) * g[k] ** 2
            avg = np.sqrt(v[k]) + eps
            if momentum > 0:
                buf[k] = momentum * buf[k] + g[k] / avg
                p[k] = p[k] - lr * buf[k]  # torch: the current lr multiplies the whole buffer
            else:
                p[k] = p[k] - lr * g[k] / avg
    return p


def run_optax(opt, params, grads_per_step):
    state = opt.init(params)
    for g in grads_per_step:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_with_warmup_and_clipping_matches_pytorch_by_hand(momentum):
    """build_optimizer('rmsprop') vs the NumPy transcription of torch's RMSprop, warm-up schedule and clipping."""
    cfg = OptimizerConfig(optimizer="rmsprop", learning_rate=0.01, warmup_steps=3, clip_norm=1.5, momentum=momentum)
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
    grads = [{k: rng.normal(size=x.shape) * 3 for k, x in params.items()} for _ in range(6)]
    lrs = [0.01 * min(1.0, (t + 1) / 4) for t in range(6)]
    expected = torch_rmsprop_by_hand(params, grads, lrs=lrs, momentum=momentum, clip=1.5)
    got = run_optax(optim.build_optimizer(cfg), params, grads)
    # The schedule runs in float32 (int32 step count), so lr carries ~1e-7 relative rounding;
    # a wrong decay, eps placement, clip or lr/momentum order shows at 1e-3 or more (below).
    for k in expected:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-6, atol=1e-9)
    if momentum:
        # optax.rmsprop applies the lr before its momentum trace: under a warm-up it is not torch's.
        lagging = optax.chain(optax.clip_by_global_norm(1.5), optax.rmsprop(
            optim.learning_rate_schedule(cfg), decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=momentum))
        other = run_optax(lagging, params, grads)
        assert max(np.abs(np.asarray(other[k]) - expected[k]).max() for k in expected) > 1e-3


def test_help_of_label_smoothing_names_exactly_the_losses_that_use_it():
    import dataclasses
    import re
    from ldjax import losses as losses_lib
    text = {f.name: f.metadata["help"] for f in dataclasses.fields(DPOConfig)}["label_smoothing"]
    rng = np.random.default_rng(0)
    logps = [rng.normal(size=4) * 3 - 10 for _ in range(4)]
    lengths = dict(chosen_lengths=np.array([3.0, 4, 5, 6]), rejected_lengths=np.array([4.0, 2, 7, 5]))
    uses = set()
    for loss_type in losses_lib.LOSS_TYPES:
        a, b = (np.asarray(losses_lib.preference_loss(*logps, loss_type=loss_type, beta=0.3, label_smoothing=eps,
                                                      **lengths)[0]) for eps in (0.1, 0.2))
        if not np.allclose(a, b):
            uses.add(loss_type)
    named = {t for t in losses_lib.LOSS_TYPES if re.search(rf"\b{t}\b", text)}
    assert named == uses


def test_help_of_warmup_matches_the_schedule():
    import dataclasses
    text = {f.name: f.metadata["help"] for f in dataclasses.fields(OptimizerConfig)}["warmup_steps"]
    assert "peak*(s+1)/(W+1)" in text
    sched = optim.learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4))
    np.testing.assert_allclose([float(sched(s)) for s in range(6)], [0.2, 0.4, 0.6, 0.8, 1.0, 1.0], rtol=1e-6)


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
    grad = jax.jit(jax.grad(loss))
    for _ in range(3):
        g = grad(params)
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


# ---------------------------------------------------------------- LM objectives and sampling

from ldjax import losses  # noqa: E402
from ldjax.models.transformer import CausalLM, TransformerConfig  # noqa: E402
from ldjax.train import objectives, sampling, sharding  # noqa: E402

V, T = 24, 10


def tiny_lm(seed=0):
    cfg = TransformerConfig.tiny("qwen2", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                 intermediate_size=32)
    return CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


def preference_arrays(n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        prompt = rng.integers(2, 5, size=n)
        total = prompt + rng.integers(2, T - 4, size=n)
        pos = np.arange(T)[None]
        out[f"{side}_input_ids"] = np.where(pos < total[:, None], rng.integers(0, V, (n, T)), 0).astype(np.int32)
        out[f"{side}_attention_mask"] = (pos < total[:, None]).astype(np.int32)
        out[f"{side}_loss_mask"] = ((pos >= prompt[:, None]) & (pos < total[:, None])).astype(np.int32)
    return out


def logps_by_hand(model, ids, att, mask):
    """Sum over scored t of log softmax(logits[t-1])[ids[t]]: the shift and masking in NumPy loops."""
    logits = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(att)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.array([sum(logp[i, t - 1, ids[i, t]] for t in range(1, ids.shape[1]) if mask[i, t])
                     for i in range(ids.shape[0])])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_preference_objective_matches_losses_on_hand_computed_logps(loss_type):
    model = tiny_lm()
    data = preference_arrays()
    chosen = logps_by_hand(model, data["chosen_input_ids"], data["chosen_attention_mask"], data["chosen_loss_mask"])
    rejected = logps_by_hand(model, data["rejected_input_ids"], data["rejected_attention_mask"], data["rejected_loss_mask"])
    ref_c, ref_r = chosen - 0.3, rejected + 0.2  # a reference that differs from the policy
    batch = {**{k: jnp.asarray(v) for k, v in data.items()}, "ref_chosen_logps": jnp.asarray(ref_c, jnp.float32),
             "ref_rejected_logps": jnp.asarray(ref_r, jnp.float32)}
    loss, metrics = nnx.jit(objectives.preference_objective(loss_type, beta=0.5))(model, batch)
    lengths = dict(chosen_lengths=data["chosen_loss_mask"][:, 1:].sum(1), rejected_lengths=data["rejected_loss_mask"][:, 1:].sum(1))
    expected, rc, rr = losses.preference_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type, beta=0.5, **lengths)
    np.testing.assert_allclose(float(loss), float(np.mean(expected)), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["rewards/margins"]), float(np.mean(rc - rr)), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), chosen.mean(), rtol=1e-5)


@pytest.mark.parametrize("concatenate", [True, False, None])
@pytest.mark.parametrize("average", [False, True])
def test_policy_logps_one_or_two_forward_passes_match_hand_computed(concatenate, average):
    model = tiny_lm()
    data = preference_arrays()
    chosen, rejected = nnx.jit(lambda m, b: objectives.policy_logps(m, b, average=average, concatenate=concatenate))(
        model, {k: jnp.asarray(v) for k, v in data.items()})
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        expected = logps_by_hand(model, data[f"{side}_input_ids"], data[f"{side}_attention_mask"], data[f"{side}_loss_mask"])
        if average:
            expected = expected / data[f"{side}_loss_mask"][:, 1:].sum(1)
        assert got.shape == (8,)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_reference_logps_once_on_a_mesh_with_a_ragged_last_chunk():
    model = tiny_lm()
    graphdef, params, rest = steps.split_model(model)
    data = preference_arrays(n=11)
    ref = objectives.reference_logps(graphdef, params, rest, data, batch_size=3, mesh=sharding.data_mesh())
    expected = logps_by_hand(model, data["rejected_input_ids"], data["rejected_attention_mask"], data["rejected_loss_mask"])
    assert ref["ref_chosen_logps"].shape == (11,) and ref["ref_chosen_logps"].dtype == np.float32
    np.testing.assert_allclose(ref["ref_rejected_logps"], expected, rtol=1e-5)


class _Unhashable:
    __hash__ = None

    def __eq__(self, other):
        return isinstance(other, _Unhashable)


def test_reference_logps_shared_per_structure_and_with_an_unhashable_graph_definition():
    data = preference_arrays(n=5)
    compiled = None
    for seed in (0, 1):  # the second model (other weights) reuses the compiled pass, with its own weights
        model = tiny_lm(seed)
        graphdef, params, rest = steps.split_model(model)
        ref = objectives.reference_logps(graphdef, params, rest, data, batch_size=2)
        expected = logps_by_hand(model, data["chosen_input_ids"], data["chosen_attention_mask"], data["chosen_loss_mask"])
        np.testing.assert_allclose(ref["ref_chosen_logps"], expected, rtol=1e-5)
        if compiled is None:
            compiled = objectives._reference_sequence_logps._cache_size()
    assert objectives._reference_sequence_logps._cache_size() == compiled
    # A static attribute that cannot be hashed: the graph definition cannot be a jit static
    # argument, so the pass is compiled for this call alone (same values).
    model.note = _Unhashable()
    graphdef, params, rest = steps.split_model(model)
    with pytest.raises(TypeError):
        hash(graphdef)
    ref = objectives.reference_logps(graphdef, params, rest, data, batch_size=2, per_token=True)
    np.testing.assert_allclose(ref["ref_chosen_logps"], expected, rtol=1e-5)


def test_sft_objective_is_mean_negative_logp():
    model = tiny_lm()
    d = preference_arrays()
    batch = {"input_ids": d["chosen_input_ids"], "attention_mask": d["chosen_attention_mask"], "loss_mask": d["chosen_loss_mask"]}
    loss, _ = nnx.jit(objectives.sft_objective())(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), -logps_by_hand(model, *batch.values()).mean(), rtol=1e-5)
    ploss, _ = nnx.jit(objectives.pretrain_objective())(model, {k: jnp.asarray(v) for k, v in batch.items()})
    all_tokens = logps_by_hand(model, batch["input_ids"], batch["attention_mask"], batch["attention_mask"])
    np.testing.assert_allclose(float(ploss), -all_tokens.sum() / (batch["attention_mask"][:, 1:].sum()), rtol=1e-5)


def test_filter_logits_keeps_top_k_and_scales():
    logits = jnp.array([[1.0, 3.0, 2.0, -1.0]])
    out = sampling.filter_logits(logits, temperature=2.0, top_k=2)
    np.testing.assert_array_equal(np.isinf(np.asarray(out)), [[True, False, False, True]])
    np.testing.assert_allclose(np.asarray(out)[0, 1:3], [1.5, 1.0])


def test_sampling_distribution_matches_softmax_of_filtered_logits():
    base = jnp.array([0.0, 1.0, 2.0, 0.5, -1.0])

    def apply(ids, mask):  # next-token logits depend on nothing: every step draws from one law
        return jnp.broadcast_to(base, ids.shape + (5,))

    n = 4000
    out = jax.jit(lambda k: sampling.sample_continuations(apply, jnp.ones((n, 2), jnp.int32), jnp.full((n,), 2), k,
                                                          max_new_tokens=3, temperature=0.7, top_k=3))(jax.random.PRNGKey(0))
    drawn = np.asarray(out["input_ids"][:, 2:]).ravel()
    p = np.zeros(5)
    p[[1, 2, 3]] = np.asarray(jax.nn.softmax(base[jnp.array([1, 2, 3])] / 0.7))
    freq = np.bincount(drawn, minlength=5) / drawn.size
    assert freq[0] == freq[4] == 0
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / drawn.size))  # 4 sigma


def test_top1_sampling_is_greedy_and_stops_at_eos():
    model = tiny_lm()
    graphdef, params, rest = steps.split_model(model)
    prompts = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
    lengths = jnp.array([3, 2])
    sample = sampling.make_sampler(graphdef, rest, max_new_tokens=4, top_k=1, eos_id=None)
    out = sample(params, prompts, lengths, jax.random.PRNGKey(1))
    forward = nnx.jit(lambda m, ids: m(ids))
    for b in range(2):  # greedy decoding by hand, growing the sequence one token at a time
        seq = list(np.asarray(prompts[b, :int(lengths[b])]))
        for _ in range(4):
            # Zero-padded to 8 tokens (one compiled shape); causal attention ignores the padding.
            padded = jnp.asarray([seq + [0] * (8 - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
        L = len(seq)
        np.testing.assert_array_equal(np.asarray(out["input_ids"][b, :L]), seq)
        np.testing.assert_array_equal(np.asarray(out["loss_mask"][b]), [0] * int(lengths[b]) + [1] * 4 + [0] * (8 - L))
    # With EOS = the first greedy token of row 0, row 0 stops at once: one scored token, then padding.
    eos = int(out["input_ids"][0, 3])
    out_eos = sampling.make_sampler(graphdef, rest, max_new_tokens=4, top_k=1, eos_id=eos, pad_id=0)(
        params, prompts, lengths, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(out_eos["loss_mask"][0]), [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(out_eos["attention_mask"][0]), [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(out_eos["input_ids"][0, 4:]), [0, 0, 0, 0])


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_kv_cached_sampling_draws_the_tokens_of_full_recomputation(arch):
    """The same key gives the same samples whether each token reruns the model on the whole
    buffer (a plain callable) or decodes with the KV cache (the model itself); with EOS too."""
    # qwen2 with grouped-query attention (4 query heads read 2 kv heads), neox with partial rotary.
    cfg = TransformerConfig.tiny(arch, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2 if arch == "qwen2" else None, intermediate_size=32, initializer_range=0.5)
    model = CausalLM(cfg, rngs=nnx.Rngs(4), dtype=jnp.float32, param_dtype=jnp.float32)
    assert sampling.has_kv_cache(model) and not sampling.has_kv_cache(lambda i, m: model(i, m))
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, V, (6, 5)), jnp.int32)
    lengths = jnp.array([1, 5, 3, 2, 4, 5])
    kw = dict(max_new_tokens=7, temperature=1.3, top_k=0, eos_id=3, pad_id=0)
    run = nnx.jit(lambda m, k, cached: sampling.sample_continuations(m if cached else (lambda i, a: m(i, a)),
                                                                     prompts, lengths, k, **kw), static_argnums=2)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        cached, full = run(model, key, True), run(model, key, False)
        for name in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(np.asarray(cached[name]), np.asarray(full[name]), err_msg=name)
    assert np.asarray(cached["loss_mask"]).sum() > 6  # the rows really generated


def test_on_policy_batch_keeps_chosen_and_scores_samples_with_the_reference():
    policy, reference = tiny_lm(0), tiny_lm(1)
    d = {k: jnp.asarray(v) for k, v in preference_arrays(n=4).items()}
    out = nnx.jit(lambda p, r, d, k: sampling.on_policy_batch(lambda i, m: p(i, m), lambda i, m: r(i, m), d, k,
                                                              mode="rejected", max_new_tokens=3, top_k=5))(
        policy, reference, d, jax.random.PRNGKey(2))
    assert out["rejected_input_ids"].shape == out["chosen_input_ids"].shape == (4, T + 3)
    np.testing.assert_array_equal(np.asarray(out["chosen_loss_mask"][:, :T]), np.asarray(d["chosen_loss_mask"]))
    prompt_len = np.asarray(sampling.prompt_lengths_of(d["chosen_attention_mask"], d["chosen_loss_mask"]))
    np.testing.assert_array_equal(np.asarray(out["rejected_loss_mask"]).sum(1), [3] * 4)
    for b in range(4):  # rejected = chosen's prompt + 3 sampled tokens
        np.testing.assert_array_equal(np.asarray(out["rejected_input_ids"][b, :prompt_len[b]]),
                                      np.asarray(d["chosen_input_ids"][b, :prompt_len[b]]))
    expected = logps_by_hand(reference, np.asarray(out["rejected_input_ids"]), np.asarray(out["rejected_attention_mask"]),
                             np.asarray(out["rejected_loss_mask"]))
    np.testing.assert_allclose(np.asarray(out["ref_rejected_logps"]), expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["rejected", "both"])
def test_judge_ranked_on_policy_keeps_the_worst_and_best_of_k(mode):
    """candidates=k: the k samples are those of keys fold_in(key_rej, j) (drawn here one by one); y⁻ is
    the lowest-scored of them per prompt, and with "both" y⁺ the highest-scored."""
    policy, reference = tiny_lm(0), tiny_lm(1)
    d = {k: jnp.asarray(v) for k, v in preference_arrays(n=4).items()}
    score = lambda ids, mask: jnp.sum(jnp.where(mask == 1, ids % 7, 0), axis=1).astype(jnp.float32)  # noqa: E731
    kw = dict(max_new_tokens=3, top_k=5)
    key = jax.random.PRNGKey(2)
    out = nnx.jit(lambda p, r, d, k: sampling.on_policy_batch(lambda i, m: p(i, m), lambda i, m: r(i, m), d, k,
                                                              mode=mode, candidates=4, score_fn=score, **kw))(
        policy, reference, d, key)
    lengths = sampling.prompt_lengths_of(d["chosen_attention_mask"], d["chosen_loss_mask"])
    k_rej = jax.random.split(key)[0]
    draws = [nnx.jit(lambda p, k: sampling.sample_continuations(lambda i, m: p(i, m), d["chosen_input_ids"], lengths, k,
                                                                **kw))(policy, jax.random.fold_in(k_rej, j))
             for j in range(4)]
    scores = np.stack([np.asarray(score(x["input_ids"], x["loss_mask"])) for x in draws])  # (k, B)
    assert (scores.max(0) > scores.min(0)).any(), "the candidates must differ for the test to mean anything"
    for b in range(4):
        worst, best = draws[int(scores[:, b].argmin())], draws[int(scores[:, b].argmax())]
        np.testing.assert_array_equal(np.asarray(out["rejected_input_ids"][b]), np.asarray(worst["input_ids"][b]))
        if mode == "both":
            np.testing.assert_array_equal(np.asarray(out["chosen_input_ids"][b]), np.asarray(best["input_ids"][b]))
    expected = logps_by_hand(reference, np.asarray(out["rejected_input_ids"]), np.asarray(out["rejected_attention_mask"]),
                             np.asarray(out["rejected_loss_mask"]))
    np.testing.assert_allclose(np.asarray(out["ref_rejected_logps"]), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="score_fn"):
        sampling.on_policy_batch(policy, reference, d, key, mode=mode, candidates=3, **kw)
