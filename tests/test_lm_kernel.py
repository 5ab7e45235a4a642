"""The factored LM eNTK (ldjax.lm_kernel) against the dense eNTK of the same model (float64).

Independent references: ``ldjax.ntk.empirical_ntk`` of the model's logits (itself held
against brute-force Jacobians in test_ntk.py and against neural-tangents in tests/oracle),
``kernel_vector_product`` (one VJP + one JVP of the logits), and eNTKs taken over the head
parameter alone / the body alone to check the head–body split term by term. The trace and
diagonal layouts of all 27 axis variants are checked against a numpy reduction of the full
kernel written with np.trace/np.diagonal (no einsum letters shared with the library).
"""
from __future__ import annotations

import itertools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from ldjax import lm_kernel, ntk
from ldjax.models.transformer import CausalLM, TransformerConfig

V = 11
MODELS = {
    "gpt_neox_untied": dict(arch="gpt_neox"),
    "qwen2_tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen2_untied": dict(arch="qwen2", tie_word_embeddings=False),
}


def _model(name, seed=0):
    kw = dict(MODELS[name])
    cfg = TransformerConfig.tiny(kw.pop("arch"), vocab_size=V, hidden_size=32, intermediate_size=48,
                                 num_layers=1, **kw)
    model = CausalLM(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.float64, dtype=jnp.float64)
    # Norm scales away from 1 and nonzero biases: every parameter matters to the kernel.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


IDS1 = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 1, 9]])
IDS2 = np.array([[3, 9, 2, 4, 4], [3, 3, 2, 1, 8]])
MASK2 = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
POS1 = np.array([[1, 4], [0, 2]])  # per-row positions
POS2 = np.array([1, 2])  # shared positions


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model = _model(request.param)
    parts = lm_kernel.causal_lm_parts(model)
    f, params = parts.logits_function()
    x1 = {"input_ids": jnp.asarray(IDS1), "positions": jnp.asarray(POS1)}
    x2 = {"input_ids": jnp.asarray(IDS2), "attention_mask": jnp.asarray(MASK2),
          "positions": jnp.asarray(np.broadcast_to(POS2, (2, 2)))}
    kernel = ntk.lm_ntk(model, IDS1, IDS2, attention_mask2=MASK2, positions1=POS1, positions2=POS2)
    x1_masked = dict(x1, attention_mask=jnp.ones_like(x1["input_ids"]))
    full = ntk.empirical_ntk(f, params, x1_masked, x2, implementation="jacobian_contraction")
    return request.param, model, parts, f, params, x1_masked, x2, kernel, full


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reduce(full, trace, diagonal):
    """neural-tangents' layout from the (N1, N2, P1, P2, V1, V2) kernel, axis by axis."""
    out = np.asarray(full)
    # Axis i of f's output sits at positions (2i, 2i+1) of `full`; reduce from the last axis
    # backwards so earlier positions stay valid.
    for i in (2, 1, 0):
        a, b = 2 * i, 2 * i + 1
        if i in trace:
            out = np.trace(out, axis1=a, axis2=b) / full.shape[a]
        elif i in diagonal:
            out = np.moveaxis(np.diagonal(out, axis1=a, axis2=b), -1, a)
    return out


AXIS_VARIANTS = [
    (tuple(i for i, c in enumerate(combo) if c == "trace"), tuple(i for i, c in enumerate(combo) if c == "diag"))
    for combo in itertools.product(("none", "trace", "diag"), repeat=3)
]


def test_dense_equals_empirical_ntk_untraced(case):
    name, *_, kernel, full = case
    dense = kernel.dense()
    assert dense.shape == full.shape == (2, 2, 2, 2, V, V)
    assert dense.dtype == jnp.float64
    assert _rel(dense, full) < 1e-10, name


@pytest.mark.parametrize("trace,diagonal", AXIS_VARIANTS, ids=[f"t{t}-d{d}" for t, d in AXIS_VARIANTS])
def test_every_axis_variant(case, trace, diagonal):
    name, *_, kernel, full = case
    got = kernel.dense(trace, diagonal)
    want = _reduce(full, trace, diagonal)
    assert got.shape == want.shape, (name, trace, diagonal)
    assert _rel(got, want) < 1e-10, (name, trace, diagonal)


@pytest.mark.parametrize("trace,diagonal", [((-1,), ()), ((), (1, 2)), ((2,), (0, 1))])
def test_axis_variants_direct(case, trace, diagonal):
    """A few variants straight from empirical_ntk with the axes (not via the full kernel)."""
    name, _, _, f, params, x1, x2, kernel, _ = case
    want = ntk.empirical_ntk(f, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                             implementation="ntk_vector_products")
    assert _rel(kernel.dense(trace, diagonal), want) < 1e-10, (name, trace, diagonal)


def test_matvec_and_trace(case):
    name, _, _, f, params, x1, x2, kernel, full = case
    g = jax.random.normal(jax.random.PRNGKey(3), (2, 2, V), jnp.float64)
    want = ntk.kernel_vector_product(f, params, x1, x2, g)
    assert _rel(kernel.matvec(g), want) < 1e-10, name
    for part in lm_kernel.PARTS:
        got = kernel.matvec(g, part=part)
        if part == "cross" and not kernel.tied:
            assert float(jnp.max(jnp.abs(got))) == 0.0
            continue
        assert _rel(got, jnp.einsum("abpqvw,bqw->apv", kernel.dense(part=part), g)) < 1e-10, (name, part)
    trace = np.trace(np.asarray(full), axis1=4, axis2=5)
    assert _rel(kernel.trace(), trace) < 1e-10
    parts_sum = sum(kernel.dense(part=p) for p in ("head", "body", "cross"))
    assert _rel(parts_sum, kernel.dense()) < 1e-12


def test_head_and_body_parts_are_the_kernels_of_their_parameters(case):
    """Untied: the head part is the eNTK w.r.t. the head alone, exactly (z·z') I; the body part
    the eNTK w.r.t. everything else. Tied: the body part is the eNTK w.r.t. body + E in its input
    role (the head a frozen copy of E), the head part w.r.t. E in its output role only."""
    name, model, parts, f, params, x1, x2, kernel, full = case
    body_fn = parts.body_fn

    def logits(body, emb_in, head, x):
        ids = x["input_ids"]
        z = body_fn(body, emb_in[ids], ids, x.get("attention_mask"))
        return lm_kernel._gather_positions(z, x["positions"]) @ head.T

    head_only = ntk.empirical_ntk(lambda w, x: logits(parts.body_params, parts.embedding, w, x),
                                  parts.head, x1, x2, implementation="jacobian_contraction")
    body_only = ntk.empirical_ntk(lambda p, x: logits(p["body"], p["emb"], parts.head, x),
                                  {"body": parts.body_params, "emb": parts.embedding}, x1, x2,
                                  implementation="jacobian_contraction")
    assert _rel(kernel.dense(part="head"), head_only) < 1e-10, name
    assert _rel(kernel.dense(part="body"), body_only) < 1e-10, name
    eye = np.eye(V)
    chex.assert_trees_all_close(np.asarray(head_only),
                                np.asarray(kernel.head_identity)[..., None, None] * eye, rtol=1e-10, atol=1e-12)
    if kernel.tied:
        assert float(jnp.max(jnp.abs(kernel.dense(part="cross")))) > 1e-6  # the cross terms are real
        # ... and live on the rows/columns of tokens that occur in the contexts
        absent = np.setdiff1d(np.arange(V), np.asarray(kernel.tokens))
        cross = np.asarray(kernel.dense(part="cross"))
        assert absent.size and np.all(cross[..., absent[:, None], absent[None, :]] == 0)
    else:
        assert float(jnp.max(jnp.abs(kernel.dense(part="cross")))) == 0.0


def test_gram_kernel_symmetric_psd_and_chunking():
    model = _model("qwen2_tied", seed=4)
    ids = np.array([[1, 2, 3, 2], [4, 0, 1, 5]])
    k = ntk.lm_ntk(model, ids, positions1=[1, 3])
    k_chunked = ntk.lm_ntk(model, ids, positions1=[1, 3], chunk_size=7)  # ragged last chunk
    for field in ("M", "row_term", "col_term", "head_identity"):
        assert _rel(getattr(k_chunked, field), getattr(k, field)) < 1e-12, field
    dense = np.asarray(k.dense())  # (2, 2, 2, 2, V, V)
    flat = dense.transpose(0, 2, 4, 1, 3, 5).reshape(2 * 2 * V, 2 * 2 * V)
    chex.assert_trees_all_close(flat, flat.T, rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(flat).min() > -1e-9 * np.abs(flat).max()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), tied=st.booleans(), scale=st.floats(-3, 3))
def test_matvec_linear_and_matches_dense(seed, tied, scale):
    """K·(s g + h) = s K·g + K·h and K·g = Σ dense·g, on random contexts and residuals."""
    model = _MODELS_BY_TIE[tied]
    rng = np.random.default_rng(seed)
    ids1, ids2 = rng.integers(0, V, (1, 4)), rng.integers(0, V, (2, 4))
    k = ntk.lm_ntk(model, ids1, ids2, positions1=[rng.integers(0, 4)], positions2=[1, 3])
    g, h = (jnp.asarray(rng.normal(size=(2, 2, V))) for _ in range(2))
    lhs = k.matvec(scale * g + h)
    chex.assert_trees_all_close(lhs, scale * k.matvec(g) + k.matvec(h), rtol=1e-9, atol=1e-9)
    chex.assert_trees_all_close(k.matvec(g), jnp.einsum("abpqvw,bqw->apv", k.dense(), g), rtol=1e-9, atol=1e-9)


_MODELS_BY_TIE = {True: _model("qwen2_tied", seed=7), False: _model("gpt_neox_untied", seed=7)}


def test_bad_input():
    model = _model("gpt_neox_untied")
    ids = np.array([[1, 2, 3]])
    with pytest.raises(lm_kernel.LMKernelError, match="vocabulary"):
        ntk.lm_ntk(model, np.array([[1, V]]))
    with pytest.raises(lm_kernel.LMKernelError, match="positions1"):
        ntk.lm_ntk(model, ids, positions1=[3])
    with pytest.raises(lm_kernel.LMKernelError, match="attention_mask1"):
        ntk.lm_ntk(model, ids, attention_mask1=np.ones((1, 2)))
    k = ntk.lm_ntk(model, ids, positions1=[0])
    with pytest.raises(lm_kernel.LMKernelError, match="part"):
        k.dense(part="tail")
    with pytest.raises(lm_kernel.LMKernelError, match=r"\(N2, P2, V\)"):
        k.matvec(jnp.zeros((1, 2, V)))
    with pytest.raises(lm_kernel.LMKernelError, match="trace_axes"):
        k.dense(trace_axes=(3,))
    with pytest.raises(lm_kernel.LMKernelError, match="causal_lm_parts"):
        lm_kernel.lm_ntk(object(), ids)
