"""The NNX causal transformer: shapes, causality, padding, GQA, RoPE algebra, functional view, grads."""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from ldjax.models import CausalLM, TransformerConfig
from ldjax.models.functional import functional
from ldjax.models.hf import PretrainedFormatError
from ldjax.models.transformer import TransformerConfigError, apply_rotary, rotary_cos_sin

ARCHS = ["gpt_neox", "qwen2"]
V = 61


def tiny_model(arch: str, seed: int = 0, **overrides) -> CausalLM:
    # initializer_range 0.2: O(1) logits, so "unchanged" below is a meaningful statement.
    config = TransformerConfig.tiny(arch, vocab_size=V, hidden_size=32, intermediate_size=64,
                                    initializer_range=0.2, **overrides)
    return CausalLM(config, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, input_ids, attention_mask=None):
    # Always jitted: op-by-op dispatch compiles every primitive and is far slower on tiny models.
    return model(input_ids, attention_mask)


def random_ids(seed: int, shape=(3, 9)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_dtypes_and_none_mask(arch):
    model = tiny_model(arch)
    ids = random_ids(0)
    logits = forward(model, ids)
    chex.assert_shape(logits, (3, 9, V))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    # attention_mask=None is the all-ones mask (two compiled graphs: float32 round-off only, |logits| ~ 3).
    np.testing.assert_allclose(forward(model, ids, jnp.ones_like(ids)), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch):
    """Changing token t leaves logits < t bit-for-bit close and changes those >= t."""
    model = tiny_model(arch, seed=1)
    ids = random_ids(1)
    mask = jnp.ones_like(ids)
    base = forward(model, ids, mask)
    for t in (0, 4, 8):
        changed = forward(model, ids.at[:, t].set((ids[:, t] + 7) % V), mask)
        np.testing.assert_allclose(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert np.abs(changed[:, t:] - base[:, t:]).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padding_does_not_touch_real_positions(arch):
    model = tiny_model(arch, seed=2)
    ids = random_ids(2, (2, 10))
    lengths = np.array([6, 10])
    mask = jnp.asarray(np.arange(10)[None, :] < lengths[:, None], jnp.int32)
    padded = forward(model, ids, mask)
    # Whatever sits in the padding, the real positions are those of the unpadded sequence alone.
    other_pad = forward(model, jnp.where(mask == 1, ids, (ids * 3 + 1) % V), mask)
    alone = forward(model, ids[:1, :6], jnp.ones((1, 6), jnp.int32))
    np.testing.assert_allclose(padded[0, :6], alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(other_pad[0, :6], padded[0, :6], rtol=0, atol=1e-6)
    np.testing.assert_allclose(other_pad[1], padded[1], rtol=0, atol=1e-6)
    # Without the mask the pad tokens would leak: the check above is not vacuous.
    assert np.abs(forward(model, jnp.where(mask == 1, ids, (ids * 3 + 1) % V), jnp.ones_like(ids))[0, 6:]
                  - padded[0, 6:]).max() > 1e-3


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    """Query head h reads kv head h // G: the same as MHA whose k/v heads are repeated G times."""
    gqa = tiny_model("qwen2", seed=3, num_heads=4, num_kv_heads=2)
    mha = tiny_model("qwen2", seed=4, num_heads=4, num_kv_heads=4)
    gqa_params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    mha_params = jax.tree.map(lambda x: x, gqa_params)
    dh = gqa.config.head_dim
    for layer in mha_params["layers"].values():
        for proj in ("k_proj", "v_proj"):
            kernel, bias = layer["attn"][proj]["kernel"], layer["attn"][proj]["bias"]
            layer["attn"][proj]["kernel"] = jnp.repeat(kernel.reshape(kernel.shape[0], 2, dh), 2, axis=1).reshape(
                kernel.shape[0], 4 * dh)
            layer["attn"][proj]["bias"] = jnp.repeat(bias.reshape(2, dh), 2, axis=0).reshape(4 * dh)
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, mha_params)
    nnx.update(mha, state)
    ids = random_ids(3)
    mask = jnp.ones_like(ids).at[0, 6:].set(0)
    np.testing.assert_allclose(forward(mha, ids, mask), forward(gqa, ids, mask), rtol=0, atol=1e-5)
    # Repeating the other way round (tile, h % Hkv) would be a different model.
    assert gqa.config.num_kv_heads == 2 and mha.config.num_kv_heads == 4


def reference_attention_logits(model: CausalLM, ids: np.ndarray) -> np.ndarray:
    """A loop-per-head numpy transcription of the whole Qwen2 forward (float64), no masking tricks."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    c = model.config
    h_q, h_kv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    b, t = ids.shape

    def rms(x, scale):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * scale

    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, dh, 2) / dh)

    def rope(x, pos):  # x (dh,), rotate pairs (i, i + dh/2) by angle pos * inv_freq[i]
        half = dh // 2
        cos, sin = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        return np.concatenate([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])

    x = p["embed"]["embedding"][ids]
    for layer in p["layers"].values():
        a = layer["attn"]
        hn = rms(x, layer["input_norm"]["scale"])
        q = hn @ a["q_proj"]["kernel"] + a["q_proj"]["bias"]
        k = hn @ a["k_proj"]["kernel"] + a["k_proj"]["bias"]
        v = hn @ a["v_proj"]["kernel"] + a["v_proj"]["bias"]
        out = np.zeros((b, t, h_q * dh))
        for bi in range(b):
            for head in range(h_q):
                kv = head // (h_q // h_kv)
                for i in range(t):
                    qi = rope(q[bi, i, head * dh:(head + 1) * dh], i)
                    scores = np.array([qi @ rope(k[bi, j, kv * dh:(kv + 1) * dh], j) for j in range(i + 1)])
                    w = np.exp(scores / np.sqrt(dh) - (scores / np.sqrt(dh)).max())
                    w /= w.sum()
                    out[bi, i, head * dh:(head + 1) * dh] = w @ v[bi, :i + 1, kv * dh:(kv + 1) * dh]
        x = x + out @ a["o_proj"]["kernel"]
        hn = rms(x, layer["post_attention_norm"]["scale"])
        m = layer["mlp"]
        gate = hn @ m["gate_proj"]["kernel"]
        x = x + ((gate / (1 + np.exp(-gate))) * (hn @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = rms(x, p["final_norm"]["scale"])
    return x @ p["embed"]["embedding"].T


def test_forward_matches_a_per_head_loop_reference():
    model = tiny_model("qwen2", seed=5)
    ids = np.asarray(random_ids(5, (2, 6)))
    np.testing.assert_allclose(forward(model, jnp.asarray(ids)), reference_attention_logits(model, ids),
                               rtol=0, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.integers(0, 2**31 - 1),
       st.sampled_from([(8, 8), (16, 4), (32, 8)]))
def test_rope_is_a_rotation_that_sees_only_relative_position(p1, p2, seed, dims):
    """<R(p1) q, R(p2) k> depends on p1 - p2 only, and |R(p) q| = |q| (Su et al. 2021, §3.4)."""
    head_dim, rotary_dim = dims
    q, k = np.random.default_rng(seed).normal(size=(2, 1, 1, 1, head_dim))
    shift = 37

    def rot(x, pos):
        cos, sin = rotary_cos_sin(jnp.array([pos]), rotary_dim, 10000.0)
        return np.asarray(apply_rotary(jnp.asarray(x, jnp.float32), cos, sin), np.float64).ravel()

    dot = rot(q, p1) @ rot(k, p2)
    np.testing.assert_allclose(dot, rot(q, p1 + shift) @ rot(k, p2 + shift), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(rot(q, p1)), np.linalg.norm(q), rtol=1e-5)
    np.testing.assert_array_equal(rot(q, p1)[rotary_dim:], q.ravel()[rotary_dim:].astype(np.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_functional_view_jit_and_grad_match_finite_differences(arch):
    config = TransformerConfig.tiny(arch, vocab_size=V, hidden_size=16, num_heads=2,
                                    num_kv_heads=1 if arch == "qwen2" else None, intermediate_size=24,
                                    num_layers=1, initializer_range=0.3)
    model = CausalLM(config, rngs=nnx.Rngs(6), dtype=jnp.float64, param_dtype=jnp.float64)
    apply_fn, params = functional(model)
    ids = random_ids(6, (2, 5))
    logits = forward(model, ids)
    assert logits.dtype == jnp.float64
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), params)
    eps = 1e-5

    def loss(p):
        return jnp.sum(jnp.sin(apply_fn(p, ids)))  # a nonlinear scalar of every logit

    @jax.jit  # one compile for all the quantities compared
    def quantities(p, d):
        grads = jax.grad(loss)(p)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
        finite_diff = (loss(jax.tree.map(lambda x, v: x + eps * v, p, d))
                       - loss(jax.tree.map(lambda x, v: x - eps * v, p, d))) / (2 * eps)
        _, tangent = jax.jvp(loss, (p,), (d,))  # forward mode, as the eNTK code uses it
        return apply_fn(p, ids), analytic, finite_diff, tangent

    functional_logits, analytic, finite_diff, tangent = quantities(params, direction)
    np.testing.assert_allclose(functional_logits, logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(finite_diff, analytic, rtol=1e-6)
    np.testing.assert_allclose(tangent, analytic, rtol=1e-10)


def test_tied_embeddings_share_one_parameter():
    tied = tiny_model("qwen2", seed=7, tie_word_embeddings=True)
    untied = tiny_model("qwen2", seed=7, tie_word_embeddings=False)
    assert tied.lm_head is None
    n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
    assert n_untied - n_tied == V * tied.config.hidden_size
    apply_fn, params = functional(tied)
    ids = jnp.array([[1, 2, 3, 4]], jnp.int32)  # token 40 is never an input ...
    grad = jax.jit(jax.grad(lambda p: apply_fn(p, ids)[0, -1, 40]))(params)["embed"]["embedding"]
    # ... so its embedding row gets gradient only as the output head: the head is that same row.
    assert np.abs(np.asarray(grad[40])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(grad[41]), 0.0)


def test_remat_changes_nothing_but_memory():
    model = tiny_model("gpt_neox", seed=8)  # the remat wrapper is the same for both architectures
    remat_model = nnx.merge(*_with_config(model, dataclasses.replace(model.config, remat=True)))
    ids = random_ids(8, (2, 6))
    f0, p0 = functional(model)
    f1, p1 = functional(remat_model)
    g0 = jax.jit(jax.grad(lambda p: f0(p, ids).std()))(p0)
    g1 = jax.jit(jax.grad(lambda p: f1(p, ids).std()))(p1)
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)


def _with_config(model: CausalLM, config: TransformerConfig):
    fresh = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(fresh)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
    return graphdef, state


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_compute_is_close_and_returns_float32(arch):
    model = tiny_model(arch, seed=9)
    model16 = CausalLM(model.config, rngs=nnx.Rngs(9), dtype=jnp.bfloat16)  # same init, bf16 compute
    ids = random_ids(9)
    ref, out = forward(model, ids, jnp.ones_like(ids)), forward(model16, ids, jnp.ones_like(ids))
    assert out.dtype == jnp.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_config_round_trip(arch):
    config = TransformerConfig.tiny(arch, vocab_size=V, bos_token_id=1, eos_token_id=2)
    assert TransformerConfig.from_hf_dict(config.to_hf_dict()) == config


def test_hf_config_reads_legacy_field_names():
    pythia = dict(model_type="gpt_neox", vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                  num_attention_heads=8, intermediate_size=2048, rotary_pct=0.25, rotary_emb_base=10000,
                  use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5, rope_scaling=None,
                  eos_token_id=0, bos_token_id=0, tie_word_embeddings=False)
    c = TransformerConfig.from_hf_dict(pythia)
    assert (c.rotary_dim, c.head_dim, c.parallel_residual, c.norm_eps) == (16, 64, True, 1e-5)
    qwen = dict(model_type="qwen2", vocab_size=151936, hidden_size=1024, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
                eos_token_id=[151643, 151645])
    c = TransformerConfig.from_hf_dict(qwen)
    assert (c.rope_theta, c.num_kv_heads, c.tie_word_embeddings, c.eos_token_id) == (1e6, 16, True, 151643)


@pytest.mark.parametrize("bad, match", [
    (dict(arch="llama"), "arch='llama'"),
    (dict(hidden_size=30), "not divisible by num_heads"),
    (dict(num_kv_heads=3), "not a multiple of num_kv_heads"),
    (dict(rotary_pct=0.1), "must be even"),
    (dict(hidden_act="gelu_fast_nope"), "hidden_act"),
    (dict(parallel_residual=True), "sequential residual"),
    (dict(hidden_size=64.0), r"hidden_size=64\.0 must be a positive int"),
    (dict(num_layers=0), "num_layers=0 must be a positive int"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(TransformerConfigError, match=match):
        TransformerConfig.tiny("qwen2", **bad) if "arch" not in bad else TransformerConfig(**bad)


def test_bad_hf_config_is_a_clear_error():
    with pytest.raises(TransformerConfigError, match=r"model_type='bert'.*supported"):
        TransformerConfig.from_hf_dict({"model_type": "bert"})
    with pytest.raises(TransformerConfigError, match="missing field 'hidden_size'"):
        TransformerConfig.from_hf_dict({"model_type": "qwen2", "vocab_size": 10})
    base = TransformerConfig.tiny("qwen2").to_hf_dict()
    with pytest.raises(TransformerConfigError, match="rope_type='linear'"):
        TransformerConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(TransformerConfigError, match="use_sliding_window"):
        TransformerConfig.from_hf_dict({**base, "use_sliding_window": True})


def test_model_side_errors_are_not_the_training_engine_s():
    # One name, one meaning: the model-side errors must not be confused with ldjax.train's.
    from ldjax.train.checkpoint import CheckpointError
    from ldjax.train.config import ConfigError
    assert not issubclass(TransformerConfigError, ConfigError) and not issubclass(ConfigError, TransformerConfigError)
    assert not issubclass(PretrainedFormatError, CheckpointError)
    assert issubclass(TransformerConfigError, ValueError) and issubclass(PretrainedFormatError, ValueError)


def test_bad_inputs_are_clear_errors():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"integer array \(B, T\)"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"integer array \(B, T\)"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) != input_ids shape \(2, 3\)"):
        model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32))


def test_token_ids_outside_the_vocabulary_are_refused_when_concrete():
    model = tiny_model("qwen2")
    v = model.config.vocab_size
    ids = np.zeros((2, 5), np.int32)
    ids[1, 3] = v  # one past the end: jnp.take would give a NaN embedding row
    with pytest.raises(ValueError, match=rf"input_ids\[1, 3\] = {v} is outside the vocabulary \[0, {v}\) \(1 such"):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = -1 is outside"):
        model(jnp.asarray(ids))
    ids[1, 3] = v - 1  # the last valid id is fine, and so is the same call under jit
    eager = model(ids)
    jitted = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert np.isfinite(np.asarray(eager)).all()
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-6)


def test_sequence_longer_than_max_positions_is_refused_even_under_jit():
    cfg = TransformerConfig.tiny("gpt_neox", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                 intermediate_size=32, max_position_embeddings=6)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 6), jnp.int32)).shape == (1, 6, 32)  # exactly the limit is fine
    with pytest.raises(ValueError, match="T=7 exceeds the model's max_position_embeddings=6"):
        model(jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="T=7 exceeds"):  # T is static, so jit cannot hide it
        nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 7), jnp.int32))


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_kv_cached_decoding_equals_the_full_forward(arch, dtype):
    """prefill + decode token by token, rows at different positions (ragged prompts), gives the
    logits of the full forward pass on the grown sequences; float64 to 1e-12, float32 to 2e-5."""
    config = TransformerConfig.tiny(arch, vocab_size=V, hidden_size=32, intermediate_size=64, initializer_range=0.2)
    model = CausalLM(config, rngs=nnx.Rngs(3), dtype=dtype, param_dtype=dtype)
    lengths = np.array([2, 5, 3])
    new = 4
    L = int(lengths.max()) + new
    full = np.asarray(random_ids(11, (3, L)))   # the sequences the decode steps will have written
    prompts = np.where(np.arange(L)[None] < lengths[:, None], full, 0)
    logits0, cache = nnx.jit(lambda m, i, a: m.prefill(i, a))(
        model, jnp.asarray(prompts, jnp.int32), jnp.asarray(np.arange(L)[None] < lengths[:, None], jnp.int32))
    expected = np.asarray(forward(model, jnp.asarray(full, jnp.int32)), np.float64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=2e-5, atol=2e-5)
    rows = np.arange(3)
    np.testing.assert_allclose(np.asarray(logits0)[rows, lengths - 1], expected[rows, lengths - 1], **tol)
    decode = nnx.jit(lambda m, t, c, kv: m.decode(t, c, kv))
    for i in range(new):
        cursor = lengths + i
        step_logits, cache = decode(model, jnp.asarray(full[rows, cursor], jnp.int32), jnp.asarray(cursor), cache)
        assert step_logits.shape == (3, V)
        np.testing.assert_allclose(np.asarray(step_logits), expected[rows, cursor], **tol)
    k0, v0 = cache[0]
    assert k0.shape == (3, L, model.config.num_kv_heads, model.config.head_dim) and v0.shape == k0.shape
