"""fcn-jax: Fully Convolutional Networks for semantic segmentation in JAX / Flax NNX.

Images are NHWC float arrays; models return NHWC logits of the input's size. Importing the package
changes no process state and loads nothing heavy: each name below is imported from its module when first
used (so that data-loading worker processes, which import :mod:`fcn_jax.data` only, start without JAX). No
module is named like one of these names: importing it would replace the name on the package.
PyTorch is only needed for ``.pth`` files and :mod:`fcn_jax.pytorch`.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "fcn_jax.deploy.exporting": ("export",),
    "fcn_jax.weights.torch_layout": ("infer_config", "load_torch_state_dict", "read_torch_state_dict",
                                     "to_torch_state_dict"),
    "fcn_jax.errors": ("ConfigError", "DatasetError", "FcnJaxError", "InputError", "MissingExtraError",
                       "OutputError", "RunError", "TrainingDiverged", "WeightsError"),
    "fcn_jax.models": ("ARCHS", "BACKBONES", "FCN", "VGGBackbone", "create_model"),
    "fcn_jax.inference.prediction": ("predict",),
    "fcn_jax.models.summary": ("summary",),
    "fcn_jax.weights.native": ("load_model", "load_weights", "save_weights"),
    "fcn_jax.xla_flags": ("use_fast_cpu_convolutions",),
    "fcn_jax.caches": ("use_compile_cache",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fcn_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
