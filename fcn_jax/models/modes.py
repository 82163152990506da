"""Train and eval mode belong to the caller.

NNX modules carry their mode as attributes (``use_running_average`` on BatchNorm, ``deterministic`` on
dropout), set recursively by ``model.train()`` and ``model.eval()``. fcn-jax's helpers that need a mode
(evaluation, prediction, parity checks) run the model inside :func:`in_mode`, which puts back every
attribute it changed, so a model being trained is still in train mode after a validation pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flax import nnx

MODE_ATTRIBUTES = ("use_running_average", "deterministic")


@contextlib.contextmanager
def in_mode(model: nnx.Module, *, train: bool) -> Iterator[nnx.Module]:
    """``model`` in train (``train=True``) or eval mode inside the block, in the mode it had afterwards."""
    saved = [(module, {name: getattr(module, name) for name in MODE_ATTRIBUTES if hasattr(module, name)})
             for _, module in nnx.iter_modules(model)]
    model.train() if train else model.eval()
    try:
        yield model
    finally:
        for module, attributes in saved:
            for name, value in attributes.items():
                setattr(module, name, value)

