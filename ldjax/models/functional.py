"""The functional view of an NNX module: ``apply_fn(params, x)`` for jit, jvp/vjp and the eNTK.

``ldjax.ntk`` and ``ldjax.dynamics`` take ``f(params, x) -> array`` as in neural-tangents; this
module turns any ``nnx.Module`` into that form via ``nnx.split``/``nnx.merge``.

The apply functions are :class:`ModuleApply` objects, equal (and of equal hash) for two
modules of the same structure: the same graph definition (which holds every static attribute,
e.g. the model config and dtypes), no non-parameter state, and the same call arguments. A
``jax.jit`` that takes one as a static argument therefore traces and compiles once per model
structure and input shape, not once per model instance: the dozens of jobs of ``ldjax
reproduce`` (every seed, every stage) share one compiled decomposition, probe pass and
reference pass.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx


class ModuleApply:
    """``apply_fn(params, x)`` of an NNX module, detached from its parameters.

    Args:
      graphdef, rest: the module's ``nnx.split(model, nnx.Param, ...)`` graph definition and
        non-parameter state (closed over as constants).
      method: name of the method to call instead of ``__call__``.
      call_kwargs: fixed keyword arguments passed on every call.
      lm_inputs: call as a causal LM, ``module(x["input_ids"], x["attention_mask"])`` with ``x``
        a mapping (the training engine's batches), instead of ``module(x)``.

    Equality and hash follow the structure (see the module docstring). When the module has
    non-parameter state (arrays), or its graph definition or a call argument is unhashable, the
    object is equal only to itself, as a closure would be: correct, just compiled per instance.
    """

    def __init__(self, graphdef: nnx.GraphDef, rest: nnx.State, *, method: str | None = None,
                 call_kwargs: Mapping[str, Any] | None = None, lm_inputs: bool = False):
        self.graphdef, self.rest, self.method, self.lm_inputs = graphdef, rest, method, lm_inputs
        self.call_kwargs = dict(call_kwargs or {})
        key = (graphdef, method, lm_inputs, tuple(sorted(self.call_kwargs.items())))
        try:
            hash(key)
        except TypeError:
            key = None
        self._key = None if jax.tree_util.tree_leaves(rest) else key
        self._hash = hash(self._key) if self._key is not None else id(self)  # jit hashes static args per call

    def module(self, params: Any) -> nnx.Module:
        """The module with ``params`` (a fresh ``nnx.merge``, safe under tracing)."""
        return nnx.merge(self.graphdef, params, self.rest)

    def __call__(self, params: Any, x: Any) -> Any:
        module = self.module(params)
        fn = getattr(module, self.method) if self.method else module
        if self.lm_inputs:
            return fn(x["input_ids"], x["attention_mask"], **self.call_kwargs)
        return fn(x, **self.call_kwargs)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, ModuleApply) and self._key is not None and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        shared = "shared by structure" if self._key is not None else "per instance"
        return f"ModuleApply({type(self.graphdef).__name__}, method={self.method!r}, lm_inputs={self.lm_inputs}, {shared})"


def functional(model: nnx.Module, *, method: str | None = None, **call_kwargs: Any) -> tuple[Callable, Any]:
    """Splits ``model`` into ``(apply_fn, params)``.

    Args:
      model: any NNX module.
      method: name of the method to call instead of ``__call__``.
      **call_kwargs: fixed keyword arguments passed on every call (e.g. ``deterministic=True``).

    Returns:
      ``apply_fn(params, x)`` – a pure function of the ``nnx.Param`` state (a pytree of arrays)
      and the input batch, a :class:`ModuleApply` – and ``params``. Non-parameter state (e.g.
      batch statistics, RNG counters) is closed over as constants.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModuleApply(graphdef, rest, method=method, call_kwargs=call_kwargs), params
