"""Tests for ldjax.dynamics: every term against autodiff, explicit vs implicit, and the O(η²) gap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from ldjax import dynamics


logit_vectors = st.integers(2, 12).flatmap(
    lambda v: hnp.arrays(np.float64, (v,), elements=st.floats(-20, 20, allow_nan=False)))


# --- a small float64 MLP in pure JAX: dict params, tanh, V = 5 ---------------------------------
def init_mlp(key, d_in=6, width=8, num_classes=5):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (d_in, width), jnp.float64) / np.sqrt(d_in),
        "b1": 0.1 * jax.random.normal(k3, (width,), jnp.float64),
        "w2": jax.random.normal(k2, (width, num_classes), jnp.float64) / np.sqrt(width),
        "b2": jnp.zeros((num_classes,), jnp.float64),
    }


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def setup():
    key = jax.random.PRNGKey(0)
    kp, ko, ku, ky = jax.random.split(key, 4)
    params = init_mlp(kp)
    x_obs = jax.random.normal(ko, (4, 6), jnp.float64)
    x_upd = jax.random.normal(ku, (3, 6), jnp.float64)
    y_upd = jax.random.randint(ky, (3,), 0, 5, dtype=jnp.int32)
    return params, x_obs, x_upd, y_upd


def jacobian_matrix(params, x):
    """(N, V, P): d logits / d flat params, by jax.jacrev (independent of ldjax.ntk)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return jax.jacrev(lambda f: mlp(unravel(f), x))(flat)


def reference_prediction(params, x_obs, x_upd, y_upd, lr, reduction="mean"):
    """−η Σ_u A K G / B with K = J_o J_uᵀ from jacrev and A, G from autodiff."""
    j_o, j_u = jacobian_matrix(params, x_obs), jacobian_matrix(params, x_upd)
    k = jnp.einsum("oip,ujp->ouij", j_o, j_u)
    a = jax.vmap(jax.jacobian(jax.nn.log_softmax))(mlp(params, x_obs))
    g = jax.vmap(jax.grad(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y)))(
        mlp(params, x_upd), y_upd)
    b = x_upd.shape[0] if reduction == "mean" else 1
    return -lr / b * jnp.einsum("oij,oujk,uk->oi", a, k, g), k


# --- A and G ------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(logit_vectors)
def test_softmax_jacobian_equals_autodiff(z):
    z = jnp.asarray(z)
    chex.assert_trees_all_close(dynamics.softmax_jacobian(z), jax.jacobian(jax.nn.log_softmax)(z), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(logit_vectors, st.data())
def test_cross_entropy_residual_equals_autodiff(z, data):
    z = jnp.asarray(z)
    y = jnp.int32(data.draw(st.integers(0, z.shape[0] - 1)))
    expected = jax.grad(lambda zz: optax.softmax_cross_entropy_with_integer_labels(zz, y))(z)
    chex.assert_trees_all_close(dynamics.cross_entropy_residual(z, y), expected, atol=1e-12)


def test_apply_softmax_jacobian_matches_matrix():
    z, dz = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 7), jnp.float64)
    expected = jnp.einsum("...ij,...j->...i", dynamics.softmax_jacobian(z), dz)
    chex.assert_trees_all_close(dynamics.apply_softmax_jacobian(z, dz), expected, atol=1e-13)


def test_batched_shapes():
    z = jnp.zeros((2, 3, 4), jnp.float64)
    chex.assert_shape(dynamics.softmax_jacobian(z), (2, 3, 4, 4))
    chex.assert_shape(dynamics.cross_entropy_residual(z, jnp.zeros((2, 3), jnp.int32)), (2, 3, 4))


# --- explicit and implicit routes --------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_implicit_prediction_equals_jacrev_reference(setup, reduction):
    params, x_obs, x_upd, y_upd = setup
    expected, _ = reference_prediction(params, x_obs, x_upd, y_upd, 0.3, reduction)
    got = dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=0.3, reduction=reduction)
    chex.assert_shape(got, (4, 5))
    chex.assert_trees_all_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_decompose_terms_and_explicit_equals_implicit(setup, reduction):
    params, x_obs, x_upd, y_upd = setup
    dec = dynamics.decompose(mlp, params, x_obs, x_upd, y_upd, lr=0.3, reduction=reduction)
    expected, k_ref = reference_prediction(params, x_obs, x_upd, y_upd, 0.3, reduction)
    chex.assert_shape([dec.A, dec.K, dec.G, dec.predicted], [(4, 5, 5), (4, 3, 5, 5), (3, 5), (4, 5)])
    chex.assert_trees_all_close(dec.K, k_ref, atol=1e-12, rtol=1e-10)
    chex.assert_trees_all_close(dec.predicted, expected, atol=1e-12, rtol=1e-10)
    implicit = dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=0.3, reduction=reduction)
    np.testing.assert_allclose(dec.predicted, implicit, atol=1e-10, rtol=0)


def test_linear_softmax_kernel_is_closed_form():
    """z = x W + b  ⇒  K(x_o, x_u) = (x_o·x_u + 1) I."""
    kw, kb, ko, ku = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w": jax.random.normal(kw, (4, 6), jnp.float64), "b": jax.random.normal(kb, (6,), jnp.float64)}
    x_obs = jax.random.normal(ko, (3, 4), jnp.float64)
    x_upd = jax.random.normal(ku, (2, 4), jnp.float64)
    y_upd = jnp.array([1, 5], jnp.int32)
    dec = dynamics.decompose(lambda p, x: x @ p["w"] + p["b"], params, x_obs, x_upd, y_upd, lr=0.1)
    expected = (x_obs @ x_upd.T + 1.0)[:, :, None, None] * jnp.eye(6)
    chex.assert_trees_all_close(dec.K, expected, atol=1e-12)


def test_prediction_for_sgd_update_equals_implicit(setup):
    params, x_obs, x_upd, y_upd = setup
    change = dynamics.optimizer_step_change(mlp, params, optax.sgd(0.05), optax.sgd(0.05).init(params),
                                            x_obs, x_upd, y_upd)
    implicit = dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=0.05)
    np.testing.assert_allclose(change.predicted, implicit, atol=1e-12)


# --- first order: the gap is O(η²) ---------------------------------------------------------------
def gap(predicted, actual):
    return float(jnp.max(jnp.abs(predicted - actual)))


@pytest.mark.parametrize("lr", [2e-2, 4e-3])
def test_sgd_gap_quarters_when_lr_halves(setup, lr):
    params, x_obs, x_upd, y_upd = setup
    gaps = []
    for eta in (lr, lr / 2):
        change = dynamics.optimizer_step_change(mlp, params, optax.sgd(eta), optax.sgd(eta).init(params),
                                                x_obs, x_upd, y_upd)
        gaps.append(gap(change.predicted, change.actual))
        # the prediction is first order: much closer than the change itself
        assert gaps[-1] < 0.1 * float(jnp.max(jnp.abs(change.actual)))
    assert 3.0 <= gaps[0] / gaps[1] <= 5.0, gaps


def test_adam_gap_quarters_when_lr_halves(setup):
    """Real Adam steps at lr and lr/2 from the same (warmed-up) moment estimates."""
    params, x_obs, x_upd, y_upd = setup
    warm = optax.adam(1e-2)
    state = warm.init(params)
    for _ in range(3):  # non-trivial first and second moments, so the update is not just lr·sign(g)
        change = dynamics.optimizer_step_change(mlp, params, warm, state, x_obs, x_upd, y_upd)
        params, state = change.new_params, change.new_opt_state
    gaps, updates = [], []
    for eta in (1e-2, 5e-3):
        change = dynamics.optimizer_step_change(mlp, params, optax.adam(eta), state, x_obs, x_upd, y_upd)
        gaps.append(gap(change.predicted, change.actual))
        updates.append(change.update)
    # Adam's update is linear in lr at fixed moments, so lr/2 is exactly the half step
    chex.assert_trees_all_close(updates[1], jax.tree_util.tree_map(lambda u: u / 2, updates[0]), rtol=1e-12)
    assert 3.0 <= gaps[0] / gaps[1] <= 5.0, gaps


def test_adam_prediction_differs_from_sgd_prediction(setup):
    """The optimizer-aware prediction is not the SGD one (preconditioned kernel)."""
    params, x_obs, x_upd, y_upd = setup
    adam = optax.adam(1e-2)
    change = dynamics.optimizer_step_change(mlp, params, adam, adam.init(params), x_obs, x_upd, y_upd)
    sgd = dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=1e-2)
    assert gap(change.predicted, sgd) > 10 * gap(change.predicted, change.actual)


def test_actual_change_is_log_softmax_difference(setup):
    params, x_obs, _, _ = setup
    new = jax.tree_util.tree_map(lambda p: p + 0.01, params)
    expected = jax.nn.log_softmax(mlp(new, x_obs)) - jax.nn.log_softmax(mlp(params, x_obs))
    chex.assert_trees_all_close(dynamics.actual_change(mlp, params, new, x_obs), expected, atol=1e-14)


def test_works_under_jit(setup):
    params, x_obs, x_upd, y_upd = setup
    f = jax.jit(lambda p: dynamics.predicted_change_sgd(mlp, p, x_obs, x_upd, y_upd, lr=0.1))
    chex.assert_trees_all_close(f(params), dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=0.1),
                                atol=1e-13)


# --- bad input --------------------------------------------------------------------------------------
def test_errors_name_the_problem(setup):
    params, x_obs, x_upd, y_upd = setup
    with pytest.raises(dynamics.DynamicsInputError, match="labels shape"):
        dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd[:2], lr=0.1)
    with pytest.raises(ValueError, match="integer"):
        dynamics.cross_entropy_residual(jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="reduction"):
        dynamics.predicted_change_sgd(mlp, params, x_obs, x_upd, y_upd, lr=0.1, reduction="max")
    with pytest.raises(ValueError, match="class axis"):
        dynamics.softmax_jacobian(jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="tree structure"):
        dynamics.predicted_change_for_update(mlp, params, x_obs, {"w1": params["w1"]})
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        dynamics.predicted_change_sgd(lambda p, x: mlp(p, x)[None], params, x_obs, x_upd, y_upd, lr=0.1)
