"""Small NNX image classifiers for the MNIST learning-dynamics experiments.

Both models are deterministic functions of their parameters (no dropout, no batch
normalisation), so the empirical NTK of :mod:`ldjax.ntk` is well defined for them. Turn one into
``(apply_fn, params)`` with :func:`ldjax.models.functional.functional`.

References:
  LeCun, Bottou, Bengio, Haffner (1998), "Gradient-based learning applied to document
  recognition" (LeNet-5).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _as_nhwc(x: jax.Array, image_shape: tuple[int, int]) -> jax.Array:
    """``(N, H, W)`` or ``(N, H, W, 1)`` -> ``(N, H, W, 1)``; anything else is a clear error."""
    if x.ndim == 3 and x.shape[1:] == image_shape:
        return x[..., None]
    if x.ndim == 4 and x.shape[1:] == (*image_shape, 1):
        return x
    raise ValueError(
        f"expected images of shape (N, {image_shape[0]}, {image_shape[1]}) or "
        f"(N, {image_shape[0]}, {image_shape[1]}, 1), got {tuple(x.shape)}")


class MLP(nnx.Module):
    """Fully connected ReLU network on flattened images.

    Input: ``(N, 28, 28)``, ``(N, 28, 28, 1)`` or already flat ``(N, in_features)``.
    Output: logits ``(N, num_classes)``.
    """

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (128, 64), num_classes: int = 10, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        widths = (in_features, *hidden, num_classes)
        self.in_features = in_features
        self.layers = nnx.List([
            nnx.Linear(a, b, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for a, b in zip(widths[:-1], widths[1:])
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        flat = x.reshape(n, -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects {self.in_features} features per example, got input of shape {tuple(x.shape)}")
        return self._forward(flat, record=False)[0]

    def activation_pattern(self, x: jax.Array) -> jax.Array:
        """(N, P) bool: which hidden ReLUs are on. See :meth:`LeNet.activation_pattern`."""
        return self._forward(x.reshape(x.shape[0], -1), record=True)[1]

    def _forward(self, h: jax.Array, record: bool) -> tuple[jax.Array, jax.Array | None]:
        parts = []
        for layer in self.layers[:-1]:
            a = layer(h)
            if record:
                parts.append(a > 0)
            h = jax.nn.relu(a)
        return self.layers[-1](h), (jnp.concatenate(parts, axis=1) if record else None)


class LeNet(nnx.Module):
    """LeNet-5 style convolutional network for 28×28 grey images.

    conv 5×5 (SAME) → ReLU → 2×2 max-pool → conv 5×5 (VALID) → ReLU → 2×2 max-pool → dense
    layers (``hidden``, ReLU) → dense to ``num_classes``. With the defaults this is the classic
    6/16 channels and 120/84 hidden units (61,706 parameters).

    Input: ``(N, 28, 28)`` or ``(N, 28, 28, 1)``. Output: logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, *, channels: tuple[int, int] = (6, 16),
                 hidden: Sequence[int] = (120, 84), rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        c1, c2 = channels
        self.conv1 = nnx.Conv(1, c1, (5, 5), padding="SAME", rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="VALID", rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # 28 -> pool 14 -> conv VALID 10 -> pool 5
        widths = (5 * 5 * c2, *hidden, num_classes)
        self.dense = nnx.List([
            nnx.Linear(a, b, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for a, b in zip(widths[:-1], widths[1:])
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._forward(x, record=False)[0]

    def activation_pattern(self, x: jax.Array) -> jax.Array:
        """(N, P) bool: the on/off state of every ReLU and the winner of every 2×2 max-pool window.

        While a parameter step leaves an example's pattern unchanged, its logits are a smooth
        (polynomial) function of the parameters along the step, and the first-order (eNTK)
        prediction errs by O(η²); a step that changes the pattern crosses a kink, where the
        error has an O(η) part.
        """
        return self._forward(x, record=True)[1]

    def _forward(self, x: jax.Array, record: bool) -> tuple[jax.Array, jax.Array | None]:
        parts = []
        h = _as_nhwc(x, (28, 28))
        for conv in (self.conv1, self.conv2):
            a = conv(h)
            r = jax.nn.relu(a)
            if record:
                parts += [a > 0, _pool_winners(r)]
            h = nnx.max_pool(r, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        for layer in self.dense[:-1]:
            a = layer(h)
            if record:
                parts.append(a > 0)
            h = jax.nn.relu(a)
        pattern = jnp.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1) if record else None
        return self.dense[-1](h), pattern


def _pool_winners(r: jax.Array) -> jax.Array:
    """(N, H, W, C) with even H, W -> (N, H/2, W/2, C, 4) bool: one-hot position of each 2×2
    window's maximum (the first on ties, as argmax)."""
    n, hh, ww, c = r.shape
    windows = r.reshape(n, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, hh // 2, ww // 2, c, 4)
    return jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=jnp.bool_)
