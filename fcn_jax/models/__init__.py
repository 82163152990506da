"""The networks, one module per family, and ``create_model(arch, ...)`` for any architecture registered in
:mod:`fcn_jax.registry`.

- :mod:`~fcn_jax.models.base`: :class:`Segmenter`, what every network declares about itself.
- :mod:`~fcn_jax.models.fcn`: the tutorial's FCNs; :mod:`~fcn_jax.models.paper`: the paper's FCNs and the heatmap.
- :mod:`~fcn_jax.models.vgg`: the VGG backbones; :mod:`~fcn_jax.models.layers`: PyTorch-exact layers.
- :mod:`~fcn_jax.models.modes`: train/eval mode switches; :mod:`~fcn_jax.models.summary`: parameter tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax import registry
from fcn_jax.errors import ConfigError
from fcn_jax.models.base import Segmenter
from fcn_jax.models.fcn import FCN, FCN8s, FCN16s, FCN32s, FCNs
from fcn_jax.models.paper import Heatmap, PaperFCN
from fcn_jax.models.vgg import BACKBONES, CFGS, VGGBackbone, feature_ranges, torch_feature_indices

ARCHS = registry.archs()  # the built-in ones; registry.archs() also lists families registered later


class _ArchClasses(Mapping):
    """``MODELS[arch]``: the class of each registered architecture, read from the registry when asked."""

    def __getitem__(self, arch: str) -> type:
        if arch not in registry.archs():
            raise KeyError(arch)
        return registry.model_class(arch)

    def __iter__(self):
        return iter(registry.archs())

    def __len__(self) -> int:
        return len(registry.archs())


MODELS: Mapping[str, type] = _ArchClasses()


def create_model(arch: str = "fcn8s", *, num_classes: int = 21, backbone: str | None = None,
                 batch_norm: bool | None = None, seed: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=None, remat: bool = False, **options) -> Segmenter:
    """Build an FCN with freshly initialised weights.

    Args:
      arch: the tutorial's ``fcn32s``, ``fcn16s``, ``fcn8s``, ``fcns``; the paper's ``fcn32s_paper``,
        ``fcn16s_paper``, ``fcn8s_paper``, ``fcn8s_atonce_paper`` (:mod:`fcn_jax.models.paper`; no BatchNorm);
        ``heatmap``, the convolutionalized ImageNet classifier (``num_classes=1000``); torchvision's
        ``fcn_resnet50``, ``fcn_resnet101`` (:mod:`fcn_jax.models.resnet`; ``aux_loss=True`` adds the aux head).
        ``fcn_jax.registry.archs()`` lists every registered one.
      num_classes: output channels of the logits.
      backbone: ``vgg11``, ``vgg13``, ``vgg16`` (the VGG families' default) or ``vgg19``; the FCN-ResNets'
        backbone is fixed by the arch.
      batch_norm: use the ``vgg*_bn`` backbone (conv -> BatchNorm -> ReLU); default False for VGG.
      seed: PRNG seed of the initialisation.
      dtype: compute dtype; ``jnp.bfloat16`` for mixed precision (BatchNorm statistics stay in
        ``param_dtype``). ``jnp.float64`` needs ``jax_enable_x64``.
      param_dtype: dtype of the parameters and BatchNorm statistics.
      precision: XLA precision of the convolutions (see :mod:`fcn_jax.models.layers`).
      remat: rematerialise the backbone in training: only each VGG stage's output (each ResNet block's) is
        kept for the backward pass and the rest is computed again there; the same losses and gradients for less
        memory and more compute. Not saved with the weights (set ``model.backbone.remat`` to change it).
      **options: a family's own constructor arguments (what its ``config()`` saves with the weights).

    Returns:
      The model, in train mode as PyTorch modules start; ``model.eval()`` for inference.
      ``model(images)`` maps ``(N, H, W, 3)`` NHWC to ``(N, H, W, num_classes)`` logits.
    """
    cls = registry.model_class(arch)  # an unknown arch: a ConfigError listing the registered ones
    for name, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
        if jnp.dtype(dt) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ConfigError(f"{name}=float64 needs 64-bit JAX: run jax.config.update('jax_enable_x64', "
                             f"True) first or use `with jax.enable_x64(True):`")
    given = {k: v for k, v in (("backbone", backbone), ("batch_norm", batch_norm)) if v is not None}
    model = cls(num_classes, **given, dtype=dtype, param_dtype=param_dtype, precision=precision,
                rngs=nnx.Rngs(seed), **options)
    model.backbone.remat = remat
    return model


def create_backbone(name: str = "vgg16", *, batch_norm: bool | None = None, seed: int = 0, dtype=jnp.float32,
                    param_dtype=jnp.float32, precision=None) -> nnx.Module:
    """A bare backbone (``vgg11`` .. ``vgg19``, ``resnet50``, ``resnet101``): what ImageNet classifier weights and
    backbone files load into. ``batch_norm`` as in :func:`create_model`."""
    given = {} if batch_norm is None else {"batch_norm": batch_norm}
    return registry.backbone_class(name)(name, **given, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                         rngs=nnx.Rngs(seed))


def forward(model, images: jax.Array, sizes: jax.Array | None = None) -> jax.Array:
    """``model(images)``; for the paper's networks, which do not pad themselves, with each image's own size
    (``sizes``, ``(N, 2)``, from :class:`~fcn_jax.data.pipeline.EvalBatches`) so that images padded into one
    batch get the logits they would get alone."""
    return model(images, sizes=sizes) if model.takes_sizes else model(images)


# One program per input shape. Called eagerly, a model compiles each of its operations on its own for every new
# shape (~0.3 s each on 2 CPU cores): prediction, export verification and the tests call this instead.
compiled_forward = nnx.jit(forward)


__all__ = [
    "ARCHS",
    "BACKBONES",
    "CFGS",
    "FCN",
    "MODELS",
    "FCN8s",
    "FCN16s",
    "FCN32s",
    "FCNs",
    "Heatmap",
    "PaperFCN",
    "Segmenter",
    "VGGBackbone",
    "compiled_forward",
    "create_backbone",
    "create_model",
    "feature_ranges",
    "forward",
    "torch_feature_indices",
]
