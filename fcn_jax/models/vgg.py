"""VGG feature extractor (Simonyan & Zisserman, 2015) as the FCN backbone.

A cfg entry ``v`` is a 3x3 convolution (padding 1) to ``v`` channels followed by ReLU (conv -> BN ->
ReLU in the ``_bn`` variants); ``"M"`` is a 2x2 max-pool with stride 2. The backbone returns the
five feature maps taken right after each pool: ``x1`` (stride 2, 64 ch) .. ``x5`` (stride 32, 512 ch).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax.errors import ConfigError
from fcn_jax.models.layers import BatchNorm2d, Conv2d, max_pool_2x2, pad_to_even

CFGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
BACKBONES = tuple(CFGS)


def check_backbone_name(name: str) -> tuple:
    """The cfg of ``name``, or a ConfigError listing the valid names."""
    if name not in CFGS:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} "
                         f"(BatchNorm variants: pass batch_norm=True)")
    return CFGS[name]


def mask_beyond(x: jax.Array, extents: jax.Array) -> jax.Array:
    """``x`` (NHWC) with every position at or beyond row ``extents[n, 0]`` / column ``extents[n, 1]`` of image
    ``n`` set to zero."""
    rows = jnp.arange(x.shape[1])[None, :, None] < extents[:, None, None, 0]
    cols = jnp.arange(x.shape[2])[None, None, :] < extents[:, None, None, 1]
    return jnp.where((rows & cols)[..., None], x, jnp.zeros((), x.dtype))


def conv_names(name: str) -> list[str]:
    """The paper's names of the cfg's convolutions: ``conv1_1``, ``conv1_2``, ``conv2_1`` ... (``convB_L``: block
    B, layer L), as in the PyTorch port of the Caffe FCN weights."""
    names, block, layer = [], 1, 0
    for v in check_backbone_name(name):
        if v == "M":
            block, layer = block + 1, 0
        else:
            layer += 1
            names.append(f"conv{block}_{layer}")
    return names


def torch_feature_indices(name: str, batch_norm: bool) -> list[tuple[int, int | None]]:
    """For each conv of the cfg, its index in torchvision's flat ``features`` Sequential and that of
    its BatchNorm (None without BN). Every conv, BN, ReLU and pool takes one index."""
    indices, i = [], 0
    for v in check_backbone_name(name):
        if v == "M":
            i += 1
        else:
            indices.append((i, i + 1 if batch_norm else None))
            i += 3 if batch_norm else 2
    return indices


def feature_ranges(name: str, batch_norm: bool) -> tuple[tuple[int, int], ...]:
    """The reference's ``ranges``: half-open intervals of ``features`` indices, each ending right
    after a max-pool. Derived from the cfg, so it is right for the ``_bn`` variants too."""
    ranges, start, i = [], 0, 0
    for v in check_backbone_name(name):
        i += 1 if v == "M" else (3 if batch_norm else 2)
        if v == "M":
            ranges.append((start, i))
            start = i
    return tuple(ranges)


def _stages(cfg: tuple) -> tuple[tuple[int, ...], ...]:
    """The conv indices of each stage: the convolutions before each max-pool."""
    stages, j = [[]], 0
    for v in cfg:
        if v == "M":
            stages.append([])
        else:
            stages[-1].append(j)
            j += 1
    return tuple(tuple(stage) for stage in stages[:-1])


class VGGBackbone(nnx.Module):
    """VGG ``features``: ``(N, H, W, 3)`` NHWC -> ``{"x1": (N, H/2, W/2, 64), ..., "x5": (N, H/32,
    W/32, 512)}``. Pools floor odd sizes like ``torch.nn.MaxPool2d``.

    Parameters: ``convs[j].kernel/bias`` for the j-th conv of the cfg and, with ``batch_norm``,
    ``bns[j]`` after it. Load torchvision's ImageNet weights with
    ``fcn_jax.load_torch_state_dict(backbone, torchvision.models.vgg16(...).state_dict())``; they
    expect RGB in [0, 1] normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    """

    kind = "vgg"  # a bare backbone file's "model"
    remat = False  # rematerialise each stage in the backward pass (set by create_model(remat=True))

    def __init__(self, name: str = "vgg16", *, batch_norm: bool = False, first_padding: int = 1,
                 ceil_mode: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, precision=None,
                 rngs: nnx.Rngs):
        """``first_padding`` (the paper's nets: 100) pads the first convolution; ``ceil_mode`` rounds odd sizes up
        in the pools instead of down, like PyTorch's ``MaxPool2d(2, 2, ceil_mode=True)``."""
        self.name, self.batch_norm, self.ceil_mode = name, batch_norm, ceil_mode
        self.cfg = check_backbone_name(name)
        widths = [v for v in self.cfg if v != "M"]
        # fan_out He init, as torchvision initialises VGG.
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.convs = nnx.List([
            Conv2d(cin, cout, 3, padding=first_padding if j == 0 else 1, kernel_init=init, dtype=dtype,
                   param_dtype=param_dtype, precision=precision, rngs=rngs)
            for j, (cin, cout) in enumerate(itertools.pairwise([3, *widths]))])
        self.bns = nnx.List([BatchNorm2d(c, dtype=dtype, param_dtype=param_dtype) for c in widths]
                            if batch_norm else [])
        self.stages = _stages(self.cfg)

    def describe(self) -> str:
        """``VGGBackbone(vgg16_bn)``: for messages."""
        return f"VGGBackbone({self.name}{'_bn' if self.batch_norm else ''})"

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        return self.features_and_extents(x)[0]

    def features_and_extents(self, x: jax.Array, extents: jax.Array | None = None) -> tuple[dict, dict]:
        """The features, and with ``extents`` (``(N, 2)`` int: each image's height and width at the top left of a
        zero-padded batch) each feature map's valid extent, everything beyond it set to zero after every layer:
        exactly what the network computes on each image alone, whose borders it pads with zeros.

        With ``remat`` each stage (its convolutions and the pool that ends it) is rematerialised: only the
        stages' outputs are kept for the backward pass, the rest is computed again there."""
        stage = nnx.remat(VGGBackbone._stage, static_argnums=(1,)) if self.remat else VGGBackbone._stage
        feats, sizes = {}, {}
        for s in range(len(self.stages)):
            x, extents = stage(self, s, x, extents)
            feats[f"x{s + 1}"], sizes[f"x{s + 1}"] = x, extents
        return feats, sizes

    def _stage(self, s: int, x: jax.Array, extents: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        for j in self.stages[s]:
            x = self.convs[j](x)
            if self.batch_norm:
                x = self.bns[j](x)
            x = jax.nn.relu(x)
            if extents is not None:
                extents = extents + 2 * self.convs[j].padding[0] - 2
                x = mask_beyond(x, extents)
        x = max_pool_2x2(pad_to_even(x) if self.ceil_mode else x)  # post-ReLU: masked zeros never win
        if extents is not None:
            extents = (extents + 1) // 2 if self.ceil_mode else extents // 2
            x = mask_beyond(x, extents)
        return x, extents
