"""The exact empirical neural tangent kernel (eNTK) and its implicit products.

For a function ``f(params, x) -> array`` whose leading output axis is the batch axis and whose
examples do not interact (no batch statistics), the empirical NTK between two batches is

    K(x1, x2) = J(x1) J(x2)ᵀ,      J(x) = ∂f(params, x)/∂params,

laid out exactly as ``neural_tangents.empirical_ntk_fn(f, trace_axes, diagonal_axes,
vmap_axes=0)(x1, x2, params)``: for each output axis ``i`` of ``f`` (the batch axis included), in
order, the kernel has

- no axis if ``i`` is in ``trace_axes`` (the pair is traced and then *averaged*: divided by the
  axis size, as neural-tangents does),
- one axis if ``i`` is in ``diagonal_axes`` (only the diagonal of the pair is kept),
- two axes (``f(x1)``'s then ``f(x2)``'s) otherwise.

So with no axes and logits of shape ``(N, V)`` the result is ``(N1, N2, V, V)``; with
``trace_axes=(-1,)`` it is ``(N1, N2)``; for sequence logits ``(N, T, V)`` with
``diagonal_axes=(1,)`` and ``trace_axes=(-1,)`` it is ``(N1, N2, T)``.

Two exact strategies (Novak, Sohl-Dickstein & Schoenholz, "Fast Finite Width Neural Tangent
Kernel", ICML 2022):

- ``"jacobian_contraction"``: per-example Jacobians (``jacrev`` or ``jacfwd``, whichever is
  cheaper), then one contraction over parameters;
- ``"ntk_vector_products"``: for each example pair, the kernel's rows as products
  ``J(x2) (J(x1)ᵀ e)`` with the output basis ``e`` (one VJP and one JVP each); no Jacobian is
  stored beyond the batch of parameter directions in flight.

``"auto"`` estimates both costs from the shapes and one forward pass's FLOPs (XLA cost
analysis), ``"neural_tangents"`` delegates to neural-tangents where it imports.

The implicit products (``jacobian_vector_product``, ``vector_jacobian_product``,
``kernel_vector_product``) never form ``K``; ``kernel_vector_product`` is what makes the A·K·G
decomposition affordable at LLM scale (SPEC §1.5).

This module imports only jax (no flax) so it also runs on jax 0.5.3 next to neural-tangents.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import string
import sys
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree], jax.Array]

IMPLEMENTATIONS = ("auto", "jacobian_contraction", "ntk_vector_products", "neural_tangents")


class NTKError(ValueError):
    """Invalid input to an eNTK function (shapes, axes, dtypes, implementation name)."""


# --------------------------------------------------------------------------------------------
# Input validation.


def _normalize_axes(axes: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Sorted non-negative axes of an ``ndim``-dimensional output; negative axes count from the end."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = set()
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise NTKError(f"{name} must contain integers, got {a!r}")
        if not -ndim <= a < ndim:
            raise NTKError(
                f"{name} contains axis {a}, out of range for f's output with {ndim} dimensions")
        out.add(a % ndim)
    return tuple(sorted(out))


def _check_params(params: PyTree) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise NTKError("params has no array leaves")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise NTKError(
                f"parameter leaf params{jax.tree_util.keystr(path)} has dtype {dtype}; "
                "the eNTK differentiates with respect to every leaf, so all must be floating "
                "point (close over integer state instead of passing it as a parameter)")


def _batch_size_of(x: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise NTKError(f"{name} has no array leaves")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise NTKError(f"every leaf of {name} needs the same leading batch axis, got shapes "
                       f"{[jnp.shape(leaf) for leaf in leaves]}")
    return sizes.pop()


def _check_inputs(x1: PyTree, x2: PyTree) -> None:
    s1, s2 = jax.tree_util.tree_structure(x1), jax.tree_util.tree_structure(x2)
    if s1 != s2:
        raise NTKError(f"x1 and x2 must have the same structure, got {s1} and {s2}")
    for a, b in zip(jax.tree_util.tree_leaves(x1), jax.tree_util.tree_leaves(x2)):
        if jnp.shape(a)[1:] != jnp.shape(b)[1:]:
            raise NTKError(
                f"x1 and x2 must agree on every axis but the batch axis: x1 has shape "
                f"{jnp.shape(a)}, x2 has shape {jnp.shape(b)}")


def _check_like(tree: PyTree, reference: PyTree, name: str, reference_name: str) -> None:
    s, r = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(reference)
    if s != r:
        raise NTKError(f"{name} must have the structure of {reference_name}: got {s}, expected {r}")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                            jax.tree_util.tree_leaves(reference)):
        if jnp.shape(a) != jnp.shape(b):
            raise NTKError(f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(a)}, "
                           f"expected {jnp.shape(b)} as in {reference_name}")


def _output_shape(f: ApplyFn, params: PyTree, x: PyTree, name: str) -> tuple[int, ...]:
    out = jax.eval_shape(f, params, x)
    if not hasattr(out, "shape"):
        raise NTKError(f"f(params, {name}) must return a single array, got {out}")
    if len(out.shape) == 0:
        raise NTKError(f"f(params, {name}) must return an array with a leading batch axis, "
                       "got a scalar")
    return tuple(out.shape)


# --------------------------------------------------------------------------------------------
# Kernel layout: which axes of f(x1) and f(x2) survive, and where.


def _pair_subscripts(ndim: int, trace: tuple[int, ...], diagonal: tuple[int, ...]):
    """einsum letters for the output axes of f(x1) and f(x2), and for the kernel.

    Traced and diagonal pairs share a letter; traced letters are summed, diagonal ones kept once,
    the others appear twice (x1's, then x2's) in axis order, which is neural-tangents' layout.
    """
    letters = iter(string.ascii_letters)
    sub1, sub2, out = [], [], []
    for i in range(ndim):
        a = next(letters)
        sub1.append(a)
        if i in trace or i in diagonal:
            sub2.append(a)
            if i in diagonal:
                out.append(a)
        else:
            b = next(letters)
            sub2.append(b)
            out += [a, b]
    return "".join(sub1), "".join(sub2), "".join(out), "".join(letters)


def _trace_size(shape: tuple[int, ...], trace: tuple[int, ...]) -> int:
    return math.prod(shape[i] for i in trace)


# --------------------------------------------------------------------------------------------
# The two exact strategies on one block of x1 × x2 (unnormalised: traces are sums here).


def _per_example(f: ApplyFn) -> Callable:
    """``f`` on one example: the batch axis is added before and removed after the call."""
    def f_single(params, x):
        return f(params, jax.tree_util.tree_map(lambda a: a[None], x))[0]
    return f_single


def _param_count(params: PyTree) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def _jacobians(f: ApplyFn, params: PyTree, x: PyTree, out_size: int) -> PyTree:
    """Per-example Jacobians: a params-shaped pytree, each leaf ``(N, *out, *leaf.shape)``."""
    # Reverse mode costs one pass per output entry, forward mode one per parameter.
    jac = jax.jacrev if out_size <= _param_count(params) else jax.jacfwd
    return jax.vmap(jac(_per_example(f)), in_axes=(None, 0))(params, x)


@functools.partial(jax.jit, static_argnames=("f", "trace", "diagonal", "same"))
def _jacobian_contraction_block(f, params, x1, x2, trace, diagonal, same):
    out1 = jax.eval_shape(f, params, x1).shape
    j1 = _jacobians(f, params, x1, math.prod(out1[1:]))
    j2 = j1 if same else _jacobians(f, params, x2, math.prod(out1[1:]))
    sub1, sub2, out, spare = _pair_subscripts(len(out1), trace, diagonal)

    def contract(a, b):
        # Parameter axes of this leaf: summed over, one spare letter each.
        params_sub = spare[:a.ndim - len(out1)]
        return jnp.einsum(f"{sub1}{params_sub},{sub2}{params_sub}->{out}", a, b)

    blocks = jax.tree_util.tree_leaves(jax.tree_util.tree_map(contract, j1, j2))
    return functools.reduce(jnp.add, blocks)


@functools.partial(jax.jit, static_argnames=("f", "trace", "diagonal", "basis_batch_size"))
def _ntk_vector_products_block(f, params, x1, x2, trace, diagonal, basis_batch_size=None):
    f_single = _per_example(f)

    def pair(a, b):
        # K(a, b) for one example pair: g ↦ J(a) J(b)ᵀ g is linear; evaluating its transpose
        # g' ↦ J(b) J(a)ᵀ g' on the output basis of f(a) gives the rows of K(a, b). Going
        # through jax.linear_transpose (as neural-tangents does) measured faster on CPU than
        # batching the VJPs and JVPs directly (benchmarks/results/ntk.md).
        fa, fb = (lambda p: f_single(p, a)), (lambda p: f_single(p, b))
        ya, yb = jax.eval_shape(fa, params), jax.eval_shape(fb, params)

        def kernel_times(g):
            return jax.jvp(fa, (params,), jax.vjp(fb, params)[1](g))[1]

        basis = jnp.eye(math.prod(ya.shape), dtype=ya.dtype).reshape((-1,) + ya.shape)
        row = lambda e: jax.linear_transpose(kernel_times, yb)(e)[0]  # noqa: E731
        if basis_batch_size is None:
            rows = jax.vmap(row)(basis)
        else:
            # Sequential batches of output directions: memory ~ basis_batch_size gradients.
            rows = jax.lax.map(row, basis, batch_size=basis_batch_size)
        return rows.reshape(ya.shape + yb.shape)

    # (N1, N2, *out1, *out2): every pair of examples.
    full = jax.vmap(jax.vmap(pair, (None, 0)), (0, None))(x1, x2)
    sub1, sub2, out, _ = _pair_subscripts(full.ndim // 2, trace, diagonal)
    return jnp.einsum(f"{sub1[0]}{sub2[0]}{sub1[1:]}{sub2[1:]}->{out}", full)


def _import_neural_tangents():
    """Imports neural-tangents without TensorFlow (SPEC §4): its ``experimental`` subpackage is
    replaced by an empty module before the package import."""
    if importlib.util.find_spec("neural_tangents") is None:
        raise ImportError(
            "implementation='neural_tangents' needs the neural-tangents package (0.6.5 with "
            "jax 0.5.3, see tests/oracle/requirements.txt); it is not installed here")
    name = "neural_tangents.experimental"
    added = name not in sys.modules
    if added:
        sys.modules[name] = types.ModuleType(name, "empty stand-in: keeps TensorFlow out")
    try:
        return importlib.import_module("neural_tangents")
    except Exception as e:  # noqa: BLE001 - any failure means the backend is unusable
        if added:
            sys.modules.pop(name, None)
        raise ImportError(
            f"neural-tangents is installed but does not import with jax {jax.__version__} "
            f"({type(e).__name__}: {e}); it needs jax <= 0.5.x") from e


def _neural_tangents_block(f, params, x1, x2, trace, diagonal, nt_implementation):
    nt = _import_neural_tangents()
    impl = {"jacobian_contraction": nt.NtkImplementation.JACOBIAN_CONTRACTION,
            "ntk_vector_products": nt.NtkImplementation.NTK_VECTOR_PRODUCTS}[nt_implementation]
    fn = nt.empirical_ntk_fn(f, trace_axes=trace, diagonal_axes=diagonal, vmap_axes=0,
                             implementation=impl)
    # neural-tangents averages; the blocks here are sums (normalised once, after chunking).
    return fn(x1, x2, params) * _trace_size(jax.eval_shape(f, params, x1).shape, trace)


# --------------------------------------------------------------------------------------------
# Choosing a strategy.


def _forward_flops(f: ApplyFn, params: PyTree, x: PyTree) -> float:
    """FLOPs of ``f`` on one example (XLA's cost analysis), or ``2 P`` where that is missing."""
    # Abstract shapes only, so this also works while f is being traced under jit.
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + jnp.shape(a)[1:],
                                                                jnp.result_type(a)), x)
    try:
        cost = jax.jit(f).lower(jax.tree_util.tree_map(spec, params), one).cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        flops = float(cost["flops"])
        if flops > 0:
            return flops
    except Exception:  # noqa: BLE001 - cost analysis is best-effort across jax versions
        pass
    return 2.0 * _param_count(params)


def estimate_costs(f: ApplyFn, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                   trace_axes: Sequence[int] = (), diagonal_axes: Sequence[int] = ()) -> dict:
    """Rough FLOP counts of the two exact strategies (Novak et al. 2022, Table 1).

    With ``F`` the FLOPs of one forward pass on one example, ``O`` the per-example output size,
    ``P`` the parameter count and ``C`` the contraction size after traces and diagonals:

    - Jacobian contraction: ``(N1 + N2) · min(O, P) · 3F`` for the Jacobians plus
      ``2 · N1 O1 · N2 O2 / D · P`` for contracting them (``D``: the product of traced and
      diagonal sizes, which share an index);
    - NTK-vector products: ``N1 N2 O1 · 6F`` (one VJP and one JVP per example pair and basis
      vector).

    Returns a dict with both counts and the cheaper strategy under ``"choice"``.
    """
    x2 = x1 if x2 is None else x2
    shape1 = _output_shape(f, params, x1, "x1")
    shape2 = _output_shape(f, params, x2, "x2")
    trace = _normalize_axes(trace_axes, len(shape1), "trace_axes")
    diagonal = _normalize_axes(diagonal_axes, len(shape1), "diagonal_axes")
    n1, n2 = shape1[0], shape2[0]
    o1, o2 = math.prod(shape1[1:]), math.prod(shape2[1:])
    p = _param_count(params)
    flops = _forward_flops(f, params, x1)
    shared = _trace_size(shape1, trace + diagonal)
    jc = (n1 + n2) * min(o1, p) * 3 * flops + 2 * n1 * o1 * n2 * o2 / shared * p
    vp = n1 * n2 * o1 * 6 * flops
    return {"jacobian_contraction": jc, "ntk_vector_products": vp, "forward_flops": flops,
            "params": p, "choice": "jacobian_contraction" if jc <= vp else "ntk_vector_products"}


# --------------------------------------------------------------------------------------------
# Public API.


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take(x: PyTree, s: slice, pad_to: int | None = None) -> PyTree:
    """Examples ``s`` of ``x``; with ``pad_to``, the last example is repeated up to that many so
    that every chunk has one shape (one compilation); the caller drops the padded rows."""
    def take(a):
        a = a[s]
        if pad_to is not None and a.shape[0] < pad_to:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad_to - a.shape[0], axis=0)], axis=0)
        return a
    return jax.tree_util.tree_map(take, x)


def empirical_ntk(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    trace_axes: int | Sequence[int] = (),
    diagonal_axes: int | Sequence[int] = (),
    implementation: str = "auto",
    batch_size: int | None = None,
    basis_batch_size: int | None = None,
) -> jax.Array:
    """The exact empirical NTK ``J(x1) J(x2)ᵀ`` of ``f`` at ``params``.

    Args:
      f: ``f(params, x) -> array`` with a leading batch axis on ``x`` (an array or a pytree of
        arrays) and on the output; examples must not interact (neural-tangents' ``vmap_axes=0``).
      params: any pytree of floating-point arrays (dicts, an ``nnx.State``, ...).
      x1: first batch, ``(N1, ...)``.
      x2: second batch, ``(N2, ...)`` with the same trailing shape; ``None`` means ``x1``.
      trace_axes: output axes of ``f`` (batch axis 0 included, negative allowed) whose pair is
        traced and averaged.
      diagonal_axes: output axes whose pair is reduced to its diagonal.
      implementation: ``"jacobian_contraction"``, ``"ntk_vector_products"``,
        ``"neural_tangents"`` (neural-tangents' implementation of the strategy ``"auto"``
        picks) or ``"auto"`` (the cheaper one by :func:`estimate_costs`).
      batch_size: if set, ``x1`` and ``x2`` are processed in chunks of at most this many
        examples, bounding memory; the result is identical.
      basis_batch_size: NTK-vector products only: the output directions (one VJP and one JVP
        each) are processed this many at a time instead of all at once, so memory holds that
        many parameter-sized vectors (what makes a V×V logit block of a large-vocabulary LM
        fit); the result is identical.

    Returns:
      The kernel in neural-tangents' layout: for each output axis ``i`` of ``f`` in order,
      nothing if traced, one axis if diagonal, else ``(f(x1).shape[i], f(x2).shape[i])``.
      E.g. ``(N1, N2, V, V)`` for logits ``(N, V)`` and no axes.

    Raises:
      NTKError (a ValueError): mismatched inputs, bad axes, non-float parameters, an unknown
        implementation. ImportError: ``"neural_tangents"`` where neural-tangents cannot import.
    """
    if implementation not in IMPLEMENTATIONS:
        raise NTKError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    for name, value in (("batch_size", batch_size), ("basis_batch_size", basis_batch_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise NTKError(f"{name} must be a positive integer or None, got {value!r}")
    if basis_batch_size is not None and implementation not in ("auto", "ntk_vector_products"):
        raise NTKError(f"basis_batch_size applies to implementation='ntk_vector_products', not "
                       f"{implementation!r}")
    _check_params(params)
    same = x2 is None
    x2 = x1 if same else x2
    _check_inputs(x1, x2)
    n1, n2 = _batch_size_of(x1, "x1"), _batch_size_of(x2, "x2")
    shape1 = _output_shape(f, params, x1, "x1")
    shape2 = _output_shape(f, params, x2, "x2")
    if len(shape1) != len(shape2):
        raise NTKError(f"f(x1) and f(x2) must have the same rank, got {shape1} and {shape2}")
    if shape1[0] != n1:
        raise NTKError(f"f's output must keep the batch axis first: x1 has {n1} examples, "
                       f"f(params, x1) has shape {shape1}")
    trace = _normalize_axes(trace_axes, len(shape1), "trace_axes")
    diagonal = _normalize_axes(diagonal_axes, len(shape1), "diagonal_axes")
    if set(trace) & set(diagonal):
        raise NTKError(f"axes {sorted(set(trace) & set(diagonal))} are in both trace_axes and "
                       "diagonal_axes")
    for i in trace + diagonal:
        if shape1[i] != shape2[i]:
            raise NTKError(f"traced/diagonal output axis {i} must have the same size for x1 and "
                           f"x2, got f(x1) {shape1} and f(x2) {shape2}")

    strategy = implementation
    if basis_batch_size is not None:
        strategy = "ntk_vector_products"
    elif implementation in ("auto", "neural_tangents"):
        strategy = estimate_costs(f, params, x1, x2, trace_axes=trace,
                                  diagonal_axes=diagonal)["choice"]

    def block(a, b, same_block):
        if implementation == "neural_tangents":
            return _neural_tangents_block(f, params, a, None if same_block else b, trace,
                                          diagonal, strategy)
        if strategy == "jacobian_contraction":
            return _jacobian_contraction_block(f, params, a, b, trace, diagonal, same_block)
        return _ntk_vector_products_block(f, params, a, b, trace, diagonal, basis_batch_size)

    rows, cols = _chunks(n1, batch_size), _chunks(n2, batch_size)
    if 0 in trace:
        # The batch pair is traced: only matching chunks meet, and padding would add terms.
        parts = [block(_take(x1, s), _take(x2, s), same) for s in rows]
        kernel = functools.reduce(jnp.add, parts)
    elif 0 in diagonal:
        # The batch pair is diagonal: only matching chunks meet, along kernel axis 0.
        parts = [block(_take(x1, s, batch_size), _take(x2, s, batch_size), same)[:s.stop - s.start]
                 for s in rows]
        kernel = jnp.concatenate(parts, 0)
    elif len(rows) == 1 and len(cols) == 1:
        kernel = block(x1, x2, same)
    else:
        # Kernel axes 0 and 1 are x1's and x2's batch axes.
        kernel = jnp.concatenate(
            [jnp.concatenate([block(_take(x1, r, batch_size), _take(x2, c, batch_size),
                                    same and r == c)[:r.stop - r.start, :c.stop - c.start]
                              for c in cols], axis=1)
             for r in rows], axis=0)
    return kernel / _trace_size(shape1, trace)


def jacobian_vector_product(f: ApplyFn, params: PyTree, x: PyTree, tangent: PyTree) -> jax.Array:
    """``J(x) · v``: the first-order change of ``f(params, x)`` along the parameter direction ``v``.

    Args:
      f: ``f(params, x) -> array``.
      params: pytree of floating-point arrays.
      x: the input batch.
      tangent: a pytree with the structure and leaf shapes of ``params`` (cast to their dtypes).

    Returns:
      An array shaped like ``f(params, x)``.
    """
    _check_params(params)
    _check_like(tangent, params, "tangent", "params")
    tangent = jax.tree_util.tree_map(lambda t, p: jnp.asarray(t, jnp.result_type(p)), tangent,
                                     params)
    return jax.jvp(lambda p: f(p, x), (params,), (tangent,))[1]


def vector_jacobian_product(f: ApplyFn, params: PyTree, x: PyTree, cotangent: jax.Array) -> PyTree:
    """``J(x)ᵀ · g``: pulls a cotangent on the outputs back to parameter space.

    With ``g = ∂L/∂f(params, x)`` this is the gradient ``∇_params L``.

    Args:
      f: ``f(params, x) -> array``.
      params: pytree of floating-point arrays.
      x: the input batch.
      cotangent: an array shaped like ``f(params, x)``.

    Returns:
      A pytree shaped like ``params``.
    """
    _check_params(params)
    fx, pullback = jax.vjp(lambda p: f(p, x), params)
    if jnp.shape(cotangent) != fx.shape:
        raise NTKError(f"cotangent has shape {jnp.shape(cotangent)}, expected f's output shape "
                       f"{fx.shape}")
    return pullback(jnp.asarray(cotangent, fx.dtype))[0]


def kernel_vector_product(f: ApplyFn, params: PyTree, x_obs: PyTree, x_upd: PyTree,
                          cotangent: jax.Array) -> jax.Array:
    """``K(x_obs, x_upd) · g = J(x_obs) (J(x_upd)ᵀ g)`` without forming ``K``.

    One VJP on the update batch and one JVP on the observed batch; ``K`` (of size
    ``|f(x_obs)| × |f(x_upd)|``) is never built. Equals the untraced ``empirical_ntk`` contracted
    with ``g`` over all of ``f(x_upd)``'s axes. ``f`` may mix examples here (the products are
    taken on the whole batches).

    Args:
      f: ``f(params, x) -> array``.
      params: pytree of floating-point arrays.
      x_obs: observed batch.
      x_upd: update batch.
      cotangent: ``g``, shaped like ``f(params, x_upd)`` (e.g. the loss residual ``G``).

    Returns:
      An array shaped like ``f(params, x_obs)``.
    """
    direction = vector_jacobian_product(f, params, x_upd, cotangent)
    return jacobian_vector_product(f, params, x_obs, direction)


def lm_ntk(model: Any, input_ids1: Any, input_ids2: Any = None, **kwargs: Any):
    """The exact eNTK of a causal LM in factored form, ``(z·z') I + W M Wᵀ`` (+ tied terms).

    ``model`` is an ``ldjax.models.CausalLM`` or an :class:`ldjax.lm_kernel.LMParts`; keyword
    arguments (``attention_mask1/2``, ``positions1/2``, ``chunk_size``, ``precision``) are those of
    :func:`ldjax.lm_kernel.lm_ntk_from_parts`. Returns an :class:`ldjax.lm_kernel.LMKernel`, whose
    ``.dense(trace_axes, diagonal_axes)`` equals :func:`empirical_ntk` of the model's logits
    ``(N, P, V)`` at the chosen positions, and whose ``.matvec``, ``.trace`` and ``part=`` give
    ``K·g``, ``tr K`` and the head/body/cross split without V×V blocks. Defined in
    ``ldjax.lm_kernel`` (also flax-free; a CausalLM is split with flax on demand).
    """
    from ldjax.lm_kernel import lm_ntk as _lm_ntk

    return _lm_ntk(model, input_ids1, input_ids2, **kwargs)
