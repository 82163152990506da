"""Optimizers and learning-rate schedules (optax), matching torch.optim where the recipes need it.

- ``sgd``: ``add_decayed_weights(wd)`` then ``sgd(lr, momentum, nesterov)`` = torch ``SGD(momentum,
  weight_decay, nesterov, dampening=0)``.
- ``rmsprop``: torch's RMSprop (``alpha`` 0.99, eps added *outside* the square root, L2 weight decay
  added to the gradient); optax's default puts eps inside, hence ``eps_in_sqrt=False``.
- ``adamw``: decoupled weight decay.

Schedules are functions of the step: ``constant``, ``step`` (x ``gamma`` every ``step_epochs``
epochs, like torch's StepLR stepped per epoch), ``poly`` (``(1 - t/T)^power``, the usual
segmentation schedule) and ``cosine``; any of them after ``warmup_steps`` of linear warm-up.
"""

from __future__ import annotations

import optax

from fcn_jax.choices import OPTIMIZERS, SCHEDULES
from fcn_jax.errors import ConfigError


def make_schedule(name: str, lr: float, *, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0,
                  step_epochs: int = 50, gamma: float = 0.5, power: float = 0.9) -> optax.Schedule:
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "step":
        main = optax.exponential_decay(lr, transition_steps=step_epochs * steps_per_epoch, decay_rate=gamma,
                                       staircase=True)
    elif name == "poly":
        main = optax.polynomial_schedule(lr, 0.0, power, decay_steps)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, rmsprop_alpha: float = 0.99,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    if name == "rmsprop":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.rmsprop(schedule, decay=rmsprop_alpha, eps=eps, eps_in_sqrt=False,
                                         momentum=momentum or None))
    if name == "adamw":
        return optax.adamw(schedule, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
