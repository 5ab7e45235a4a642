"""optax optimizers for finetuning: SGD, Adam(W), RMSprop with linear warm-up and clipping.

Gradient accumulation is not an optax wrapper here: the train step (:mod:`ldjax.train.steps`)
averages the gradients of its micro-batches inside one compiled call, so one optimizer step
always sees the full-batch gradient and the optimizer below is the same with or without it.
"""
from __future__ import annotations

import optax

from ldjax.train.config import ConfigError, OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, num_steps: int | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to ``config.learning_rate`` over ``warmup_steps``, then the schedule.

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


def build_optimizer(config: OptimizerConfig, num_steps: int | None = None) -> optax.GradientTransformation:
    """The optax chain ``clip_by_global_norm -> optimizer(schedule)`` described by ``config``.

    RMSprop follows PyTorch's ``torch.optim.RMSprop`` (the paper's code): squared-gradient decay
    ``rmsprop_decay`` (PyTorch's ``alpha``, 0.99), ``eps`` added outside the square root, no bias
    correction, state initialised to 0.
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
        opt = optax.rmsprop(lr, decay=config.rmsprop_decay, eps=config.eps, eps_in_sqrt=False, momentum=momentum)
    else:  # OptimizerConfig validates, but a hand-built object may not have.
        raise ConfigError(f"optimizer: unknown {config.optimizer!r}")
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt
