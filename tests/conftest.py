"""Test-wide JAX settings: float64 for exactness checks, 8 host devices for sharding tests.

Kept free of flax so the neural-tangents oracle leg (jax 0.5.3) can load it too.
"""
import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from hypothesis import settings  # noqa: E402

# CI replays a fixed set of examples so a red run is reproducible; locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
