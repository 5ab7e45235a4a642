"""The functional view of an NNX module: ``apply_fn(params, x)`` for jit, jvp/vjp and the eNTK.

``ldjax.ntk`` and ``ldjax.dynamics`` take ``f(params, x) -> array`` as in neural-tangents; this
module turns any ``nnx.Module`` into that form via ``nnx.split``/``nnx.merge``.
"""
from __future__ import annotations

from typing import Any, Callable

from flax import nnx


def functional(model: nnx.Module, *, method: str | None = None, **call_kwargs: Any) -> tuple[Callable, Any]:
    """Splits ``model`` into ``(apply_fn, params)``.

    Args:
      model: any NNX module.
      method: name of the method to call instead of ``__call__``.
      **call_kwargs: fixed keyword arguments passed on every call (e.g. ``deterministic=True``).

    Returns:
      ``apply_fn(params, x)`` – a pure function of the ``nnx.Param`` state (a pytree of arrays)
      and the input batch – and ``params``. Non-parameter state (e.g. batch statistics, RNG
      counters) is closed over as constants.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p: Any, x: Any) -> Any:
        module = nnx.merge(graphdef, p, rest)
        fn = getattr(module, method) if method else module
        return fn(x, **call_kwargs)

    return apply_fn, params
