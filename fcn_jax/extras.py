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
    _require(("torch",) if module == "io" else ("torch", "torchvision"), "torch", needed_for)
    return importlib.import_module(f"fcn_jax.pytorch.{module}")


def onnx(needed_for: str) -> ModuleType:
    """:mod:`fcn_jax.deploy.onnx_graph`; a :class:`MissingExtraError` naming ``needed_for`` where onnx or
    onnxruntime (the ``onnx`` extra: the graph is checked, and verified in onnxruntime, as it is written) is not
    installed."""
    _require(("onnx", "onnxruntime"), "onnx", needed_for)
    return importlib.import_module("fcn_jax.deploy.onnx_graph")


def _require(packages: tuple[str, ...], extra: str, needed_for: str) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{needed_for} needs {' and '.join(missing)}, which fcn-jax installs with its {extra} "
                                f"extra: pip install 'fcn-jax[{extra}]'")
