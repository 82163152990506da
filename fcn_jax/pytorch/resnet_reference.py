"""torchvision's own FCN-ResNets and ImageNet ResNets, built without downloading anything: the references of
the ``resnet`` family (fidelity tests, ``convert --verify``, ``compare``)."""

from __future__ import annotations

import torch
from torchvision.models import resnet50, resnet101
from torchvision.models.segmentation import fcn_resnet50, fcn_resnet101

from fcn_jax.pytorch.reference import randomize_batchnorm_

BUILDERS = {"fcn_resnet50": fcn_resnet50, "fcn_resnet101": fcn_resnet101}
CLASSIFIERS = {"resnet50": resnet50, "resnet101": resnet101}


def build_torchvision_fcn(arch: str, num_classes: int = 21, *, aux_loss: bool = False) -> torch.nn.Module:
    """``torchvision.models.segmentation.fcn_resnet50/101`` with fresh weights (no ImageNet backbone)."""
    return BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)


def random_torchvision_fcn(arch: str, num_classes: int = 21, *, aux_loss: bool = False, seed: int = 0,
                           dropout: bool = True) -> torch.nn.Module:
    """:func:`build_torchvision_fcn` initialised from ``seed``, every BatchNorm moved off its defaults (so eval and
    train mode differ), in train mode; ``dropout=False`` sets the heads' dropout to 0 (train-mode parity)."""
    torch.manual_seed(seed)
    twin = randomize_batchnorm_(build_torchvision_fcn(arch, num_classes, aux_loss=aux_loss), seed)
    if not dropout:
        for module in twin.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return twin


def build_torchvision_resnet(name: str) -> torch.nn.Module:
    """torchvision's ImageNet classifier ``resnet50`` / ``resnet101`` with fresh weights."""
    return CLASSIFIERS[name](weights=None)
