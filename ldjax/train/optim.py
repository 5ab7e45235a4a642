"""optax optimizers for finetuning: SGD, Adam(W), RMSprop with linear warm-up and clipping.

Gradient accumulation is not an optax wrapper here: the train step (:mod:`ldjax.train.steps`)
averages the gradients of its micro-batches inside one compiled call, so one optimizer step
always sees the full-batch gradient and the optimizer below is the same with or without it.
"""
from __future__ import annotations

import optax

from ldjax.train.config import ConfigError, OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, num_steps: int | None = None) -> optax.Schedule:
    """Linear warm-up to ``config.learning_rate`` over ``warmup_steps``, then the schedule.

    Warm-up step ``s < W`` uses ``peak * (s + 1) / (W + 1)``: it starts at ``peak / (W + 1)``,
    not at 0, as ``LambdaLR(min(1, (s + 1) / (W + 1)))`` in the DPO code the paper builds on.

    Args:
      config: the optimizer fields.
      num_steps: total optimizer steps; needed by the ``linear`` and ``cosine`` decays (to 0).

    Returns:
      ``step -> learning rate`` (an optax schedule, jit-safe).
    """
    peak = config.learning_rate
    warm = config.warmup_steps
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        if num_steps is None or num_steps <= warm:
            raise ConfigError(f"schedule={config.schedule!r} needs num_steps > warmup_steps ({warm}), got {num_steps}")
        decay_steps = num_steps - warm
        if config.schedule == "linear":
            after = optax.linear_schedule(peak, 0.0, decay_steps)
        else:
            after = optax.cosine_decay_schedule(peak, decay_steps)
    if warm == 0:
        return after
    # lr(s) = peak * (s + 1) / (warm + 1) for s < warm: the warm-up of the DPO reference code
    # the paper builds on (LambdaLR(min(1, (s + 1) / (warm + 1)))); the first step already moves.
    return optax.join_schedules([optax.linear_schedule(peak / (warm + 1), peak, warm), after], [warm])


def torch_rmsprop(learning_rate: optax.ScalarOrSchedule, *, decay: float = 0.99, eps: float = 1e-8,
                  momentum: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.RMSprop`` (not centred, no weight decay) as an optax chain.

    PyTorch: ``v ← αv + (1−α)g²``, ``b ← μb + g / (√v + ε)``, ``θ ← θ − η_t b`` (without momentum
    ``θ ← θ − η_t g / (√v + ε)``); ``v`` and ``b`` start at 0, no bias correction, ``ε`` outside
    the square root. ``optax.rmsprop`` scales by the learning rate *before* its momentum trace,
    so its buffer holds ``Σ μ^k η_{t−k} …`` — the same as PyTorch's for a constant rate, not
    under a warm-up or decay. Here the trace comes first and the current rate multiplies it.

    Args:
      learning_rate: a float or an optax schedule ``step -> η``.
      decay: PyTorch's ``alpha``.
      eps: added to ``√v``.
      momentum: PyTorch's ``momentum`` (0 = none).
    """
    return optax.chain(
        optax.scale_by_rms(decay=decay, eps=eps, initial_scale=0.0, eps_in_sqrt=False, bias_correction=False),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def build_optimizer(config: OptimizerConfig, num_steps: int | None = None) -> optax.GradientTransformation:
    """The optax chain ``clip_by_global_norm -> optimizer(schedule)`` described by ``config``.

    RMSprop is :func:`torch_rmsprop` (PyTorch's ``torch.optim.RMSprop``, the paper's code); SGD's
    momentum is PyTorch's too (``optax.sgd`` already scales its trace by the learning rate).
    """
    lr = learning_rate_schedule(config, num_steps)
    momentum = config.momentum or None
    if config.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=momentum)
    elif config.optimizer == "adam":
        opt = optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps)
    elif config.optimizer == "adamw":
        opt = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    elif config.optimizer == "rmsprop":
        opt = torch_rmsprop(lr, decay=config.rmsprop_decay, eps=config.eps, momentum=config.momentum)
    else:  # OptimizerConfig validates, but a hand-built object may not have.
        raise ConfigError(f"optimizer: unknown {config.optimizer!r}")
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt
