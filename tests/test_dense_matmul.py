"""dense_matmul / gelu_erf of ldjax.models.transformer against plain JAX (value, JVP, VJP)."""
import jax, jax.numpy as jnp, numpy as np
import chex
from hypothesis import given, settings, strategies as st
from ldjax.models.transformer import dense_matmul, gelu_erf


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**30))
def test_dense_matmul_matches_dot_and_its_derivatives(b, t, d_in, d_out, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(k[0], (b, t, d_in), jnp.float64)
    w = jax.random.normal(k[1], (d_in, d_out), jnp.float64)
    dx, dw = jax.random.normal(k[2], x.shape, jnp.float64), jax.random.normal(k[3], w.shape, jnp.float64)
    g = jax.random.normal(k[4], (b, t, d_out), jnp.float64)
    chex.assert_trees_all_close(dense_matmul(x, w), jnp.dot(x, w), rtol=1e-13, atol=1e-13)
    chex.assert_trees_all_close(jax.jvp(dense_matmul, (x, w), (dx, dw)), jax.jvp(jnp.dot, (x, w), (dx, dw)), rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(jax.vjp(dense_matmul, x, w)[1](g), jax.vjp(jnp.dot, x, w)[1](g), rtol=1e-12, atol=1e-12)


def test_gelu_erf_is_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001, dtype=jnp.float64)
    chex.assert_trees_all_close(gelu_erf(x), jax.nn.gelu(x, approximate=False), atol=1e-15)
    chex.assert_trees_all_close(jax.vmap(jax.grad(gelu_erf))(x), jax.vmap(jax.grad(lambda z: jax.nn.gelu(z, approximate=False)))(x), atol=1e-14)
