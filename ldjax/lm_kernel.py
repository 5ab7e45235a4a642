"""The exact empirical NTK of a causal language model, factored through its output head.

The logits of a causal LM at context ``c`` are ``W z_c`` with ``z_c`` (d,) the final-norm
hidden state and ``W`` (V, d) the output head, with no bias (GPT-NeoX/Pythia, Qwen2/Qwen1.5).
Split the parameters into the head and the rest. With ``J_z(c) = ∂z_c/∂θ_body`` (d × P) and
``M(c, c') = J_z(c) J_z(c')ᵀ`` (d × d), every V×V logit block of the eNTK is exactly

- untied head:   ``K(c, c') = (z_c·z_c') I_V + W M(c, c') Wᵀ``
- tied head (the embedding matrix ``E = W`` is both the head and the input table): with
  ``D_c[u, j, :] = ∂z_c/∂E[u, j]`` (the input role, nonzero only for tokens ``u`` in c's context)
  the derivative of ``logit_c[v] = E[v]·z_c`` w.r.t. ``E[u, j]`` is ``δ_uv z_c[j] + E[v]·D_c[u, j]``,
  so the head role, the input role and their two cross terms give

      K(c, c')[v, v'] = (z_c·z_c') δ_vv' + (W M Wᵀ)[v, v']
                        + 1[v ∈ S] W[v']·R(c, c')[v] + 1[v' ∈ S] W[v]·C(c, c')[v']

  with ``M`` taken over the body *and* the input role of E, ``R(c, c')[u] = Σ_j z_c[j] D_c'[u, j]``
  and ``C(c, c')[u] = Σ_j z_c'[j] D_c[u, j]`` (d-vectors), supported on the tokens ``S`` that occur
  in the contexts.

So every V×V block is a scalar, a d×d matrix, two |S|×d matrices and W: M costs d VJPs and d
JVPs of ``z`` (forward-mode passes through the body only) instead of V of the logits, and the
input embedding enters through the |S| rows actually looked up, never through a (V, d) gradient.
The head part ``(z·z') I`` is the identity kernel of the squeezing lemma (SPEC §2): with only an
untied head trainable the lemma holds exactly at every context with ``α = η‖z_c‖²``.

:func:`lm_ntk` returns an :class:`LMKernel` holding these factors for chosen position pairs;
``LMKernel.dense(trace_axes, diagonal_axes)`` equals ``ldjax.ntk.empirical_ntk`` of
``f(params, ids) = logits (N, P, V)`` at those positions (neural-tangents' layout, traced axes
averaged), ``matvec`` is ``K·g`` without any V×V block, ``part=`` selects the head, body or
cross terms.

This module imports only jax (the :class:`LMParts` interface is plain functions and arrays);
:func:`causal_lm_parts` adapts an ``ldjax.models.CausalLM`` and imports flax when called.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
# body_fn(body_params, input_embeddings (N, T, d), input_ids (N, T), attention_mask (N, T) | None)
#   -> final-norm hidden states z (N, T, d)
BodyFn = Callable[[PyTree, jax.Array, jax.Array, Any], jax.Array]

PARTS = ("all", "head", "body", "cross")


class LMKernelError(ValueError):
    """Invalid input to the factored LM kernel (shapes, positions, axes, parts)."""


@dataclasses.dataclass(frozen=True)
class LMParts:
    """A causal LM split at its output head: ``logits = body_fn(...) @ head.T``.

    Attributes:
      body_fn: ``body_fn(body_params, input_embeddings, input_ids, attention_mask) -> z``, with
        ``input_embeddings`` (N, T, d) the looked-up input rows, ``input_ids`` (N, T) (for the
        shape and checks only) and ``z`` (N, T, d) the final-norm hidden states. Must be a pure
        function; the same object across calls lets compiled code be reused.
      body_params: pytree of floating-point arrays: every parameter except the input table and
        the head.
      embedding: (V_in, d) the input embedding table; ``input_embeddings = embedding[ids]``.
      head: (V, d) the output head W (the same array as ``embedding`` when tied).
      tied: whether the head is the embedding matrix (one parameter in two roles).
    """

    body_fn: BodyFn
    body_params: PyTree
    embedding: jax.Array
    head: jax.Array
    tied: bool

    def logits_function(self) -> tuple[Callable, PyTree]:
        """``(f, params)`` with ``f(params, x) -> logits (N, P, V)`` of the whole model, for the
        dense eNTK and implicit products: ``x`` is a dict with ``input_ids`` (N, T), optional
        ``attention_mask`` (N, T) and optional ``positions`` (N, P) int (all positions when
        absent). ``params`` holds ``body``, ``embedding`` and, untied, ``head``."""
        params = {"body": self.body_params, "embedding": self.embedding}
        if not self.tied:
            params["head"] = self.head
        body_fn, tied = self.body_fn, self.tied

        def f(p, x):
            ids = x["input_ids"]
            z = body_fn(p["body"], p["embedding"][ids], ids, x.get("attention_mask"))
            if "positions" in x:
                z = _gather_positions(z, x["positions"])
            head = p["embedding"] if tied else p["head"]
            return z @ head.T

        return f, params


def _gather_positions(z: jax.Array, positions: jax.Array) -> jax.Array:
    """z (N, T, d), positions (N, P) -> (N, P, d)."""
    return jnp.take_along_axis(z, positions[:, :, None], axis=1)


@dataclasses.dataclass(frozen=True)
class LMKernel:
    """The factors of the exact LM eNTK between positions of two batches.

    Index letters: ``a`` over examples of batch 1 (N1), ``b`` over batch 2 (N2), ``p`` over the
    chosen positions of batch 1 (P1), ``q`` over batch 2's (P2), ``k, l`` over the width d,
    ``i`` over the distinct tokens ``S`` of both batches.

    Attributes:
      z1: (N1, P1, d) final-norm hidden states at batch 1's chosen positions; z2 likewise.
      head_identity: (N1, N2, P1, P2) ``z·z'``: the head part of each block is this times I_V.
      M: (N1, N2, P1, P2, d, d) ``J_z(c) J_z(c')ᵀ`` over the body (and, tied, E's input role).
      head: (V, d) W.
      tied: whether the cross terms below are present.
      tokens: (|S|,) the distinct token ids of both batches (rows of E that enter as inputs),
        padded to a power of two by repeating the first id (the padded rows' terms are zero).
      row_term: (N1, N2, P1, P2, |S|, d) ``R`` (tied only, else None).
      col_term: (N1, N2, P1, P2, |S|, d) ``C`` (tied only, else None).
    """

    z1: jax.Array
    z2: jax.Array
    head_identity: jax.Array
    M: jax.Array
    head: jax.Array
    tied: bool
    tokens: jax.Array
    row_term: jax.Array | None = None
    col_term: jax.Array | None = None

    @property
    def vocab_size(self) -> int:
        return self.head.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N1, N2, P1, P2)."""
        return tuple(self.head_identity.shape)

    def _check_part(self, part: str) -> None:
        if part not in PARTS:
            raise LMKernelError(f"part must be one of {PARTS}, got {part!r}")

    # ---- V×V blocks, their diagonals and traces ---------------------------------------------

    def _blocks(self, part: str, mode: str) -> jax.Array:
        """(N1, N2, P1, P2, *v) with v = (V, V) for "full", (V,) for "diag", () for "trace"
        (an unnormalised sum over V). Compiled, so the V×V output is written once."""
        return _assemble(self.head_identity, self.M, self.head, self.tokens, self.row_term, self.col_term,
                         tied=self.tied, part=part, mode=mode)


    def dense(self, trace_axes: int | Sequence[int] = (), diagonal_axes: int | Sequence[int] = (),
              *, part: str = "all") -> jax.Array:
        """The kernel in neural-tangents' layout for ``f(params, ids) -> logits (N, P, V)``.

        Args:
          trace_axes: axes of ``(N, P, V)`` (negative allowed) traced and averaged, as
            ``ldjax.ntk.empirical_ntk`` / neural-tangents.
          diagonal_axes: axes reduced to their diagonal.
          part: ``"all"``, or one term: ``"head"`` (``(z·z') I``), ``"body"`` (``W M Wᵀ``),
            ``"cross"`` (tied only; zero otherwise).

        Returns:
          E.g. ``(N1, N2, P1, P2, V, V)`` with no axes, ``(N1, N2, P1, P2)`` with
          ``trace_axes=(-1,)``, ``(N1, N2, P)`` with ``trace_axes=(-1,), diagonal_axes=(1,)``.
        """
        self._check_part(part)
        trace = _axes(trace_axes, "trace_axes")
        diagonal = _axes(diagonal_axes, "diagonal_axes")
        if set(trace) & set(diagonal):
            raise LMKernelError(f"axes {sorted(set(trace) & set(diagonal))} are in both trace_axes and "
                                "diagonal_axes")
        n1, n2, p1, p2 = self.shape
        for ax, (x, y) in ((0, (n1, n2)), (1, (p1, p2))):
            if ax in trace + diagonal and x != y:
                raise LMKernelError(f"a traced or diagonal axis {ax} needs equal sizes on both sides, "
                                    f"got {x} and {y}")
        mode = "trace" if 2 in trace else "diag" if 2 in diagonal else "full"
        blocks = self._blocks(part, mode)
        sub_in, sub_out = "", ""
        for first, second, ax in (("a", "b", 0), ("p", "q", 1)):
            if ax in trace:
                sub_in += first + first
            elif ax in diagonal:
                sub_in += first + first
                sub_out += first
            else:
                sub_in += first + second
                sub_out += first + second
        v_sub = {"full": "vw", "diag": "v", "trace": ""}[mode]
        # blocks are ordered (a, b, p, q, v...); the einsum input order follows that layout.
        spec = f"{sub_in[0]}{sub_in[1]}{sub_in[2]}{sub_in[3]}{v_sub}->{sub_out}{v_sub}"
        if not trace and not diagonal:
            return blocks  # already in the layout; no copy of a possibly huge V×V grid
        kernel = jnp.einsum(spec, blocks)
        sizes = {0: n1, 1: p1, 2: self.vocab_size}
        return kernel / math.prod(sizes[a] for a in trace) if trace else kernel

    def trace(self, *, part: str = "all") -> jax.Array:
        """``tr K(c, c')`` (a sum over V, not averaged) for every pair: (N1, N2, P1, P2)."""
        self._check_part(part)
        return self._blocks(part, "trace")

    def matvec(self, g: jax.Array, *, part: str = "all") -> jax.Array:
        """``(K g)[a, p] = Σ_{b, q} K(c_ap, c_bq) g[b, q]`` without forming any V×V block.

        Args:
          g: (N2, P2, V), e.g. a loss residual on batch 2's positions.
          part: as in :meth:`dense`.

        Returns:
          (N1, P1, V). Cost ``O(N1 N2 P1 P2 (d² + |S| d) + (N1 P1 + N2 P2) V d)``.
        """
        self._check_part(part)
        n1, n2, p1, p2 = self.shape
        if tuple(jnp.shape(g)) != (n2, p2, self.vocab_size):
            raise LMKernelError(f"g must have shape (N2, P2, V) = {(n2, p2, self.vocab_size)}, "
                                f"got {tuple(jnp.shape(g))}")
        w = self.head
        out = jnp.zeros((n1, p1, self.vocab_size), jnp.result_type(g, w))
        h = g @ w  # (N2, P2, d) = Wᵀ g
        if part in ("all", "head"):
            out = out + jnp.einsum("abpq,bqv->apv", self.head_identity, g)
        if part in ("all", "body"):
            out = out + jnp.einsum("abpqkl,bql->apk", self.M, h) @ w.T
        if part in ("all", "cross") and self.tied:
            out = out.at[..., self.tokens].add(jnp.einsum("abpqik,bqk->api", self.row_term, h))
            out = out + jnp.einsum("abpqik,bqi->apk", self.col_term, g[..., self.tokens]) @ w.T
        return out


@functools.partial(jax.jit, static_argnames=("tied", "part", "mode"))
def _assemble(s, m, w, tokens, row_term, col_term, *, tied, part, mode):
    v = w.shape[0]
    shape = s.shape
    dtype = jnp.result_type(s, w)
    if mode == "full":
        # W M Wᵀ as two plain matmuls over the flattened pairs (XLA's fastest form on CPU: the
        # 6-D einsum with an identity added ran 2.5x slower), then the head's diagonal.
        if part in ("all", "body"):
            wm = jnp.einsum("vk,bkl->bvl", w, m.reshape((-1,) + m.shape[-2:]))
            out = jax.lax.dot_general(wm, w, (((2,), (1,)), ((), ()))).reshape(shape + (v, v)).astype(dtype)
        else:
            out = jnp.zeros(shape + (v, v), dtype)
        if part in ("all", "head"):
            diag = jnp.arange(v)
            out = out.at[..., diag, diag].add(s[..., None].astype(dtype))
        if part in ("all", "cross") and tied:
            out = out.at[..., tokens, :].add(jnp.einsum("abpqik,wk->abpqiw", row_term, w))
            out = out.at[..., :, tokens].add(jnp.einsum("vk,abpqik->abpqvi", w, col_term))
        return out
    out = jnp.zeros(shape + {"diag": (v,), "trace": ()}[mode], dtype)
    if part in ("all", "head"):
        out = out + (jnp.broadcast_to(s[..., None], out.shape) if mode == "diag" else s * v)
    if part in ("all", "body"):
        if mode == "diag":
            out = out + jnp.einsum("vk,abpqkl,vl->abpqv", w, m, w)
        else:
            out = out + jnp.einsum("abpqkl,kl->abpq", m, w.T @ w)
    if part in ("all", "cross") and tied:
        w_s = w[tokens]  # (|S|, d)
        if mode == "diag":
            both = jnp.einsum("abpqik,ik->abpqi", row_term + col_term, w_s)
            out = out.at[..., tokens].add(both)
        else:
            out = out + jnp.einsum("abpqik,ik->abpq", row_term + col_term, w_s)
    return out


def _axes(axes: int | Sequence[int], name: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = set()
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool) or not -3 <= a < 3:
            raise LMKernelError(f"{name} must hold axes of the logits (N, P, V), i.e. integers in "
                                f"[-3, 3); got {a!r}")
        out.add(a % 3)
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# Computing the factors.


def _features(body_fn, theta, local_ids, ids, mask, positions):
    """z at the chosen positions, as a function of θ_b = {"body", "rows"}: (N, P, d)."""
    z = body_fn(theta["body"], theta["rows"][local_ids], ids, mask)
    return _gather_positions(z, positions)


_features_jit = jax.jit(_features, static_argnames=("body_fn",))


@functools.partial(jax.jit, static_argnames=("body_fn",))
def _body_chunk(body_fn, theta, x1, x2_one, z1, basis):
    """For one example of batch 2 and a chunk of output directions e_(q, l) of its z:
    the VJPs g = J_z(c_2)ᵀ e, their JVPs through batch 1 (M's columns) and, for the tied cross
    term R, their input-row components contracted with z1.

    Returns ((C, N1, P1, d), (C, N1, P1, |S|, d)).
    """
    f2 = lambda th: _features(body_fn, th, *x2_one)[0]  # noqa: E731 - (P2, d)
    f1 = lambda th: _features(body_fn, th, *x1)  # noqa: E731 - (N1, P1, d)
    _, pull = jax.vjp(f2, theta)
    grads = jax.vmap(lambda e: pull(e)[0])(basis)  # θ_b-shaped, leading axis C
    m_cols = jax.vmap(lambda t: jax.jvp(f1, (theta,), (t,))[1])(grads)
    # R[a, p, i, l] = Σ_j z1[a, p, j] · ∂z_2[l]/∂E[S_i, j]  for the direction's l
    r = jnp.einsum("apj,cij->capi", z1, grads["rows"])
    return m_cols, r


@functools.partial(jax.jit, static_argnames=("body_fn",))
def _col_chunk(body_fn, theta, x1, tangents):
    """JVPs of batch 1's z along input-row tangents only: (C, N1, P1, d)."""
    def f1(rows):
        return _features(body_fn, {"body": theta["body"], "rows": rows}, *x1)
    return jax.vmap(lambda t: jax.jvp(f1, (theta["rows"],), (t,))[1])(tangents)


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def _tree_bytes(tree: PyTree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def _positions(positions, n: int, t: int, name: str) -> np.ndarray:
    if positions is None:
        return np.broadcast_to(np.arange(t), (n, t)).copy()
    pos = np.asarray(positions)
    if pos.ndim == 1:
        pos = np.broadcast_to(pos, (n, pos.shape[0])).copy()
    if pos.ndim != 2 or pos.shape[0] != n or pos.shape[1] == 0:
        raise LMKernelError(f"{name} must be (P,) or (N, P) = ({n}, P) with P >= 1, got shape "
                            f"{np.shape(positions)}")
    if not np.issubdtype(pos.dtype, np.integer):
        raise LMKernelError(f"{name} must hold integer positions, got dtype {pos.dtype}")
    if pos.min() < 0 or pos.max() >= t:
        raise LMKernelError(f"{name} must lie in [0, T={t}), got range [{pos.min()}, {pos.max()}]")
    return pos


def _ids(ids, name: str, vocab: int) -> np.ndarray:
    arr = np.asarray(jax.device_get(ids))
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise LMKernelError(f"{name} must be a non-empty integer array (N, T), got {arr.dtype} {arr.shape}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise LMKernelError(f"{name} must lie in the vocabulary [0, {vocab}), got range "
                            f"[{arr.min()}, {arr.max()}]")
    return arr


def lm_ntk_from_parts(parts: LMParts, input_ids1, input_ids2=None, *, attention_mask1=None,
                      attention_mask2=None, positions1=None, positions2=None,
                      chunk_size: int | None = None, max_chunk_bytes: int = 1 << 30,
                      precision: str | None = "highest") -> LMKernel:
    """The factored exact eNTK of the LM ``parts`` between positions of two batches.

    Args:
      parts: the model split at its head (:class:`LMParts`; :func:`causal_lm_parts` makes one).
      input_ids1: (N1, T1) int. input_ids2: (N2, T2) int, or None for ``input_ids1`` (with its
        mask and positions unless given).
      attention_mask1, attention_mask2: (N, T) of {0, 1} or None.
      positions1, positions2: the positions whose logits the kernel relates, (P,) shared by
        every row or (N, P) per row; None = every position.
      chunk_size: output directions of z processed per vectorised VJP/JVP batch; None picks
        the largest that keeps one batch of parameter-sized gradients under ``max_chunk_bytes``.
      precision: matmul precision inside (``"highest"``: exact float32 on TPU/GPU; None keeps
        the default).

    Returns:
      :class:`LMKernel`.

    Cost: ``N2 P2 d`` VJPs of one sequence's ``z`` and as many JVPs of batch 1's, plus
    (tied) ``N2 P2 |S|`` JVPs through the input rows; never a V-sized cotangent.
    """
    vocab_in = parts.embedding.shape[0]
    same = input_ids2 is None
    ids1 = _ids(input_ids1, "input_ids1", vocab_in)
    ids2 = ids1 if same else _ids(input_ids2, "input_ids2", vocab_in)
    if same:
        attention_mask2 = attention_mask1 if attention_mask2 is None else attention_mask2
        positions2 = positions1 if positions2 is None else positions2
    pos1 = _positions(positions1, *ids1.shape, "positions1")
    pos2 = _positions(positions2, *ids2.shape, "positions2")
    for name, mask, ids in (("attention_mask1", attention_mask1, ids1), ("attention_mask2", attention_mask2, ids2)):
        if mask is not None and tuple(np.shape(mask)) != ids.shape:
            raise LMKernelError(f"{name} has shape {tuple(np.shape(mask))}, expected {ids.shape}")
    if parts.head.ndim != 2 or parts.head.shape[1] != parts.embedding.shape[1]:
        raise LMKernelError(f"head must be (V, d) with d = {parts.embedding.shape[1]}, got {parts.head.shape}")

    distinct = np.unique(np.concatenate([ids1.ravel(), ids2.ravel()]))
    local1, local2 = np.searchsorted(distinct, ids1), np.searchsorted(distinct, ids2)
    # |S| padded to a power of two (repeats of one id, rows no input looks up, whose terms are
    # exactly zero) so that contexts with different token counts share compiled code.
    tokens = np.concatenate([distinct, np.full(_bucket(distinct.size) - distinct.size, distinct[0])])
    theta = {"body": parts.body_params, "rows": parts.embedding[jnp.asarray(tokens)]}
    mask1 = None if attention_mask1 is None else jnp.asarray(attention_mask1)
    mask2 = None if attention_mask2 is None else jnp.asarray(attention_mask2)
    x1 = (jnp.asarray(local1), jnp.asarray(ids1), mask1, jnp.asarray(pos1))
    n2, p2 = pos2.shape
    n1, p1 = pos1.shape
    d = parts.embedding.shape[1]

    ctx = jax.default_matmul_precision(precision) if precision else _null()
    with ctx:
        feats = _features_jit
        z1 = feats(parts.body_fn, theta, *x1)
        x2_all = (jnp.asarray(local2), jnp.asarray(ids2), mask2, jnp.asarray(pos2))
        z2 = z1 if same and positions2 is positions1 and attention_mask2 is attention_mask1 \
            else feats(parts.body_fn, theta, *x2_all)
        head_identity = jnp.einsum("apk,bqk->abpq", z1, z2)

        directions = p2 * d
        if chunk_size is None:
            chunk_size = max(1, min(directions, max_chunk_bytes // max(1, _tree_bytes(theta))))
        chunk_size = int(min(chunk_size, directions))
        m_cols, r_cols = [], []
        for b in range(n2):
            x2_one = tuple(None if a is None else a[b:b + 1] for a in x2_all)
            m_b, r_b = [], []
            for start in range(0, directions, chunk_size):
                idx = np.arange(start, start + chunk_size)
                valid = idx < directions
                basis = jax.nn.one_hot(np.where(valid, idx, 0), directions, dtype=z1.dtype)
                basis = (basis * valid[:, None]).reshape(chunk_size, p2, d)
                m, r = _body_chunk(parts.body_fn, theta, x1, x2_one, z1, basis)
                keep = int(valid.sum())
                m_b.append(m[:keep])
                r_b.append(r[:keep])
            m_cols.append(jnp.concatenate(m_b))  # (P2·d, N1, P1, d)
            r_cols.append(jnp.concatenate(r_b))  # (P2·d, N1, P1, |S|)
        # M[a, b, p, q, k, l]: direction (q, l) of example b, JVP output (a, p, k).
        m_all = jnp.stack(m_cols).reshape(n2, p2, d, n1, p1, d)
        big_m = jnp.transpose(m_all, (3, 0, 4, 1, 5, 2))
        row_term = col_term = None
        if parts.tied:
            r_all = jnp.stack(r_cols).reshape(n2, p2, d, n1, p1, len(tokens))
            row_term = jnp.transpose(r_all, (3, 0, 4, 1, 5, 2))  # (a, b, p, q, i, l)
            col_term = _col_terms(parts, theta, x1, z2, len(tokens), chunk_size)
    return LMKernel(z1=z1, z2=z2, head_identity=head_identity, M=big_m, head=parts.head,
                    tied=parts.tied, tokens=jnp.asarray(tokens), row_term=row_term,
                    col_term=col_term)


def _col_terms(parts: LMParts, theta, x1, z2, num_tokens: int, chunk_size: int) -> jax.Array:
    """C[a, b, p, q, i, :] = Σ_j z2[b, q, j] D_{c(a,p)}[S_i, j, :]: JVPs of batch 1's z along the
    input-row tangents ``e_i ⊗ z2[b, q]``, (N1, N2, P1, P2, |S|, d)."""
    n2, p2, d = z2.shape
    flat = z2.reshape(n2 * p2, d)
    total = n2 * p2 * num_tokens
    outs = []
    for start in range(0, total, chunk_size):
        idx = np.arange(start, start + chunk_size)
        valid = idx < total
        idx = np.where(valid, idx, 0)
        pair, token = idx // num_tokens, idx % num_tokens
        tangents = (jax.nn.one_hot(token, num_tokens, dtype=z2.dtype)[:, :, None]
                    * flat[pair][:, None, :] * valid[:, None, None])
        outs.append(_col_chunk(parts.body_fn, theta, x1, tangents)[:int(valid.sum())])
    c = jnp.concatenate(outs)  # (N2·P2·|S|, N1, P1, d)
    n1, p1 = c.shape[1:3]
    c = c.reshape(n2, p2, num_tokens, n1, p1, d)
    return jnp.transpose(c, (3, 0, 4, 1, 2, 5))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------
# ldjax's CausalLM.


class _Frozen:
    """A hashable holder of a (small) pytree, so the body function can be cached per model layout."""

    def __init__(self, tree):
        self.tree = tree
        leaves, self._def = jax.tree_util.tree_flatten(tree)
        self._key = (self._def, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and self._key == other._key


def causal_lm_parts(model) -> LMParts:
    """Splits an ``ldjax.models.CausalLM`` into :class:`LMParts` (imports flax).

    The body is every ``nnx.Param`` except ``embed`` and ``lm_head``; ``body_fn`` runs
    ``model.features`` on given input embeddings (the embedding and head never enter it).
    """
    from flax import nnx

    if not (hasattr(model, "features") and hasattr(model, "output_head")):
        raise LMKernelError(f"causal_lm_parts needs an ldjax CausalLM (features + output_head), "
                            f"got {type(model).__name__}")
    graphdef, embed, head, body, rest = nnx.split(model, nnx.PathContains("embed"),
                                                  nnx.PathContains("lm_head"), nnx.Param, ...)
    # Zero-size stand-ins: features() with input_embeddings reads neither table, and the
    # cached function must not hold the real (V, d) arrays as constants.
    empty = lambda state: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jnp.zeros((0,) + a.shape[1:], a.dtype), state)
    frozen_embed, frozen_head, frozen_rest = _Frozen(empty(embed)), _Frozen(empty(head)), _Frozen(rest)
    fn = _cached_body_fn(graphdef, frozen_embed, frozen_head, frozen_rest)
    return LMParts(body_fn=fn, body_params=body, embedding=model.embed.embedding[...],
                   head=model.output_head(), tied=model.lm_head is None)


@functools.lru_cache(maxsize=32)
def _cached_body_fn(graphdef, embed: _Frozen, head: _Frozen, rest: _Frozen):
    from flax import nnx

    def body_fn(body_params, input_embeddings, input_ids, attention_mask):
        model = nnx.merge(graphdef, embed.tree, head.tree, body_params, rest.tree)
        return model.features(input_ids, attention_mask, input_embeddings=input_embeddings)

    return body_fn


def lm_ntk(model, input_ids1, input_ids2=None, **kwargs) -> LMKernel:
    """The factored exact eNTK of an ``ldjax.models.CausalLM`` (or of :class:`LMParts`).

    See :func:`lm_ntk_from_parts` for the arguments; ``model`` may be a CausalLM (split with
    :func:`causal_lm_parts`) or an :class:`LMParts`.
    """
    parts = model if isinstance(model, LMParts) else causal_lm_parts(model)
    return lm_ntk_from_parts(parts, input_ids1, input_ids2, **kwargs)
