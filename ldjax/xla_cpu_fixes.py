"""Keeps XLA:CPU off a kernel family that miscompiles ldjax's eNTK in float32 (jaxlib 0.10).

Measured here (jax/jaxlib 0.10.2, x86-64): a jit-compiled NTK-vector product of a small
transformer-like function — causal attention, layer norm, GELU MLP, more than ~128 output
directions vectorised at once — returned kernels off by 7–120 % relative in float32, while
the same computation op by op, under ``jax.disable_jit()``, on jax 0.5.3 (neural-tangents'
environment) or in float64 was exact to 1e-7 / 1e-16. Turning XLA:CPU's YNNPACK *reduce*
fusions off (``--xla_cpu_experimental_ynn_fusion_type=-reduce``) gives exact kernels again,
at no measurable cost to the training step (a 1M-parameter SFT step, 2 cores: 127–147 ms
with the setting, 132–143 ms without). ``tests/test_xla_cpu_fixes.py`` holds the reproducer.

Applied by ``import ldjax`` (before JAX creates its backends), only where the flag exists
(jaxlib >= 0.10: older XLA builds abort on unknown flags) and XLA_FLAGS does not already set
it; ``LDJAX_YNN_REDUCE=keep`` opts out.
"""
from __future__ import annotations

import importlib.metadata
import os
import warnings

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
_status: dict[str, object] = {"applied": False, "reason": "not run"}


def _jaxlib_version() -> tuple[int, ...]:
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _skip_reason() -> str | None:
    if os.environ.get("LDJAX_YNN_REDUCE", "") == "keep":
        return "LDJAX_YNN_REDUCE=keep"
    if _jaxlib_version() < (0, 10):
        return f"jaxlib {'.'.join(map(str, _jaxlib_version())) or 'missing'} predates the flag"
    if "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return "XLA_FLAGS already sets xla_cpu_experimental_ynn_fusion_type"
    return None


def disable_ynn_reduce_fusion() -> bool:
    """Adds :data:`FLAG` to ``XLA_FLAGS``; returns whether it did (see :func:`status`)."""
    from ldjax.host_memory import _backends_initialized

    reason = _skip_reason()
    if reason is None and _backends_initialized():
        reason = "JAX's backends already exist (import ldjax before running JAX code)"
        warnings.warn(f"ldjax could not set {FLAG}: {reason}; float32 eNTKs of transformer-like "
                      "functions may be wrong on XLA:CPU", RuntimeWarning, stacklevel=3)
    if reason is not None:
        _status.update(applied=False, reason=reason)
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    _status.update(applied=True, reason="set in XLA_FLAGS")
    return True


def environ_without_flag(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without :data:`FLAG`, for a child process that
    may run an older jaxlib (e.g. neural-tangents' jax 0.5.3), which aborts on unknown flags."""
    env = dict(os.environ if env is None else env)
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if f != FLAG)
    return env


def status() -> dict[str, object]:
    """Whether the flag was applied and why (not)."""
    return dict(_status, flag=FLAG)
