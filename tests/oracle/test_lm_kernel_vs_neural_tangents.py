"""The factored LM eNTK (ldjax.lm_kernel) against neural-tangents' dense eNTK of the logits.

A pure-JAX causal LM (no flax: this leg runs on jax 0.5.3): input embedding, one causal
self-attention block and a tanh MLP with residuals, a final layer norm, and a head without
bias, untied or tied to the input embedding. neural-tangents differentiates the whole model's
logits at the chosen positions; ldjax.lm_kernel builds the same kernel from (z·z')I, W M Wᵀ
and, tied, the cross terms on the context rows.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neural_tangents as nt  # conftest.py registered the TensorFlow-free stand-in

from ldjax import lm_kernel

V, D, T = 9, 6, 5


def _normal(key, shape, scale):
    return scale * jax.random.normal(key, shape, jnp.float64)


def body_fn(p, h, input_ids, attention_mask):
    """(N, T, D) input embeddings -> final-norm hidden states (N, T, D)."""
    h = h + p["pos"][: h.shape[1]]
    q, k, v = jnp.einsum("ntd,dce->cnte", h, p["qkv"])
    scores = jnp.einsum("nte,nse->nts", q, k) / jnp.sqrt(D)
    allowed = jnp.tril(jnp.ones((h.shape[1], h.shape[1]), bool))[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    weights = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    h = h + jnp.einsum("nts,nse->nte", weights, v) @ p["proj"]
    h = h + jnp.tanh(h @ p["up"] + p["b_up"]) @ p["down"]
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["shift"]


def make_parts(key, tied):
    k = jax.random.split(key, 10)
    body = {"pos": _normal(k[0], (T, D), 0.3), "qkv": _normal(k[1], (D, 3, D), D ** -0.5),
            "proj": _normal(k[2], (D, D), D ** -0.5), "up": _normal(k[3], (D, 2 * D), D ** -0.5),
            "b_up": _normal(k[4], (2 * D,), 0.1), "down": _normal(k[5], (2 * D, D), (2 * D) ** -0.5),
            "scale": 1.0 + _normal(k[6], (D,), 0.1), "shift": _normal(k[7], (D,), 0.1)}
    embedding = _normal(k[8], (V, D), 1.0)
    head = embedding if tied else _normal(k[9], (V, D), D ** -0.5)
    return lm_kernel.LMParts(body_fn=body_fn, body_params=body, embedding=embedding, head=head, tied=tied)


IDS1 = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 1, 8]])
IDS2 = np.array([[3, 8, 2, 4, 4], [3, 3, 2, 1, 6]])
MASK2 = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
POS1 = np.array([[1, 4], [0, 2]])
POS2 = np.array([[1, 2], [1, 2]])
AXES = [((), ()), ((-1,), ()), ((), (-1,)), ((-1,), (1,)), ((1,), ()), ((), (1, 2)), ((0,), (-1,)),
        ((0, 1, 2), ()), ((), (0, 1, 2))]
IMPLS = {"jacobian_contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
         "ntk_vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def case(request):
    parts = make_parts(jax.random.PRNGKey(11), request.param)
    kernel = lm_kernel.lm_ntk(parts, IDS1, IDS2, attention_mask1=np.ones_like(IDS1),
                              attention_mask2=MASK2, positions1=POS1, positions2=POS2[0])
    f, params = parts.logits_function()
    x1 = {"input_ids": jnp.asarray(IDS1), "attention_mask": jnp.ones(IDS1.shape, jnp.int32),
          "positions": jnp.asarray(POS1)}
    x2 = {"input_ids": jnp.asarray(IDS2), "attention_mask": jnp.asarray(MASK2), "positions": jnp.asarray(POS2)}
    return parts, kernel, f, params, x1, x2


@pytest.mark.parametrize("trace,diagonal,impl", [(t, d, i) for (t, d), i in itertools.product(AXES, IMPLS)])
def test_factored_equals_neural_tangents(case, trace, diagonal, impl):
    parts, kernel, f, params, x1, x2 = case
    fn = nt.empirical_ntk_fn(f, trace_axes=trace, diagonal_axes=diagonal, vmap_axes=0,
                             implementation=IMPLS[impl])
    want = np.asarray(fn(x1, x2, params))
    got = np.asarray(kernel.dense(trace, diagonal))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-10, (parts.tied, trace, diagonal, impl)


def test_matvec_equals_neural_tangents_vp(case):
    parts, kernel, f, params, x1, x2 = case
    g = jax.random.normal(jax.random.PRNGKey(5), (2, 2, V), jnp.float64)
    want = np.asarray(nt.empirical_ntk_vp_fn(f, x1, x2, params)(g))
    got = np.asarray(kernel.matvec(g))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-10, parts.tied
