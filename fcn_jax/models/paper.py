"""The paper's networks (Long, Shelhamer & Darrell, CVPR 2015): a convolutionalized VGG, and FCN-32s, FCN-16s,
FCN-8s and FCN-8s at-once as published, in the layout of the PyTorch port of the Caffe weights.

Convolutionalized VGG: the classifier's fully connected layers become convolutions, fc6 a 7x7 valid one (the
(4096, 25088) matrix is a (4096, 512, 7, 7) kernel), fc7 and fc8 1x1 ones; each of fc6 and fc7 is followed by
ReLU and channel dropout. The network then scores every 32-pixel step of an image of any size
(:class:`Heatmap`); at 224x224 the single score equals the classifier's logits.

The segmentation nets pad the first convolution by 100 pixels and round odd sizes up in every max-pool
(PyTorch's ``ceil_mode``), so that every crop below fits for any input ``H, W >= 1``:

- FCN-32s: ``score_fr`` on fc7, upsampled x32 by ``upscore`` (k64), cropped at offset 19.
- FCN-16s: ``score_fr`` upsampled x2 (``upscore2``, k4) + ``score_pool4`` on pool4 (cropped at 5); x16
  (``upscore16``, k32), cropped at 27.
- FCN-8s: as FCN-16s to the sum; x2 (``upscore_pool4``, k4) + ``score_pool3`` on pool3 (cropped at 9); x8
  (``upscore8``, k16), cropped at 31.
- FCN-8s at-once: FCN-8s with pool4 scaled by 0.01 and pool3 by 0.0001 before their score layers.

The transposed convolutions have no bias and start as bilinear interpolation of each class on its own; they
are :class:`Upsampling` variables, which training leaves frozen unless told to learn them. The score layers
start at zero. Logits are ``(N, H, W, num_classes)`` for ``(N, H, W, 3)`` images, no padding to a multiple of
32: each size is its own network, evaluated exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax.errors import ConfigError, InputError
from fcn_jax.models.base import Segmenter
from fcn_jax.models.fcn import check_images
from fcn_jax.models.layers import Conv2d, ConvTranspose2d, known_sizes
from fcn_jax.models.vgg import VGGBackbone, mask_beyond


class Upsampling(nnx.Param):
    """The kernel of a paper net's upsampling layer: a parameter that training leaves frozen by default."""


def bilinear_kernel(size: int, channels: int) -> np.ndarray:
    """Bilinear interpolation as a ``(size, size, channels, channels)`` transposed-convolution kernel: each
    channel upsampled on its own (the port's ``get_upsampling_weight``)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - np.abs(np.arange(size) - center) / factor
    kernel = np.zeros((size, size, channels, channels), np.float64)
    kernel[:, :, np.arange(channels), np.arange(channels)] = np.outer(ramp, ramp)[:, :, None]
    return kernel


def _masked(x: jax.Array, extents: jax.Array | None) -> jax.Array:
    return x if extents is None else mask_beyond(x, extents)


def _crop(x: jax.Array, offset: int, size: tuple[int, int]) -> jax.Array:
    return x[:, offset:offset + size[0], offset:offset + size[1]]


class ConvolutionalizedVGG(nnx.Module):
    """VGG's features, then fc6 (7x7 valid conv) and fc7 (1x1), ``fc_width`` channels each (4096 as published),
    each with ReLU and channel dropout (``Dropout2d``: whole channels of a sample zeroed, the rest scaled by 2;
    off in eval mode). The model holds
    no random state: in train mode the caller passes ``rngs`` with a ``dropout`` stream (training derives its
    key from the run's seed and the step, so a resumed run draws the same masks)."""

    def __init__(self, backbone: str, *, first_padding: int, ceil_mode: bool, dropout: float, fc_width: int,
                 dtype, param_dtype, precision, rngs: nnx.Rngs):
        self.backbone = VGGBackbone(backbone, first_padding=first_padding, ceil_mode=ceil_mode, dtype=dtype,
                                    param_dtype=param_dtype, precision=precision, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.fc6 = Conv2d(512, fc_width, 7, **kw)
        self.fc7 = Conv2d(fc_width, fc_width, 1, **kw)
        self.drop6 = nnx.Dropout(dropout, broadcast_dims=(1, 2))
        self.drop7 = nnx.Dropout(dropout, broadcast_dims=(1, 2))

    def fully_convolutional(self, x5: jax.Array, rngs: nnx.Rngs | None, extents: jax.Array | None = None
                            ) -> jax.Array:
        """fc6 and fc7 on the backbone's last map; with ``extents`` (each image's valid extent of fc6's output,
        ``x5``'s minus 6), everything beyond it zeroed."""
        if known_sizes(*x5.shape[1:3]) and min(x5.shape[1:3]) < 7:
            raise InputError(f"fc6 is a 7x7 convolution but pool5 is {x5.shape[1]}x{x5.shape[2]}: images must be at "
                             f"least 224x224 for the heatmap (the segmentation nets pad and take any size)")
        if rngs is None and not self.drop6.deterministic and self.drop6.rate > 0:
            raise ConfigError("in train mode the paper's networks need rngs=nnx.Rngs(dropout=key) for their dropout "
                              "(or call model.eval() first)")
        x = self.drop6(_masked(jax.nn.relu(self.fc6(x5)), extents), rngs=rngs)
        return self.drop7(_masked(jax.nn.relu(self.fc7(x)), extents), rngs=rngs)


class Heatmap(Segmenter):
    """Convolutionalized VGG with the ImageNet classifier's last layer, fc8, as a 1x1 convolution:
    ``(N, H, W, 3)`` -> ``(N, H // 32 - 6, W // 32 - 6, num_classes)`` class scores, one per 32-pixel step
    (``H, W >= 224``). Loads torchvision's whole VGG state_dict (``features`` and ``classifier``)."""

    arch = family = "heatmap"
    takes_dropout_rngs = True
    segmenter = False  # class scores per 32-pixel step
    min_size = 224  # fc6 needs a 7x7 pool5

    def __init__(self, num_classes: int = 1000, *, backbone: str = "vgg16", batch_norm: bool = False,
                 dropout: float = 0.5, fc_width: int = 4096, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        """``fc_width``: fc6's and fc7's channels, 4096 as torchvision's VGG (narrower: tests)."""
        _check(num_classes, batch_norm, "heatmap")
        self.num_classes = num_classes
        self.vgg = ConvolutionalizedVGG(backbone, first_padding=1, ceil_mode=False, dropout=dropout,
                                        fc_width=fc_width, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                        rngs=rngs)
        self.fc8 = Conv2d(fc_width, num_classes, 1, dtype=dtype, param_dtype=param_dtype, precision=precision,
                          rngs=rngs)

    @property
    def backbone(self) -> VGGBackbone:
        return self.vgg.backbone

    def config(self) -> dict:
        return {**super().config(), "fc_width": self.vgg.fc7.kernel.shape[-1]}

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.fc8(self.vgg.fully_convolutional(self.backbone(check_images(images))["x5"], rngs))


class PaperFCN(Segmenter):
    """Base of the paper's segmentation nets: ``(N, H, W, 3)`` float NHWC -> ``(N, H, W, num_classes)``."""

    family = "paper"
    takes_dropout_rngs = True
    size_multiple = 32  # batches pad images to it; `sizes` masks the padding back out (exact per image)
    takes_sizes = True
    skips: tuple[tuple[str, str, str, int, float], ...] = ()  # (feature, score layer, upsampling, crop, scale)
    upsample: tuple[str, int, int] = ("", 0, 0)  # the last upsampling: (name, stride, crop offset)

    def __init__(self, num_classes: int = 21, *, backbone: str = "vgg16", batch_norm: bool = False,
                 dropout: float = 0.5, fc_width: int = 4096, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        """``fc_width``: fc6's and fc7's channels, 4096 as published (narrower nets: tests, small experiments)."""
        _check(num_classes, batch_norm, self.arch)
        self.num_classes = num_classes
        self.vgg = ConvolutionalizedVGG(backbone, first_padding=100, ceil_mode=True, dropout=dropout,
                                        fc_width=fc_width, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                        rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.score_fr = Conv2d(fc_width, num_classes, 1, kernel_init=zeros, **kw)
        widths = {"x4": 512, "x3": 256}
        for feature, score, upsampling, _, _ in self.skips:
            setattr(self, score, Conv2d(widths[feature], num_classes, 1, kernel_init=zeros, **kw))
            setattr(self, upsampling, self._upsampling(4, 2, num_classes, kw))
        name, stride, _ = self.upsample
        setattr(self, name, self._upsampling(2 * stride, stride, num_classes, kw))

    @staticmethod
    def _upsampling(size: int, stride: int, channels: int, kw: dict) -> ConvTranspose2d:
        layer = ConvTranspose2d(channels, channels, size, stride=stride, use_bias=False, **kw)
        layer.kernel = Upsampling(jnp.asarray(bilinear_kernel(size, channels), kw["param_dtype"]))
        return layer

    @property
    def backbone(self) -> VGGBackbone:
        return self.vgg.backbone

    def config(self) -> dict:
        return {**super().config(), "fc_width": self.vgg.fc7.kernel.shape[-1]}

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None, sizes: jax.Array | None = None
                 ) -> jax.Array:
        """``rngs``: a ``dropout`` stream, needed in train mode. ``sizes``: ``(N, 2)`` heights and widths of images
        placed at the top left of a zero-padded batch; the logits of each image's own pixels are then those of
        the image alone (activations beyond each image's extent are masked after every layer), so images of
        different sizes share one compiled program."""
        return self.features_and_logits(images, rngs=rngs, sizes=sizes)[1]

    def features_and_logits(self, images: jax.Array, *, rngs: nnx.Rngs | None = None,
                            sizes: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
        """The backbone's pools ``{"x1": .., "x5": ..}`` (of the input padded by conv1_1's 100) and the logits."""
        images = check_images(images)
        size = images.shape[1:3]
        feats, extents = self.backbone.features_and_extents(images, None if sizes is None else jnp.asarray(sizes))
        score_extent = None if extents["x5"] is None else extents["x5"] - 6  # fc6: a valid 7x7 convolution
        score = _masked(self.score_fr(self.vgg.fully_convolutional(feats["x5"], rngs, score_extent)), score_extent)
        for feature, score_layer, upsampling, offset, scale in self.skips:
            layer = getattr(self, upsampling)
            score = layer(score)  # no bias: nothing beyond the upsampled extent
            skip = _masked(getattr(self, score_layer)(feats[feature] * scale if scale != 1 else feats[feature]),
                           extents[feature])
            score = score + _crop(skip, offset, score.shape[1:3])
            if score_extent is not None:
                score_extent = (score_extent - 1) * layer.stride[0] + layer.kernel.shape[0]
                score = _masked(score, score_extent)
        name, _, offset = self.upsample
        return feats, _crop(getattr(self, name)(score), offset, size)


class FCN32sPaper(PaperFCN):
    arch = "fcn32s_paper"
    upsample = ("upscore", 32, 19)


class FCN16sPaper(PaperFCN):
    arch = "fcn16s_paper"
    skips = (("x4", "score_pool4", "upscore2", 5, 1.0),)
    upsample = ("upscore16", 16, 27)


class FCN8sPaper(PaperFCN):
    arch = "fcn8s_paper"
    skips = (("x4", "score_pool4", "upscore2", 5, 1.0), ("x3", "score_pool3", "upscore_pool4", 9, 1.0))
    upsample = ("upscore8", 8, 31)


class FCN8sAtOncePaper(FCN8sPaper):
    """FCN-8s trained in one stage: the skips scaled down by fixed constants."""

    arch = "fcn8s_atonce_paper"
    skips = (("x4", "score_pool4", "upscore2", 5, 0.01), ("x3", "score_pool3", "upscore_pool4", 9, 0.0001))


def _check(num_classes, batch_norm: bool, arch: str) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if batch_norm:
        raise ConfigError(f"{arch} is the paper's network, which has no BatchNorm: pass batch_norm=False")
