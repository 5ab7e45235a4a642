"""The MNIST models: shapes, input layouts, independent forward computations, differentiability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldjax.models.functional import functional
from ldjax.models.vision import MLP, LeNet


def _images(n, seed=0, dtype=jnp.float32):
    return jax.random.uniform(jax.random.key(seed), (n, 28, 28), dtype=dtype)


@pytest.mark.parametrize("make", [lambda r: MLP(rngs=r), lambda r: LeNet(rngs=r)], ids=["mlp", "lenet"])
def test_shapes_layouts_and_dtype(make):
    model = make(nnx.Rngs(0))
    x = _images(5)
    out = model(x)
    assert out.shape == (5, 10) and out.dtype == jnp.float32
    np.testing.assert_array_equal(model(x[..., None]), out)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with pytest.raises(ValueError, match=r"\(5, 28, 27\)|28, 27"):
        model(x[:, :, :27])


def test_lenet_parameter_count_is_lenet5():
    model = LeNet(rngs=nnx.Rngs(0))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expected = (25 * 1 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n == expected


def test_mlp_equals_numpy_forward():
    model = MLP(784, (32, 16), 10, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    x = np.asarray(_images(4, dtype=jnp.float64))
    h = x.reshape(4, -1)
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        h = h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(model(jnp.asarray(x)), h, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="784 features"):
        model(jnp.ones((2, 10)))


def test_lenet_equals_lax_conv_forward():
    """The same network written with lax.conv_general_dilated and reduce_window."""
    model = LeNet(rngs=nnx.Rngs(2), param_dtype=jnp.float64)
    x = _images(3, dtype=jnp.float64)[..., None]

    def conv(h, c, padding):
        y = jax.lax.conv_general_dilated(h, c.kernel[...], (1, 1), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + c.bias[...]

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = pool(jax.nn.relu(conv(x, model.conv1, "SAME")))
    h = pool(jax.nn.relu(conv(h, model.conv2, "VALID")))
    assert h.shape == (3, 5, 5, 16)
    h = h.reshape(3, -1)
    dense = list(model.dense)
    for layer in dense[:-1]:
        h = jax.nn.relu(h @ layer.kernel[...] + layer.bias[...])
    h = h @ dense[-1].kernel[...] + dense[-1].bias[...]
    np.testing.assert_allclose(model(x), h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MLP, LeNet])
def test_functional_apply_is_differentiable(cls):
    """functional() gives a pure apply_fn whose gradient matches a central finite difference."""
    model = cls(rngs=nnx.Rngs(3), param_dtype=jnp.float64)
    apply_fn, params = functional(model)
    x = _images(4, seed=1, dtype=jnp.float64)
    labels = jnp.arange(4) % 10

    def loss(p):
        logits = apply_fn(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    np.testing.assert_allclose(apply_fn(params, x), model(x))
    grads = jax.jit(jax.grad(loss))(params)
    leaves, treedef = jax.tree.flatten(params)
    direction = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), l.shape, l.dtype)
                                             for i, l in enumerate(leaves)])
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
    fd = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)
    assert all(jnp.any(g != 0) for g in jax.tree.leaves(grads))
