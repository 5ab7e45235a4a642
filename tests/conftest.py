"""Test-wide JAX settings: float64 for exactness checks, 8 host devices for sharding tests.

Kept free of flax so the neural-tangents oracle leg (jax 0.5.3) can load it too.
"""
import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
