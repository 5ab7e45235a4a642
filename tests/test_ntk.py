"""ldjax.ntk against independent computations (float64).

The reference for every kernel is a brute-force one: the full-batch Jacobian of the flattened
parameters by ``jax.jacrev``, contracted into the complete ``(*out1, *out2)`` kernel, then traced
and diagonalised entry by entry with explicit index loops (no einsum-letter bookkeeping shared
with the library). neural-tangents itself is the oracle in ``tests/oracle/``.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.flatten_util import ravel_pytree

from ldjax import ntk

IMPLS = ("jacobian_contraction", "ntk_vector_products")


# --------------------------------------------------------------------------------------------
# Test functions and the brute-force reference.


def init_mlp(key, d_in, hidden, out_shape):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "hidden": {"w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
                   "b": 0.1 * jax.random.normal(k2, (hidden,))},
        "head": jax.random.normal(k3, (hidden,) + tuple(out_shape)) / np.sqrt(hidden),
    }


def mlp(params, x):
    """x (N, D) -> (N, *out_shape): a tanh layer and a multi-axis linear head."""
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return jnp.tensordot(h, params["head"], axes=1)


def full_kernel(f, params, x1, x2):
    """``(*f(x1).shape, *f(x2).shape)``: every entry of J(x1) J(x2)ᵀ on the full batches."""
    theta, unravel = ravel_pytree(params)
    j1 = jax.jacrev(lambda t: f(unravel(t), x1))(theta)
    j2 = jax.jacrev(lambda t: f(unravel(t), x2))(theta)
    return np.tensordot(np.asarray(j1), np.asarray(j2), axes=([-1], [-1]))


def reference_kernel(f, params, x1, x2, trace, diagonal):
    """neural-tangents' layout and averaging, by explicit loops over the full kernel."""
    full = full_kernel(f, params, x1, x2)
    s1 = f(params, x1).shape
    s2 = f(params, x2).shape
    d = len(s1)
    trace = sorted({a % d for a in trace})
    diagonal = sorted({a % d for a in diagonal})
    out_shape = []
    for i in range(d):
        if i in diagonal:
            out_shape.append(s1[i])
        elif i not in trace:
            out_shape += [s1[i], s2[i]]
    out = np.zeros(out_shape)
    kept = [i for i in range(d) if i not in trace]
    for idx in itertools.product(*[range(n) for n in out_shape]):
        pos = iter(idx)
        fixed1, fixed2 = {}, {}
        for i in kept:
            if i in diagonal:
                fixed1[i] = fixed2[i] = next(pos)
            else:
                fixed1[i], fixed2[i] = next(pos), next(pos)
        total = 0.0
        for t in itertools.product(*[range(s1[i]) for i in trace]):
            i1, i2 = dict(fixed1), dict(fixed2)
            for ax, v in zip(trace, t):
                i1[ax] = i2[ax] = v
            total += full[tuple(i1[i] for i in range(d)) + tuple(i2[i] for i in range(d))]
        out[idx] = total / max(1, int(np.prod([s1[i] for i in trace])))
    return out


def assert_close(a, b, rtol=1e-11):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.max(np.abs(b)), 1e-300)
    assert np.max(np.abs(a - b)) / scale < rtol, np.max(np.abs(a - b)) / scale


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = init_mlp(k[0], 4, 6, (2, 3))
    return params, jax.random.normal(k[1], (3, 4)), jax.random.normal(k[2], (2, 4))


# --------------------------------------------------------------------------------------------
# Exactness against the brute-force reference.

AXIS_CASES = [((), ()), ((-1,), (1,)), ((1, 2), ()), ((), (0, 2)), ((0, -1), (1,))]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("trace,diagonal", AXIS_CASES)
def test_matches_brute_force(setup, implementation, trace, diagonal):
    params, x1, x2 = setup
    if 0 in trace + diagonal:
        x2 = x1[::-1] + 0.3  # the batch pair is matched: N1 == N2
    got = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                            implementation=implementation)
    assert_close(got, reference_kernel(mlp, params, x1, x2, trace, diagonal))


@settings(max_examples=8, deadline=None)
@given(n1=st.integers(1, 3), n2=st.integers(1, 3), d_in=st.integers(1, 4),
       hidden=st.integers(1, 5), out_shape=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       roles=st.lists(st.sampled_from(["keep", "trace", "diag"]), min_size=3, max_size=3),
       implementation=st.sampled_from(IMPLS + ("auto",)), seed=st.integers(0, 2**16))
def test_random_shapes_and_axes(n1, n2, d_in, hidden, out_shape, roles, implementation, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_mlp(k[0], d_in, hidden, out_shape)
    d = 1 + len(out_shape)
    roles = roles[:d]
    if roles[0] != "keep":
        n2 = n1
    x1, x2 = jax.random.normal(k[1], (n1, d_in)), jax.random.normal(k[2], (n2, d_in))
    # Mix positive and negative spellings of the same axes.
    trace = tuple(i - d * (i % 2) for i, r in enumerate(roles) if r == "trace")
    diagonal = tuple(i - d * (i % 2 == 0) for i, r in enumerate(roles) if r == "diag")
    got = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                            implementation=implementation)
    assert_close(got, reference_kernel(mlp, params, x1, x2, trace, diagonal))


def test_linear_softmax_regression_closed_form():
    """z = Wᵀx + b: J(x) = [x ⊗ I, I], so K(x_o, x_u) = (x_o·x_u + 1) I_V (SPEC §1.1, §2)."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    v, d = 5, 3
    params = {"W": jax.random.normal(k[0], (d, v)), "b": jax.random.normal(k[1], (v,))}
    f = lambda p, x: x @ p["W"] + p["b"]  # noqa: E731
    xo, xu = jax.random.normal(k[2], (4, d)), jax.random.normal(k[3], (2, d))
    gram = xo @ xu.T + 1.0
    expected = gram[:, :, None, None] * jnp.eye(v)
    for impl in IMPLS:
        assert_close(ntk.empirical_ntk(f, params, xo, xu, implementation=impl), expected, 1e-13)
        # Averaged trace over the logit axis: the same scalar (the kernel is c·I).
        assert_close(ntk.empirical_ntk(f, params, xo, xu, trace_axes=(-1,), implementation=impl),
                     gram, 1e-13)
    # No bias: K = (x_o·x_u) I.
    f_nobias = lambda p, x: x @ p["W"]  # noqa: E731
    got = ntk.empirical_ntk(f_nobias, {"W": params["W"]}, xo, xu, diagonal_axes=(-1,))
    assert_close(got, jnp.broadcast_to((xo @ xu.T)[:, :, None], (4, 2, v)), 1e-13)


def _swap_pairs(kernel, shape1, trace, diagonal):
    """K(x2, x1) in K(x1, x2)'s layout: swap the two axes of every kept pair."""
    d = len(shape1)
    trace, diagonal = {a % d for a in trace}, {a % d for a in diagonal}
    perm, pos = [], 0
    for i in range(d):
        if i in trace:
            continue
        if i in diagonal:
            perm.append(pos)
            pos += 1
        else:
            perm += [pos + 1, pos]
            pos += 2
    return np.transpose(np.asarray(kernel), perm)


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("trace,diagonal", [((), ()), ((1,), (-1,))])
def test_symmetry(setup, implementation, trace, diagonal):
    params, x1, x2 = setup
    k12 = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                            implementation=implementation)
    k21 = ntk.empirical_ntk(mlp, params, x2, x1, trace_axes=trace, diagonal_axes=diagonal,
                            implementation=implementation)
    assert_close(k12, _swap_pairs(k21, (3, 2, 3), trace, diagonal), 1e-13)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), implementation=st.sampled_from(IMPLS))
def test_gram_is_positive_semidefinite(seed, n, implementation):
    k = jax.random.split(jax.random.PRNGKey(seed))
    params = init_mlp(k[0], 3, 4, (3,))
    x = jax.random.normal(k[1], (n, 3))
    kernel = ntk.empirical_ntk(mlp, params, x, implementation=implementation)  # (N, N, V, V)
    gram = np.transpose(np.asarray(kernel), (0, 2, 1, 3)).reshape(n * 3, n * 3)
    np.testing.assert_allclose(gram, gram.T, rtol=0, atol=1e-12 * np.abs(gram).max())
    eig = np.linalg.eigvalsh(gram)
    assert eig.min() >= -1e-10 * max(eig.max(), 1e-300)


def test_implementations_agree_with_x2_none(setup):
    params, x1, _ = setup
    a = ntk.empirical_ntk(mlp, params, x1, implementation="jacobian_contraction")
    b = ntk.empirical_ntk(mlp, params, x1, x1, implementation="ntk_vector_products")
    assert_close(a, b, 1e-13)
    assert_close(ntk.empirical_ntk(mlp, params, x1), a, 1e-13)


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("trace,diagonal", [((), ()), ((-1,), (0,)), ((0,), ())])
def test_batch_size_chunking_is_identical(implementation, trace, diagonal):
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    params = init_mlp(k[0], 3, 4, (2, 2))
    x1, x2 = jax.random.normal(k[1], (5, 3)), jax.random.normal(k[2], (5, 3))
    whole = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                              implementation=implementation)
    for bs in (2, 8):
        chunked = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                                    implementation=implementation, batch_size=bs)
        assert_close(chunked, whole, 1e-14)
    # x2=None with chunks: off-diagonal blocks pair different chunks of x1.
    assert_close(ntk.empirical_ntk(mlp, params, x1, implementation=implementation, batch_size=2),
                 ntk.empirical_ntk(mlp, params, x1, x1, implementation=implementation), 1e-14)


@pytest.mark.parametrize("trace,diagonal", [((), ()), ((-1,), (0,)), ((0,), ())])
def test_basis_batch_size_is_identical(trace, diagonal):
    """Output directions in sequential batches (ragged last one included) give the same kernel."""
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    params = init_mlp(k[0], 3, 4, (2, 3))  # 6 output directions per example
    x1, x2 = jax.random.normal(k[1], (3, 3)), jax.random.normal(k[2], (3, 3))
    whole = reference_kernel(mlp, params, x1, x2, trace, diagonal)
    for bs in (1, 4, 6):
        got = ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=trace, diagonal_axes=diagonal,
                                implementation="ntk_vector_products", basis_batch_size=bs)
        assert_close(got, whole, 1e-13)


def test_sequence_outputs_and_pytree_inputs():
    """A causal mixing model with (N, T, V) outputs and a dict input: examples stay
    independent, positions interact (position t sees positions ≤ t)."""
    k = jax.random.split(jax.random.PRNGKey(4), 4)
    t, d, v = 3, 2, 4
    params = {"emb": jax.random.normal(k[0], (d, d)), "out": jax.random.normal(k[1], (d, v))}

    def f(p, x):
        h = jnp.tanh(x["tokens"] @ p["emb"]) * x["scale"][:, None, None]
        h = jnp.cumsum(h, axis=1)  # causal mixing over positions
        return h @ p["out"]

    x1 = {"tokens": jax.random.normal(k[2], (2, t, d)), "scale": jnp.array([1.0, 2.0])}
    x2 = {"tokens": jax.random.normal(k[3], (3, t, d)), "scale": jnp.array([0.5, 1.0, 3.0])}
    for trace, diagonal in [((), ()), ((-1,), ()), ((-1,), (1,)), ((), (1, 2))]:
        ref = reference_kernel(f, params, x1, x2, trace, diagonal)
        for impl in IMPLS:
            assert_close(ntk.empirical_ntk(f, params, x1, x2, trace_axes=trace,
                                           diagonal_axes=diagonal, implementation=impl), ref)


def test_nnx_state_params_and_float32():
    from flax import nnx

    from ldjax.models.functional import functional

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 5, rngs=rngs)
            self.b = nnx.Linear(5, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.gelu(self.a(x)))

    apply_fn, params = functional(Net(nnx.Rngs(0)))
    x1 = jax.random.normal(jax.random.PRNGKey(5), (3, 3), jnp.float32)
    x2 = jax.random.normal(jax.random.PRNGKey(6), (2, 3), jnp.float32)
    kernels = [ntk.empirical_ntk(apply_fn, params, x1, x2, implementation=i) for i in IMPLS]
    for kernel in kernels:
        assert kernel.dtype == jnp.float32 and kernel.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(kernels[0], kernels[1], rtol=1e-4, atol=1e-5)
    params64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    f64 = lambda p, x: apply_fn(p, x.astype(jnp.float64))  # noqa: E731
    np.testing.assert_allclose(kernels[0], reference_kernel(f64, params64, x1, x2, (), ()),
                               rtol=1e-4, atol=1e-5)


def test_under_jit_matches_eager(setup):
    params, x1, x2 = setup
    jitted = jax.jit(functools.partial(ntk.empirical_ntk, mlp, trace_axes=(-1,)))
    assert_close(jitted(params, x1, x2), ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=(-1,)),
                 1e-14)


def test_auto_choice_follows_cost_model(setup):
    params, x1, x2 = setup
    costs = ntk.estimate_costs(mlp, params, x1, x2)
    assert costs["params"] == 4 * 6 + 6 + 6 * 2 * 3
    assert costs["forward_flops"] > 0
    assert costs["choice"] == min(ntk.IMPLEMENTATIONS[1:3], key=costs.__getitem__)
    # Few outputs, a forward far costlier than the parameter count (weight sharing):
    # contraction wins; many outputs on a cheap dense net: vector products win.
    shared = lambda p, x: jnp.tanh(jnp.einsum("nsd,de->nse", x, p["w"])).sum((1, 2))[:, None]  # noqa: E731,E501
    xs = jnp.ones((4, 512, 8))
    assert ntk.estimate_costs(shared, {"w": jnp.ones((8, 8))}, xs)["choice"] == \
        "jacobian_contraction"


# --------------------------------------------------------------------------------------------
# Implicit products.


def test_jvp_and_vjp_match_jacrev(setup):
    params, x1, _ = setup
    theta, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda t: mlp(unravel(t), x1))(theta)  # (*out, P)
    v = jax.random.normal(jax.random.PRNGKey(7), theta.shape)
    g = jax.random.normal(jax.random.PRNGKey(8), mlp(params, x1).shape)
    assert_close(ntk.jacobian_vector_product(mlp, params, x1, unravel(v)), jac @ v, 1e-13)
    vjp = ntk.vector_jacobian_product(mlp, params, x1, g)
    chex.assert_trees_all_equal_shapes(vjp, params)
    assert_close(ravel_pytree(vjp)[0], jnp.tensordot(g, jac, axes=g.ndim), 1e-13)


@pytest.mark.parametrize("n_obs,n_upd", [(3, 2), (1, 4)])
def test_kernel_vector_product_equals_contracted_kernel(n_obs, n_upd):
    k = jax.random.split(jax.random.PRNGKey(9), 4)
    params = init_mlp(k[0], 3, 5, (2, 4))
    xo, xu = jax.random.normal(k[1], (n_obs, 3)), jax.random.normal(k[2], (n_upd, 3))
    g = jax.random.normal(k[3], (n_upd, 2, 4))
    kernel = ntk.empirical_ntk(mlp, params, xo, xu)  # (No, Nu, 2, 2, 4, 4)
    explicit = jnp.einsum("ijabcd,jbd->iac", kernel, g)
    assert_close(ntk.kernel_vector_product(mlp, params, xo, xu, g), explicit, 1e-13)


# --------------------------------------------------------------------------------------------
# Errors.


def test_errors(setup):
    params, x1, x2 = setup
    with pytest.raises(ValueError, match="every axis but the batch axis"):
        ntk.empirical_ntk(mlp, params, x1, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=(3,))
    with pytest.raises(ValueError, match="out of range"):
        ntk.empirical_ntk(mlp, params, x1, x2, diagonal_axes=(-4,))
    with pytest.raises(ValueError, match="both trace_axes and diagonal_axes"):
        ntk.empirical_ntk(mlp, params, x1, x2, trace_axes=(-1,), diagonal_axes=(2,))
    with pytest.raises(ValueError, match="same size for x1 and x2"):
        ntk.empirical_ntk(mlp, params, x1, x2, diagonal_axes=(0,))
    bad = dict(params, step=jnp.array(3, jnp.int32))
    with pytest.raises(ValueError, match=r"params\['step'\].*int32"):
        ntk.empirical_ntk(mlp, bad, x1, x2)
    with pytest.raises(ValueError, match="unknown implementation 'structured'"):
        ntk.empirical_ntk(mlp, params, x1, x2, implementation="structured")
    with pytest.raises(ValueError, match="batch_size"):
        ntk.empirical_ntk(mlp, params, x1, x2, batch_size=0)
    with pytest.raises(ValueError, match="basis_batch_size must be a positive integer"):
        ntk.empirical_ntk(mlp, params, x1, x2, basis_batch_size=0)
    with pytest.raises(ValueError, match="basis_batch_size applies to"):
        ntk.empirical_ntk(mlp, params, x1, x2, implementation="jacobian_contraction",
                          basis_batch_size=2)
    with pytest.raises(ValueError, match="tangent must have the structure of params"):
        ntk.jacobian_vector_product(mlp, params, x1, {"head": params["head"]})
    wrong = jax.tree_util.tree_map(jnp.ones_like, params)
    wrong["head"] = jnp.ones((6, 2))
    with pytest.raises(ValueError, match=r"tangent\['head'\] has shape \(6, 2\)"):
        ntk.jacobian_vector_product(mlp, params, x1, wrong)
    with pytest.raises(ValueError, match="cotangent has shape"):
        ntk.vector_jacobian_product(mlp, params, x1, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="cotangent has shape"):
        ntk.kernel_vector_product(mlp, params, x1, x2, jnp.ones((3, 2, 3)))


@pytest.mark.skipif(importlib.util.find_spec("neural_tangents") is not None,
                    reason="neural-tangents is installed here; tests/oracle covers the backend")
def test_neural_tangents_backend_missing_is_a_clear_import_error(setup):
    params, x1, x2 = setup
    with pytest.raises(ImportError, match="neural-tangents"):
        ntk.empirical_ntk(mlp, params, x1, x2, implementation="neural_tangents")
