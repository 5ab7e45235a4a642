"""ldjax.ntk against neural-tangents, side by side, to 1e-10 relative (float64).

Three pure-JAX models with explicit parameter dicts (no flax here: this runs on jax 0.5.3):
an MLP with logits (N, V), a small conv net with logits (N, V), and a one-layer causal
self-attention model with sequence logits (N, T, V). Every combination of ldjax's two
implementations and neural-tangents' JACOBIAN_CONTRACTION and NTK_VECTOR_PRODUCTS, over the
trace/diagonal variants meaningful for each output rank.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# conftest.py has registered the empty neural_tangents.experimental already, and turns a
# failed import into an ImportError that fails the leg.
import neural_tangents as nt

from ldjax import ntk

NT_IMPLS = {"nt_jacobian_contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
            "nt_ntk_vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}
LDJAX_IMPLS = ("jacobian_contraction", "ntk_vector_products")


def _normal(key, shape, scale):
    return scale * jax.random.normal(key, shape, jnp.float64)


# --------------------------------------------------------------------------------------------
# Models.


def mlp_model(key):
    k = jax.random.split(key, 6)
    params = {"l1": {"w": _normal(k[0], (6, 8), 6 ** -0.5), "b": _normal(k[1], (8,), 0.1)},
              "l2": {"w": _normal(k[2], (8, 8), 8 ** -0.5), "b": _normal(k[3], (8,), 0.1)},
              "out": {"w": _normal(k[4], (8, 4), 8 ** -0.5), "b": _normal(k[5], (4,), 0.1)}}

    def f(p, x):
        h = jax.nn.gelu(x @ p["l1"]["w"] + p["l1"]["b"])
        h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    return f, params, (6,)


def conv_model(key):
    k = jax.random.split(key, 4)
    params = {"conv": {"w": _normal(k[0], (3, 3, 1, 3), 1 / 3), "b": _normal(k[1], (3,), 0.1)},
              "out": {"w": _normal(k[2], (4 * 4 * 3, 5), 48 ** -0.5),
                      "b": _normal(k[3], (5,), 0.1)}}

    def f(p, x):  # x (N, 6, 6, 1) -> (N, 5)
        h = jax.lax.conv_general_dilated(x, p["conv"]["w"], (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p["conv"]["b"])
        return h.reshape(h.shape[0], -1) @ p["out"]["w"] + p["out"]["b"]

    return f, params, (6, 6, 1)


def attention_model(key, seq=4, vocab=5, d=6):
    """Token ids -> embeddings -> one causal self-attention block -> logits (N, T, V)."""
    k = jax.random.split(key, 6)
    params = {"embed": _normal(k[0], (vocab, d), 1.0),
              "pos": _normal(k[1], (seq, d), 0.3),
              "qkv": _normal(k[2], (d, 3, d), d ** -0.5),
              "proj": _normal(k[3], (d, d), d ** -0.5),
              "head": {"w": _normal(k[4], (d, vocab), d ** -0.5), "b": _normal(k[5], (vocab,), .1)}}

    def f(p, tokens):
        h = p["embed"][tokens] + p["pos"]
        q, kk, v = jnp.einsum("ntd,dce->cnte", h, p["qkv"])
        scores = jnp.einsum("nte,nse->nts", q, kk) / jnp.sqrt(d)
        causal = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        h = h + jnp.einsum("nts,nse->nte", weights, v) @ p["proj"]
        return h @ p["head"]["w"] + p["head"]["b"]

    return f, params, "tokens"


# Meaningful axis variants per output rank: (trace_axes, diagonal_axes).
AXES_2D = [((), ()), ((-1,), ()), ((), (-1,)), ((), (0,)), ((0,), ())]
AXES_3D = [((), ()), ((-1,), ()), ((), (-1,)), ((-1,), (1,)), ((1,), ()), ((), (1, 2)),
           ((0,), (-1,))]

MODELS = {"mlp": (mlp_model, AXES_2D), "conv": (conv_model, AXES_2D[:3]),
          "attention": (attention_model, AXES_3D)}


def _inputs(key, spec, n):
    if spec == "tokens":
        return jax.random.randint(key, (n, 4), 0, 5, jnp.int32)
    return jax.random.normal(key, (n,) + spec, jnp.float64)


def _cases():
    for name, (_, axes) in MODELS.items():
        for trace, diagonal in axes:
            yield pytest.param(name, trace, diagonal, id=f"{name}-trace{trace}-diag{diagonal}")


def _relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, (name, (make, _)) in enumerate(MODELS.items()):
        k = jax.random.split(jax.random.PRNGKey(100 + i), 3)
        f, params, spec = make(k[0])
        out[name] = (f, params, _inputs(k[1], spec, 3), _inputs(k[2], spec, 2),
                     _inputs(k[2], spec, 3))
    return out


@pytest.mark.parametrize("name,trace,diagonal", list(_cases()))
def test_ldjax_equals_neural_tangents(models, name, trace, diagonal):
    f, params, x1, x2, x2_square = models[name]
    if 0 in trace + diagonal:
        x2 = x2_square  # the batch pair is traced/diagonal: N1 == N2
    reference = {}
    for nt_name, impl in NT_IMPLS.items():
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=trace, diagonal_axes=diagonal,
                                         vmap_axes=0, implementation=impl))
        reference[nt_name] = fn(x1, x2, params)
    assert reference["nt_jacobian_contraction"].dtype == jnp.float64
    for impl, nt_name in itertools.product(LDJAX_IMPLS, NT_IMPLS):
        got = ntk.empirical_ntk(f, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                                implementation=impl)
        assert got.shape == reference[nt_name].shape, (impl, nt_name)
        assert got.dtype == jnp.float64
        assert _relative_error(got, reference[nt_name]) < 1e-10, (impl, nt_name)


@pytest.mark.parametrize("name", list(MODELS))
def test_x2_none_and_backend(models, name):
    """x2=None (the Gram kernel) and ldjax's own neural-tangents backend with chunking."""
    f, params, x1, _, _ = models[name]
    trace = (-1,)
    reference = nt.empirical_ntk_fn(f, trace_axes=trace, vmap_axes=0,
                                    implementation=NT_IMPLS["nt_jacobian_contraction"])(
                                        x1, None, params)
    for impl in ("auto", "neural_tangents"):
        got = ntk.empirical_ntk(f, params, x1, trace_axes=trace, implementation=impl,
                                batch_size=2)
        assert got.shape == reference.shape
        assert _relative_error(got, reference) < 1e-10, impl


def test_kernel_vector_product_matches_neural_tangents_vp(models):
    """K·g against neural-tangents' own NTK-vector product on the sequence model."""
    f, params, x1, _, _ = models["attention"]
    g = jax.random.normal(jax.random.PRNGKey(7), f(params, x1).shape, jnp.float64)
    reference = nt.empirical_ntk_vp_fn(f, x1, x1, params)(g)
    assert _relative_error(ntk.kernel_vector_product(f, params, x1, x1, g), reference) < 1e-10
