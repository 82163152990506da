"""Fully Convolutional Networks (Long, Shelhamer & Darrell, 2015) with the reference's decoders.

Five ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)`` layers each double the resolution from
the stride-32 ``x5`` back to the input size; BatchNorm follows each, and a 1x1 conv scores the
classes. The four variants differ only in how they add the backbone's skip features:

- FCN32s: no skips.
- FCN16s: ``x4`` after the first upsampling, *before* its BatchNorm.
- FCN8s:  ``x4`` and ``x3`` after the first two upsamplings, before their BatchNorms.
- FCNs:   ``x4, x3, x2, x1`` after the first four, *after* their BatchNorms.

Input of any size is padded with zeros at the bottom and right to the next multiple of 32 and the
logits are cropped back, so ``H, W >= 1`` work; for multiples of 32 nothing is padded and the output
equals the PyTorch reference's (which only accepts multiples of 32).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax.errors import ConfigError, InputError
from fcn_jax.models.base import Segmenter
from fcn_jax.models.layers import BatchNorm2d, Conv2d, ConvTranspose2d
from fcn_jax.models.vgg import VGGBackbone

STRIDE = 32  # x5 is the input downsampled five times by 2
DECODER_WIDTHS = (512, 512, 256, 128, 64, 32)  # deconv k maps widths[k-1] -> widths[k]


class FCN(Segmenter):
    """Base class: ``(N, H, W, 3)`` float NHWC images -> ``(N, H, W, num_classes)`` logits.

    Owns ``backbone`` (:class:`VGGBackbone`), ``deconv1..deconv5``, ``bn1..bn5`` and ``classifier``,
    named as in the reference's state_dict. Modules start in train mode as in PyTorch: call
    ``model.eval()`` for inference with the BatchNorm running statistics.
    """

    family = "tutorial"
    # (upsampling step k, backbone feature) pairs: the feature is added to step k's output before / after its
    # BatchNorm
    skips_before_bn: tuple[tuple[int, str], ...] = ()
    skips_after_bn: tuple[tuple[int, str], ...] = ()
    size_multiple = STRIDE  # inputs are padded to it: batches may pad images to it too without changing logits

    def __init__(self, num_classes: int, *, backbone: str = "vgg16", batch_norm: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.backbone = VGGBackbone(backbone, batch_norm=batch_norm, dtype=dtype,
                                    param_dtype=param_dtype, precision=precision, rngs=rngs)
        for k, (cin, cout) in enumerate(itertools.pairwise(DECODER_WIDTHS), start=1):
            setattr(self, f"deconv{k}", ConvTranspose2d(
                cin, cout, 3, stride=2, padding=1, output_padding=1, dtype=dtype,
                param_dtype=param_dtype, precision=precision, rngs=rngs))
            setattr(self, f"bn{k}", BatchNorm2d(cout, dtype=dtype, param_dtype=param_dtype))
        self.classifier = Conv2d(DECODER_WIDTHS[-1], num_classes, 1,
                                 kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
                                 param_dtype=param_dtype, precision=precision, rngs=rngs)

    def up(self, k: int, score: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        """Upsampling step k: ``bn_k(relu(deconv_k(score)) + skip)``; the skip is added before BN."""
        score = jax.nn.relu(getattr(self, f"deconv{k}")(score))
        return getattr(self, f"bn{k}")(score if skip is None else score + skip)

    def decode(self, feats: dict[str, jax.Array]) -> jax.Array:
        """The five upsampling steps from ``x5``, with this variant's skips."""
        score, before, after = feats["x5"], dict(self.skips_before_bn), dict(self.skips_after_bn)
        for k in range(1, 6):
            score = self.up(k, score, skip=feats[before[k]] if k in before else None)
            if k in after:
                score = score + feats[after[k]]
        return score

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.features_and_logits(images)[1]

    def features_and_logits(self, images: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """The backbone's ``{"x1": .., "x5": ..}`` (of the padded input) and the logits, from one pass."""
        images = check_images(images)
        h, w = images.shape[1:3]
        pad_h, pad_w = -h % STRIDE, -w % STRIDE
        if pad_h or pad_w:
            images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        feats = self.backbone(images)
        return feats, self.classifier(self.decode(feats))[:, :h, :w]


class FCN32s(FCN):
    arch = "fcn32s"


class FCN16s(FCN):
    arch = "fcn16s"
    skips_before_bn = ((1, "x4"),)


class FCN8s(FCN):
    arch = "fcn8s"
    skips_before_bn = ((1, "x4"), (2, "x3"))


class FCNs(FCN):
    arch = "fcns"
    skips_after_bn = ((1, "x4"), (2, "x3"), (3, "x2"), (4, "x1"))


def check_images(images) -> jax.Array:
    """``images`` as an array, or an InputError that says what shape was expected."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = ""
        if images.ndim == 4 and images.shape[1] == 3:
            hint = " It looks NCHW (PyTorch's layout): use images.transpose(0, 2, 3, 1)."
        elif images.ndim == 3 and images.shape[-1] == 3:
            hint = " Add a batch axis: images[None]."
        raise InputError(f"expected images of shape (N, H, W, 3) (NHWC, RGB), got {images.shape}.{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise InputError(f"expected float images, got dtype {images.dtype}; convert uint8 images to "
                         f"float and normalise them first, e.g. (x / 255 - mean) / std")
    return images
