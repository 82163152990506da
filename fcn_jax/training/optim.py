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

import functools

import jax
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
                   weight_decay: float = 0.0, rmsprop_alpha: float = 0.99, eps: float = 1e-8,
                   bias_lr_factor: float = 1.0, decay_biases: bool = True,
                   lr_factors: dict[str, float] | None = None) -> optax.GradientTransformation:
    """``bias_lr_factor`` and ``decay_biases`` make biases their own parameter group (the paper's Caffe recipe:
    twice the learning rate, no weight decay). ``lr_factors``: a module name (e.g. ``"aux_classifier"``) -> the
    multiple of the learning rate its parameters learn at (torchvision's aux head: 10). The update of SGD, RMSprop
    and AdamW (weight decay included) is proportional to the learning rate, so the group's updates are scaled."""
    tx = _grouped_by_bias(name, schedule, weight_decay, bias_lr_factor, decay_biases,
                          dict(momentum=momentum, nesterov=nesterov, rmsprop_alpha=rmsprop_alpha, eps=eps))
    for module, factor in (lr_factors or {}).items():
        if factor != 1.0:
            tx = optax.chain(tx, optax.masked(optax.scale(factor), functools.partial(_under, module)))
    return tx


def _under(module: str, params):
    """True for every parameter with ``module`` in its path."""
    return jax.tree_util.tree_map_with_path(lambda path, _: module in _names(path), params)


def _names(path) -> list:
    """The module and variable names of a parameter's tree path (``["classifier", "conv4", "kernel"]``)."""
    return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def _grouped_by_bias(name: str, schedule, weight_decay: float, bias_lr_factor: float, decay_biases: bool,
                     kw: dict) -> optax.GradientTransformation:
    if bias_lr_factor == 1.0 and decay_biases:
        return _optimizer(name, schedule, weight_decay=weight_decay, **kw)
    biases = _optimizer(name, lambda step: bias_lr_factor * schedule(step),
                        weight_decay=weight_decay if decay_biases else 0.0, **kw)
    return optax.multi_transform({"weights": _optimizer(name, schedule, weight_decay=weight_decay, **kw),
                                  "biases": biases}, _bias_labels)


def _bias_labels(params):
    """``"biases"`` for every parameter named ``bias``, ``"weights"`` for the rest."""
    def label(path, _):
        names = _names(path)
        return "biases" if names and names[-1] == "bias" else "weights"

    return jax.tree_util.tree_map_with_path(label, params)


def _optimizer(name: str, schedule, *, momentum: float, nesterov: bool, weight_decay: float, rmsprop_alpha: float,
               eps: float) -> optax.GradientTransformation:
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
