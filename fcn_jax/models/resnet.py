"""torchvision's FCN-ResNet50 and FCN-ResNet101: a dilated ResNet v1.5 and a small convolutional head.

The backbone is ResNet v1.5 (He et al., 2016; the stride on the 3x3 convolution of each bottleneck) whose
layer3 and layer4 trade their stride for dilation, so it ends at output stride 8. The first block of a
dilated layer keeps the previous dilation: layer3 runs blocks at dilation 1, 2, 2, ...; layer4 at 2, 4, 4.
``FCNHead`` (3x3 conv to a quarter of the width, BatchNorm, ReLU, dropout 0.1, 1x1 conv to the classes)
scores layer4; with ``aux_loss=True`` a second head scores layer3 (the auxiliary loss of training). Each
head's scores are resized bilinearly (half-pixel centres, PyTorch's ``align_corners=False``) to the input.

Every padding is explicit and symmetric as in PyTorch (3 for the stem, 1 for the max-pool, the dilation for
3x3 convolutions): XLA's ``"SAME"`` pads a stride-2 convolution of an even size asymmetrically and changes
every logit. Any ``H, W >= 1`` is taken; each image is its own size (no padding into a multiple).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax.errors import ConfigError
from fcn_jax.models.base import Segmenter
from fcn_jax.models.fcn import check_images
from fcn_jax.models.layers import BatchNorm2d, Conv2d

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}  # bottlenecks per layer
EXPANSION = 4  # a bottleneck's output is 4x its width
WIDTHS = (64, 128, 256, 512)  # bottleneck widths of layer1..layer4
STRIDES = (1, 2, 2, 2)  # of layer1..layer4, before layer3 and layer4 turn theirs into dilation
DILATE = (False, False, True, True)  # torchvision's replace_stride_with_dilation, layer1 first
_HE_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's ResNet init


class Downsample(nnx.Module):
    """The projection shortcut: 1x1 convolution (stride ``s``, no bias) -> BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int, kw: dict, bn: dict):
        self.conv = Conv2d(cin, cout, 1, stride=stride, use_bias=False, kernel_init=_HE_FAN_OUT, **kw)
        self.bn = BatchNorm2d(cout, **bn)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 to ``4 * width``, each with BatchNorm, plus the shortcut; ReLU."""

    def __init__(self, cin: int, width: int, *, stride: int, dilation: int, kw: dict, bn: dict):
        cout = width * EXPANSION
        self.conv1 = Conv2d(cin, width, 1, use_bias=False, kernel_init=_HE_FAN_OUT, **kw)
        self.bn1 = BatchNorm2d(width, **bn)
        self.conv2 = Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, use_bias=False,
                            kernel_init=_HE_FAN_OUT, **kw)
        self.bn2 = BatchNorm2d(width, **bn)
        self.conv3 = Conv2d(width, cout, 1, use_bias=False, kernel_init=_HE_FAN_OUT, **kw)
        self.bn3 = BatchNorm2d(cout, **bn)
        self.downsample = Downsample(cin, cout, stride, kw, bn) if stride != 1 or cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    """``torch.nn.MaxPool2d(3, 2, padding=1)`` on NHWC: the padding never wins (-inf). The initial value is a
    concrete (numpy) scalar: JAX differentiates ``reduce_window`` only where it can see a max with -inf."""
    return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNetBackbone(nnx.Module):
    """torchvision's ResNet50/101 without ``avgpool`` and ``fc``, layer3 and layer4 dilated (output stride 8).

    ``(N, H, W, 3) -> {"aux": layer3 (N, h, w, 1024), "out": layer4 (N, h, w, 2048)}`` with ``h = ceil(H / 8)``
    (each of the three stride-2 steps rounds up). Modules are named as torchvision's: ``conv1``, ``bn1``,
    ``layer1`` .. ``layer4`` (lists of :class:`Bottleneck`). Expects ImageNet-normalised RGB.
    """

    kind = "resnet"  # a bare backbone file's "model"
    remat = False  # rematerialise each residual block in the backward pass (set by create_model(remat=True))
    batch_norm = True  # every ResNet has it; kept for the interface VGG backbones share

    def __init__(self, name: str = "resnet50", *, batch_norm: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        if name not in BLOCKS or not batch_norm:
            raise ConfigError(f"{name!r} with batch_norm={batch_norm}: ResNets are {', '.join(BLOCKS)}, with BatchNorm")
        self.name = name
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        bn = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, use_bias=False, kernel_init=_HE_FAN_OUT, **kw)
        self.bn1 = BatchNorm2d(64, **bn)
        cin, dilation = 64, 1
        for i, (blocks, width, stride, dilate) in enumerate(zip(BLOCKS[name], WIDTHS, STRIDES, DILATE,
                                                                strict=True), start=1):
            first_dilation = dilation
            if dilate:
                dilation, stride = dilation * stride, 1
            layer = [Bottleneck(cin, width, stride=stride, dilation=first_dilation, kw=kw, bn=bn)]
            cin = width * EXPANSION
            layer += [Bottleneck(cin, width, stride=1, dilation=dilation, kw=kw, bn=bn) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nnx.List(layer))

    def describe(self) -> str:
        return f"ResNetBackbone({self.name}, output stride 8)"

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = max_pool_3x3_stride_2(jax.nn.relu(self.bn1(self.conv1(x))))
        feats = {}
        run = nnx.remat(Bottleneck.__call__) if self.remat else Bottleneck.__call__
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                x = run(block, x)
            feats[i] = x
        return {"aux": feats[3], "out": feats[4]}


class FCNHead(nnx.Module):
    """torchvision's ``FCNHead``: 3x3 conv to ``in / 4`` (no bias) -> BatchNorm -> ReLU -> dropout (element-wise)
    -> 1x1 conv to the classes. Named by torchvision's ``Sequential`` indices: ``conv0``, ``bn1``, ``conv4``."""

    def __init__(self, cin: int, num_classes: int, *, dropout: float, kw: dict, bn: dict):
        self.conv0 = Conv2d(cin, cin // 4, 3, padding=1, use_bias=False, **kw)
        self.bn1 = BatchNorm2d(cin // 4, **bn)
        self.dropout = nnx.Dropout(dropout)
        self.conv4 = Conv2d(cin // 4, num_classes, 1, kernel_init=nnx.initializers.lecun_normal(), **kw)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        return self.conv4(self.dropout(jax.nn.relu(self.bn1(self.conv0(x))), rngs=rngs))


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on NHWC; without antialiasing, which
    ``jax.image.resize`` would add when shrinking (PyTorch's call has none)."""
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)


class FCNResNet(Segmenter):
    """``(N, H, W, 3)`` ImageNet-normalised NHWC images -> ``(N, H, W, num_classes)`` logits (``out``), and with
    ``aux=True`` the pair ``(out, aux)`` (the model must be built with ``aux_loss=True``).

    In train mode the heads' dropout (``dropout``, torchvision's 0.1) draws from ``rngs=nnx.Rngs(dropout=key)``;
    ``dropout=0`` turns it off. ``backbone`` and ``batch_norm`` are fixed by the arch and only checked.
    """

    family = "resnet"
    depth = ""  # the backbone: resnet50 or resnet101
    takes_dropout_rngs = True
    takes_aux = True

    def __init__(self, num_classes: int = 21, *, backbone: str | None = None, batch_norm: bool | None = None,
                 aux_loss: bool = False, dropout: float = 0.1, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None, rngs: nnx.Rngs):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if backbone not in (None, self.depth) or batch_norm is False:
            raise ConfigError(f"{self.arch} is built on {self.depth} with BatchNorm; for another depth choose "
                              f"another arch ({', '.join(f'fcn_{b}' for b in BLOCKS)})")
        self.num_classes, self.aux_loss = num_classes, aux_loss
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        bn = dict(dtype=dtype, param_dtype=param_dtype)
        self.backbone = ResNetBackbone(self.depth, **kw)
        self.classifier = FCNHead(512 * EXPANSION, num_classes, dropout=dropout, kw=kw, bn=bn)
        self.aux_classifier = FCNHead(256 * EXPANSION, num_classes, dropout=dropout, kw=kw, bn=bn) if aux_loss else None

    def config(self) -> dict:
        return {**super().config(), "aux_loss": self.aux_loss}

    def __call__(self, images: jax.Array, *, aux: bool = False, rngs: nnx.Rngs | None = None):
        if aux and self.aux_classifier is None:
            raise ConfigError(f"this {self.arch} has no aux head: build it with aux_loss=True")
        feats, out = self.features_and_logits(images, rngs=rngs)
        return (out, resize_bilinear(self.aux_classifier(feats["aux"], rngs), out.shape[1:3])) if aux else out

    def features_and_logits(self, images: jax.Array, *, rngs: nnx.Rngs | None = None
                            ) -> tuple[dict[str, jax.Array], jax.Array]:
        """The backbone's ``{"aux": layer3, "out": layer4}`` and the ``out`` logits, from one pass."""
        images = check_images(images)
        if rngs is None and not self.classifier.dropout.deterministic and self.classifier.dropout.rate > 0:
            raise ConfigError(f"in train mode {self.arch} needs rngs=nnx.Rngs(dropout=key) for its heads' dropout "
                              f"(or model.eval(), or dropout=0)")
        feats = self.backbone(images)
        return feats, resize_bilinear(self.classifier(feats["out"], rngs), images.shape[1:3])


class FCNResNet50(FCNResNet):
    arch = "fcn_resnet50"
    depth = "resnet50"


class FCNResNet101(FCNResNet):
    arch = "fcn_resnet101"
    depth = "resnet101"
