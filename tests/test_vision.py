"""The MNIST models: shapes, input layouts, independent forward computations, differentiability."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_lenet_activation_pattern_equals_a_numpy_recount():
    """ReLU signs and 2×2 max-pool winners, recomputed with lax convolutions and NumPy argmax."""
    model = LeNet(rngs=nnx.Rngs(2), param_dtype=jnp.float64)
    x = _images(3, seed=4, dtype=jnp.float64)[..., None] - 0.5

    def conv(h, c, padding):
        return jax.lax.conv_general_dilated(h, c.kernel[...], (1, 1), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + c.bias[...]

    def winners(r):
        r = np.asarray(r)
        n, hh, ww, c = r.shape
        out = np.zeros((n, hh // 2, ww // 2, c, 4), bool)
        for i in range(hh // 2):
            for j in range(ww // 2):
                window = np.stack([r[:, 2 * i, 2 * j], r[:, 2 * i, 2 * j + 1], r[:, 2 * i + 1, 2 * j],
                                   r[:, 2 * i + 1, 2 * j + 1]], axis=-1)  # (n, c, 4), row-major
                np.put_along_axis(out[:, i, j], window.argmax(-1)[..., None], True, axis=-1)
        return out

    parts, h = [], x
    for c, padding in ((model.conv1, "SAME"), (model.conv2, "VALID")):
        a = conv(h, c, padding)
        r = jax.nn.relu(a)
        parts += [np.asarray(a > 0), winners(r)]
        h = jax.lax.reduce_window(r, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(3, -1)
    for layer in list(model.dense)[:-1]:
        a = h @ layer.kernel[...] + layer.bias[...]
        parts.append(np.asarray(a > 0))
        h = jax.nn.relu(a)
    expected = np.concatenate([p.reshape(3, -1) for p in parts], axis=1)
    got = np.asarray(model.activation_pattern(x))
    assert got.dtype == np.bool_ and got.shape == expected.shape == (3, 28 * 28 * 6 * 2 + 10 * 10 * 16 * 2 + 120 + 84)
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.mean() < 1  # a real mixture of on and off units


@pytest.mark.parametrize("cls, degree", [(MLP, 3), (LeNet, 5)])
def test_logits_are_a_polynomial_along_a_step_while_the_pattern_holds(cls, degree):
    """With the activation pattern fixed, the logits along p + t·d are a polynomial in t of degree
    ≤ the number of weight layers: a fit through degree + 1 points predicts the others exactly.
    The same fit fails on a segment where the pattern changes (a kink)."""
    model = cls(rngs=nnx.Rngs(5), param_dtype=jnp.float64)
    apply_fn, params = functional(model)
    pattern_fn, _ = functional(model, method="activation_pattern")
    x = _images(2, seed=6, dtype=jnp.float64) - 0.5
    leaves, treedef = jax.tree.flatten(params)
    d = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(10 + i), l.shape, l.dtype) for i, l in enumerate(leaves)])
    # A direction as long as the parameter vector itself: t is the step's relative size.
    d = jax.tree.map(lambda v: v * (optax.tree.norm(params) / optax.tree.norm(d)), d)
    at = jax.jit(lambda t: (apply_fn(jax.tree.map(lambda p, v: p + t * v, params, d), x),
                            pattern_fn(jax.tree.map(lambda p, v: p + t * v, params, d), x)))

    def fit_error(scale):
        ts = np.linspace(0.0, scale, degree + 3)
        values, patterns = zip(*(at(t) for t in ts))
        same = all(np.array_equal(np.asarray(patterns[0]), np.asarray(p)) for p in patterns)
        y = np.stack([np.asarray(v).ravel() for v in values])          # (points, outputs)
        coef = np.polyfit(ts[:degree + 1], y[:degree + 1], degree)      # exact through degree + 1 points
        pred = np.stack([np.polyval(coef[:, k], ts[degree + 1:]) for k in range(y.shape[1])], axis=1)
        return same, float(np.max(np.abs(pred - y[degree + 1:])) / np.max(np.abs(y)))

    same, err = fit_error(1e-6)
    same_far, err_far = fit_error(0.5)
    assert same and err < 1e-9, (same, err)
    assert not same_far and err_far > 1e-6, (same_far, err_far)
