"""The A·K·G decomposition of one update, for classification (SPEC §1.1).

For a model ``apply_fn(params, x) -> logits (N, V)``, cross-entropy on the update batch
``(x_u, y_u)`` and one SGD step ``Δθ = −η ∇_θ L``, the change of the log-probabilities on an
observed input is, to first order in η,

    Δ log π(·|x_o) = −η Σ_u A(x_o) K(x_o, x_u) G(x_u, y_u) / B     (B = Nu for a mean loss)

with ``A = I − 1 πᵀ`` (softmax Jacobian of log-softmax), ``K = J_o J_uᵀ`` (the empirical NTK)
and ``G = π(·|x_u) − e_{y_u}`` (the cross-entropy residual).

Two routes compute the prediction:

- :func:`decompose` forms every term (K via :func:`ldjax.ntk.empirical_ntk`); use it for small
  models where the terms themselves are wanted.
- :func:`predicted_change_sgd` never forms K: one VJP gives the training gradient
  ``d = J_uᵀ G / B``, one JVP pushes ``−η d`` through the observed batch, then A is applied.

Optimizers other than SGD precondition the gradient; their first-order effect is
``Δ log π ≈ A J_o u`` for the actual parameter update ``u`` (SPEC §1.4), computed by
:func:`predicted_change_for_update` and, for one real optax step, :func:`optimizer_step_change`.

Reference: Y. Ren, D. J. Sutherland, "Learning Dynamics of LLM Finetuning", ICLR 2025,
arXiv:2407.10490, eq. (3)–(5).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[Any, Any], jax.Array]
REDUCTIONS = ("mean", "sum")


class DynamicsInputError(ValueError):
    """A shape, dtype or option given to :mod:`ldjax.dynamics` is not usable."""


@chex.dataclass(frozen=True)
class Decomposition:
    """The terms of one SGD step's first-order effect on the observed batch.

    Attributes:
      A: (No, V, V) softmax Jacobian ``∂ log π / ∂ z`` at each observed input.
      K: (No, Nu, V, V) empirical NTK blocks ``J(x_o) J(x_u)ᵀ``.
      G: (Nu, V) cross-entropy residual ``π(·|x_u) − e_{y_u}`` of each update example.
      predicted: (No, V) ``−η Σ_u A_o K_ou G_u / B``, the predicted ``Δ log π(·|x_o)``.
    """

    A: jax.Array
    K: jax.Array
    G: jax.Array
    predicted: jax.Array


class StepChange(NamedTuple):
    """One real optimizer step with its first-order prediction (see :func:`optimizer_step_change`)."""

    predicted: jax.Array  # (No, V) A · J_o u
    actual: jax.Array  # (No, V) log π_new − log π_old
    new_params: Any
    new_opt_state: Any
    update: Any  # the parameter update u that the optimizer produced


def _check_logits(logits: jax.Array, where: str) -> None:
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise DynamicsInputError(
            f"{where}: logits must have a trailing class axis of size >= 2, got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise DynamicsInputError(f"{where}: logits must be floating point, got dtype {logits.dtype}")


def _check_labels(labels: jax.Array, logits_shape: tuple[int, ...], where: str) -> None:
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise DynamicsInputError(f"{where}: labels must be integer class ids, got dtype {jnp.asarray(labels).dtype}")
    if tuple(jnp.shape(labels)) != tuple(logits_shape[:-1]):
        raise DynamicsInputError(
            f"{where}: labels shape {tuple(jnp.shape(labels))} does not match logits batch shape "
            f"{tuple(logits_shape[:-1])} (logits {tuple(logits_shape)})")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise DynamicsInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def softmax_jacobian(logits: jax.Array) -> jax.Array:
    """``A = ∂ log softmax(z) / ∂ z = I − 1 πᵀ``.

    Args:
      logits: (..., V).

    Returns:
      (..., V, V) with ``A[..., i, j] = δ_ij − π_j``.
    """
    _check_logits(logits, "softmax_jacobian")
    probs = jax.nn.softmax(logits, axis=-1)
    eye = jnp.eye(logits.shape[-1], dtype=probs.dtype)
    return eye - probs[..., None, :]


def apply_softmax_jacobian(logits: jax.Array, delta_logits: jax.Array) -> jax.Array:
    """``A · Δz = Δz − (πᵀ Δz) 1`` without forming A.

    Args:
      logits: (..., V) where A is evaluated.
      delta_logits: (..., V) the change of the logits.

    Returns:
      (..., V) the first-order change of ``log softmax``.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    return delta_logits - jnp.sum(probs * delta_logits, axis=-1, keepdims=True)


def cross_entropy_residual(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``G = ∂ CE(z, y) / ∂ z = π − e_y``.

    Args:
      logits: (..., V).
      labels: (...,) integer class ids.

    Returns:
      (..., V) residual.
    """
    _check_logits(logits, "cross_entropy_residual")
    _check_labels(labels, logits.shape, "cross_entropy_residual")
    probs = jax.nn.softmax(logits, axis=-1)
    return probs - jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)


def cross_entropy_loss(apply_fn: ApplyFn, params: Any, x: Any, y: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Cross-entropy of ``apply_fn(params, x)`` against integer labels ``y`` (Nu,), reduced to a scalar."""
    _check_reduction(reduction)
    logits = apply_fn(params, x)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(per_example) if reduction == "mean" else jnp.sum(per_example)


def _check_batches(apply_fn: ApplyFn, params: Any, x_obs: Any, x_upd: Any, y_upd: jax.Array,
                                reduction: str, where: str) -> None:
    _check_reduction(reduction)
    # eval_shape: validation costs no forward pass.
    logits_obs = jax.eval_shape(apply_fn, params, x_obs)
    logits_upd = jax.eval_shape(apply_fn, params, x_upd)
    for name, logits in (("apply_fn(params, x_obs)", logits_obs), ("apply_fn(params, x_upd)", logits_upd)):
        _check_logits(logits, f"{where}: {name}")
        if logits.ndim != 2:
            raise DynamicsInputError(f"{where}: {name} must return logits of shape (N, V), got {logits.shape}")
    _check_labels(y_upd, logits_upd.shape, f"{where}: y_upd")


def decompose(apply_fn: ApplyFn, params: Any, x_obs: Any, x_upd: Any, y_upd: jax.Array, *,
              lr: float, reduction: str = "mean", **ntk_kwargs: Any) -> Decomposition:
    """Every term of one SGD step's first-order effect, K formed explicitly.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits (N, V)`` (e.g. from
        :func:`ldjax.models.functional.functional`).
      params: the parameter pytree θ.
      x_obs: observed inputs, leading axis No.
      x_upd: update inputs, leading axis Nu.
      y_upd: (Nu,) integer labels of the update batch.
      lr: the SGD learning rate η.
      reduction: ``"mean"`` (divide by Nu, as a mean loss) or ``"sum"``.
      **ntk_kwargs: passed to :func:`ldjax.ntk.empirical_ntk` (e.g. ``implementation``,
        ``batch_size``).

    Returns:
      A :class:`Decomposition` with ``predicted = −η Σ_u A_o K_ou G_u / B``.
    """
    from ldjax.ntk import empirical_ntk  # imported here: ldjax.ntk is a separate, flax-free module

    _check_batches(apply_fn, params, x_obs, x_upd, y_upd, reduction, "decompose")
    logits_obs = apply_fn(params, x_obs)
    logits_upd = apply_fn(params, x_upd)
    a = softmax_jacobian(logits_obs)
    g = cross_entropy_residual(logits_upd, y_upd)
    k = empirical_ntk(apply_fn, params, x_obs, x_upd, **ntk_kwargs)  # (No, Nu, V, V)
    scale = lr / logits_upd.shape[0] if reduction == "mean" else lr
    predicted = -scale * jnp.einsum("oij,oujk,uk->oi", a, k, g)
    return Decomposition(A=a, K=k, G=g, predicted=predicted)


def predicted_change_for_update(apply_fn: ApplyFn, params: Any, x_obs: Any, delta_params: Any) -> jax.Array:
    """First-order ``Δ log π(·|x_o)`` for ANY parameter update: ``A(x_o) · J(x_o) u``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits (No, V)``.
      params: θ, where the Jacobian is taken.
      x_obs: observed inputs.
      delta_params: the update ``u = θ_new − θ`` (same pytree structure as params), e.g.
        what ``optax`` returned for SGD, Adam or RMSprop.

    Returns:
      (No, V) predicted change of ``log softmax(apply_fn(θ, x_obs))``.
    """
    if jax.tree_util.tree_structure(delta_params) != jax.tree_util.tree_structure(params):
        raise DynamicsInputError(
            "predicted_change_for_update: delta_params has tree structure "
            f"{jax.tree_util.tree_structure(delta_params)}, params has {jax.tree_util.tree_structure(params)}")
    delta_params = jax.tree_util.tree_map(lambda p, u: jnp.asarray(u, dtype=p.dtype), params, delta_params)
    logits_obs, delta_logits = jax.jvp(lambda p: apply_fn(p, x_obs), (params,), (delta_params,))
    _check_logits(logits_obs, "predicted_change_for_update: apply_fn(params, x_obs)")
    return apply_softmax_jacobian(logits_obs, delta_logits)


def predicted_change_sgd(apply_fn: ApplyFn, params: Any, x_obs: Any, x_upd: Any, y_upd: jax.Array, *,
                         lr: float, reduction: str = "mean") -> jax.Array:
    """The same prediction as :func:`decompose` without forming K (SPEC §1.5, implicit A·K·G).

    One VJP (``jax.grad`` of the update loss) gives ``d = J_uᵀ G / B``; one JVP along ``−η d``
    gives ``Δz_o = −η J_o d = −η K G / B``; then ``Δ log π = A Δz``. Cost: one backward pass
    on the update batch plus one forward-mode pass on the observed batch.

    Args: as :func:`decompose`.

    Returns:
      (No, V) predicted ``Δ log π(·|x_o)``.
    """
    _check_batches(apply_fn, params, x_obs, x_upd, y_upd, reduction, "predicted_change_sgd")
    grad = jax.grad(cross_entropy_loss, argnums=1)(apply_fn, params, x_upd, y_upd, reduction=reduction)
    step = jax.tree_util.tree_map(lambda g: -lr * g, grad)
    return predicted_change_for_update(apply_fn, params, x_obs, step)


def actual_change(apply_fn: ApplyFn, params: Any, new_params: Any, x_obs: Any) -> jax.Array:
    """``log softmax(apply_fn(θ_new, x_o)) − log softmax(apply_fn(θ, x_o))``, shape (No, V)."""
    old = jax.nn.log_softmax(apply_fn(params, x_obs), axis=-1)
    new = jax.nn.log_softmax(apply_fn(new_params, x_obs), axis=-1)
    return new - old


def optimizer_step_change(apply_fn: ApplyFn, params: Any, optimizer: optax.GradientTransformation, opt_state: Any,
                          x_obs: Any, x_upd: Any, y_upd: jax.Array, *, reduction: str = "mean") -> StepChange:
    """Takes one real optax step on the update batch and predicts its effect to first order.

    The prediction is ``A(x_o) J(x_o) u`` for the update ``u`` the optimizer actually produced
    (for a diagonal preconditioner P that is ``−A J_o P J_uᵀ G``, a preconditioned kernel;
    SPEC §1.4).

    Returns:
      :class:`StepChange` ``(predicted, actual, new_params, new_opt_state, update)``.
    """
    _check_batches(apply_fn, params, x_obs, x_upd, y_upd, reduction, "optimizer_step_change")
    grad = jax.grad(cross_entropy_loss, argnums=1)(apply_fn, params, x_upd, y_upd, reduction=reduction)
    update, new_opt_state = optimizer.update(grad, opt_state, params)
    new_params = optax.apply_updates(params, update)
    # apply_updates may round the update into params' dtype; predict the step really taken.
    taken = jax.tree_util.tree_map(lambda new, old: new - old, new_params, params)
    predicted = predicted_change_for_update(apply_fn, params, x_obs, taken)
    actual = actual_change(apply_fn, params, new_params, x_obs)
    return StepChange(predicted=predicted, actual=actual, new_params=new_params,
                      new_opt_state=new_opt_state, update=update)
