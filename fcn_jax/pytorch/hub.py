"""torchvision's ImageNet VGG weights, fetched by torchvision (or read from torch hub's cache)."""

from __future__ import annotations

import re

from torchvision import models

from fcn_jax.errors import ConfigError, WeightsError


def torchvision_state_dict(name: str) -> dict:
    """torchvision's ImageNet weights for ``vgg11`` .. ``vgg19_bn`` (from torch hub's cache, or
    downloaded), with a clear error where the machine cannot reach download.pytorch.org."""
    if not re.fullmatch(r"vgg(11|13|16|19)(_bn)?", name):
        raise ConfigError(f"--torchvision takes vgg11, vgg13, vgg16, vgg19 or their _bn variants, got {name!r}")
    weights = models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
        raise WeightsError(
            f"could not download torchvision's {name} weights from {weights.url} ({e}). On a machine with "
            f"internet run `fcn-jax convert --torchvision {name} --output {name}.safetensors` and copy the "
            f"file here, or download {weights.url} and pass it with --input") from e


def imagenet_categories() -> list[str]:
    """ImageNet's 1000 class names, as torchvision ships them with its weight enums (no download)."""
    return list(models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])
