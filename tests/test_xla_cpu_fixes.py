"""ldjax.xla_cpu_fixes: with the flag ldjax sets on import, XLA:CPU computes float32 eNTKs of a
transformer-like function exactly (without it, jaxlib 0.10's YNNPACK reduce fusions were off
by ~16 % on this very case: the reproducer)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import ldjax
from ldjax import ntk, xla_cpu_fixes


def _layer_norm(h):
    m = h.mean(-1, keepdims=True)
    return (h - m) * jax.lax.rsqrt(((h - m) ** 2).mean(-1, keepdims=True) + jnp.float32(1e-5))


def _transformer_like(p, x):
    """(N, T, d) -> (N, V): causal attention, layer norm, GELU MLP; logits at the last position."""
    t = x.shape[1]
    s = jnp.einsum("ntd,nsd->nts", x @ p["q"], x @ p["k"]) * jnp.float32(0.25)
    w = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30), axis=-1)
    h = _layer_norm(x + jnp.einsum("nts,nsd->ntd", w, x @ p["v"]))
    h = _layer_norm(h + jax.nn.gelu(h @ p["up"]) @ p["down"])
    return h[:, -1] @ p["head"]


def test_float32_ntk_vector_products_exact_on_transformer_like_function():
    k = jax.random.split(jax.random.PRNGKey(0), 9)
    d, v = 32, 512
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "up": (d, 4 * d), "down": (4 * d, d), "head": (d, v)}
    params = {n: (jax.random.normal(kk, s, jnp.float32) / np.sqrt(s[0])).astype(jnp.float32)
              for (n, s), kk in zip(shapes.items(), k)}
    x1 = jax.random.normal(k[6], (2, 16, d), jnp.float32)
    x2 = jax.random.normal(k[7], (2, 16, d), jnp.float32)
    vp = ntk.empirical_ntk(_transformer_like, params, x1, x2, implementation="ntk_vector_products")
    jc = ntk.empirical_ntk(_transformer_like, params, x1, x2, implementation="jacobian_contraction")
    assert vp.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(vp - jc)) / jnp.max(jnp.abs(jc))) < 1e-5, xla_cpu_fixes.status()


def test_applied_on_import_and_opt_out():
    status = xla_cpu_fixes.status()
    assert status["applied"] and xla_cpu_fixes.FLAG in os.environ["XLA_FLAGS"]
    code = "import os, ldjax; print(ldjax.xla_cpu_fixes.status()['reason']); print(os.environ.get('XLA_FLAGS'))"
    for user_flags, extra, reason in (("", {"LDJAX_YNN_REDUCE": "keep"}, "LDJAX_YNN_REDUCE=keep"),
                                      ("--xla_cpu_experimental_ynn_fusion_type=+dot", {}, "already sets")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": user_flags, **extra},
                             capture_output=True, text=True, check=True).stdout.split("\n")
        assert reason in out[0]
        assert out[1] == user_flags  # left exactly as the user set it


def test_child_environment_for_older_jaxlib():
    env = xla_cpu_fixes.environ_without_flag({"XLA_FLAGS": f"--a=1 {xla_cpu_fixes.FLAG} --b=2", "X": "y"})
    assert env == {"XLA_FLAGS": "--a=1 --b=2", "X": "y"}
