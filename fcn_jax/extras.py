"""The door from fcn-jax's core to its optional parts: the only module that imports :mod:`fcn_jax.pytorch`.

The core (models, conversion, data, training, evaluation, prediction) never imports torch. Where a user
hands it something only PyTorch can read (a ``.pth`` file, torch tensors, an ``nn.Module``) or asks for a
PyTorch-side job (``convert --verify``, writing ``.pth``, ``compare``), it asks :func:`pytorch` for the
module that does it, and a machine without the ``torch`` extra gets one clear line instead of an
``ImportError`` deep inside.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from fcn_jax.errors import MissingExtraError


def pytorch(module: str, needed_for: str) -> ModuleType:
    """``fcn_jax.pytorch.<module>``; a :class:`MissingExtraError` naming ``needed_for`` where torch (or, for
    anything beyond reading and writing ``.pth`` files, torchvision) is not installed."""
    needs = ("torch",) if module == "io" else ("torch", "torchvision")
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{needed_for} needs {' and '.join(missing)}, which fcn-jax installs with its torch "
                                f"extra: pip install 'fcn-jax[torch]'")
    return importlib.import_module(f"fcn_jax.pytorch.{module}")


def onnx(needed_for: str) -> ModuleType:
    """:mod:`fcn_jax.onnx_export`; a :class:`MissingExtraError` naming ``needed_for`` where onnx or onnxruntime (the
    ``onnx`` extra: the graph is checked, and verified in onnxruntime, as it is written) is not installed."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{needed_for} needs {' and '.join(missing)}, which fcn-jax installs with its onnx "
                                f"extra: pip install 'fcn-jax[onnx]'")
    return importlib.import_module("fcn_jax.onnx_export")
