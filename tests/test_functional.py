import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldjax.models.functional import functional


def test_functional_matches_module_and_differentiates():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(apply_fn(params, x), model(x))
    grads = jax.grad(lambda p: apply_fn(p, x).sum())(params)
    # d/dW sum(xW + b) = column sums of x broadcast over outputs; d/db = batch size
    np.testing.assert_allclose(grads["kernel"][...], np.repeat(x.sum(0)[:, None], 2, axis=1))
    np.testing.assert_allclose(grads["bias"][...], np.full(2, 2.0))
