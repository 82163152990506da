"""Model registry: ``create_model(arch, ...)`` builds any FCN variant on any VGG backbone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax.choices import ARCHS
from fcn_jax.errors import ConfigError
from fcn_jax.models.fcn import FCN, FCN8s, FCN16s, FCN32s, FCNs
from fcn_jax.models.paper import FCN8sAtOncePaper, FCN8sPaper, FCN16sPaper, FCN32sPaper, Heatmap, PaperFCN
from fcn_jax.models.vgg import BACKBONES, CFGS, VGGBackbone, feature_ranges, torch_feature_indices

MODELS: dict[str, type] = {cls.arch: cls for cls in (FCN32s, FCN16s, FCN8s, FCNs, FCN32sPaper, FCN16sPaper,
                                                      FCN8sPaper, FCN8sAtOncePaper, Heatmap)}  # keyed as ARCHS


def create_model(arch: str = "fcn8s", *, num_classes: int = 21, backbone: str = "vgg16",
                 batch_norm: bool = False, seed: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=None) -> FCN:
    """Build an FCN with freshly initialised weights.

    Args:
      arch: the tutorial's ``fcn32s``, ``fcn16s``, ``fcn8s``, ``fcns``; the paper's ``fcn32s_paper``,
        ``fcn16s_paper``, ``fcn8s_paper``, ``fcn8s_atonce_paper`` (:mod:`fcn_jax.models.paper`; no BatchNorm);
        ``heatmap``, the convolutionalized ImageNet classifier (``num_classes=1000``).
      num_classes: output channels of the logits.
      backbone: ``vgg11``, ``vgg13``, ``vgg16`` or ``vgg19``.
      batch_norm: use the ``vgg*_bn`` backbone (conv -> BatchNorm -> ReLU).
      seed: PRNG seed of the initialisation.
      dtype: compute dtype; ``jnp.bfloat16`` for mixed precision (BatchNorm statistics stay in
        ``param_dtype``). ``jnp.float64`` needs ``jax_enable_x64``.
      param_dtype: dtype of the parameters and BatchNorm statistics.
      precision: XLA precision of the convolutions (see :mod:`fcn_jax.layers`).

    Returns:
      The model, in train mode as PyTorch modules start; ``model.eval()`` for inference.
      ``model(images)`` maps ``(N, H, W, 3)`` NHWC to ``(N, H, W, num_classes)`` logits.
    """
    if arch not in MODELS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    for name, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
        if jnp.dtype(dt) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ConfigError(f"{name}=float64 needs 64-bit JAX: run jax.config.update('jax_enable_x64', "
                             f"True) first or use `with jax.enable_x64(True):`")
    return MODELS[arch](num_classes, backbone=backbone, batch_norm=batch_norm, dtype=dtype,
                        param_dtype=param_dtype, precision=precision, rngs=nnx.Rngs(seed))


def forward(model, images: jax.Array, sizes: jax.Array | None = None) -> jax.Array:
    """``model(images)``; for the paper's networks, which do not pad themselves, with each image's own size
    (``sizes``, ``(N, 2)``, from :class:`~fcn_jax.data.pipeline.EvalBatches`) so that images padded into one
    batch get the logits they would get alone."""
    return model(images, sizes=sizes) if getattr(model, "takes_sizes", False) else model(images)


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
    "VGGBackbone",
    "create_model",
    "feature_ranges",
    "forward",
    "torch_feature_indices",
]
