"""torchvision's published weights (ImageNet VGG and ResNet classifiers, the COCO-with-VOC-labels FCN-ResNets),
fetched by torchvision or read from torch hub's cache."""

from __future__ import annotations

import re

from torchvision import models

from fcn_jax.errors import ConfigError, WeightsError

NAMES = r"vgg(11|13|16|19)(_bn)?|resnet(50|101)|fcn_resnet(50|101)"


def torchvision_state_dict(name: str) -> dict:
    """torchvision's DEFAULT weights of ``vgg11`` .. ``vgg19_bn``, ``resnet50``, ``resnet101`` (ImageNet) or
    ``fcn_resnet50``, ``fcn_resnet101`` (COCO with VOC's 21 labels, aux head included), from torch hub's cache
    or downloaded, with a clear error where the machine cannot reach download.pytorch.org."""
    if not re.fullmatch(NAMES, name):
        raise ConfigError(f"--torchvision takes vgg11, vgg13, vgg16, vgg19 (or their _bn variants), resnet50, "
                          f"resnet101, fcn_resnet50 or fcn_resnet101, got {name!r}")
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


def torchvision_categories(name: str) -> list[str] | None:
    """The class names torchvision ships with ``name``'s DEFAULT weights (no download)."""
    return list(models.get_model_weights(name).DEFAULT.meta.get("categories") or []) or None
