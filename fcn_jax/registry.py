"""The one registry of model families and their architectures.

A family is a set of architectures that share a backbone family and a PyTorch layout: its models module
(classes derived from :class:`~fcn_jax.models.base.Segmenter`), its torch-layout table (a module with
``layer_table(model)``, ``recognize(state_dict)`` and ``adapt(model, state_dict, found)``; see
:mod:`fcn_jax.weights.torch_layout`) and one :class:`Family` entry here. Everything else (``create_model``,
the command line's choices and help, loading and saving, evaluation, export) reads the registry, so adding a
family is those three things and nothing more (tests/test_architecture.py adds one inside the test).

This module imports no JAX: ``fcn-jax --help`` and the data-loading workers read it. Classes and layout
modules are named by ``"module:attribute"`` strings and imported when first used.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from fcn_jax.errors import ConfigError


@dataclasses.dataclass
class Family:
    """``archs``: architecture name -> its class (or ``"module:Class"``); ``backbones``: what ``backbone=`` takes;
    ``torch_layout``: the layout module (or its name); ``segmenters``: whether the archs give per-pixel logits at
    the input's size (the heatmap gives class scores per 32-pixel step); ``title``: one line for help texts;
    ``backbone_class``: the class a bare backbone of ``backbones`` is built from (backbone files, ImageNet
    weights), where this family defines it."""

    name: str
    title: str
    archs: dict[str, type | str]
    backbones: tuple[str, ...]
    torch_layout: ModuleType | str
    segmenters: bool = True
    backbone_class: type | str | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family``; its architecture names must be new."""
    taken = sorted(set(family.archs) & set(archs()))
    if family.name in FAMILIES or taken:
        raise ConfigError(f"family {family.name!r} or its archs {taken} are registered already")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def archs(*, family: str | None = None, segmenters: bool | None = None) -> tuple[str, ...]:
    """Architecture names in registration order, of one family and/or only (non-)segmenters."""
    return tuple(arch for f in FAMILIES.values() if family in (None, f.name)
                 and segmenters in (None, f.segmenters) for arch in f.archs)


def backbones() -> tuple[str, ...]:
    return tuple(dict.fromkeys(b for f in FAMILIES.values() for b in f.backbones))


def family_of(arch: str) -> Family:
    for f in FAMILIES.values():
        if arch in f.archs:
            return f
    raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(archs())}")


def _resolve(target):
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value


def model_class(arch: str) -> type:
    """The class that builds ``arch`` (imported on first use)."""
    return _resolve(family_of(arch).archs[arch])


def torch_layout(family: Family) -> ModuleType:
    return _resolve(family.torch_layout)


def default_backbone(arch: str) -> str:
    """The backbone ``arch`` is built on by default: the one its name ends with (``fcn_resnet101``), else its
    family's first (``vgg11``)."""
    backbones = family_of(arch).backbones
    return next((b for b in backbones if arch.endswith(b)), backbones[0])


def backbone_class(name: str) -> type:
    """The class of the bare backbone ``name`` (``vgg16``, ``resnet50``, ...)."""
    for f in FAMILIES.values():
        if name in f.backbones and f.backbone_class is not None:
            return _resolve(f.backbone_class)
    raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(backbones())}")


register(Family(
    "tutorial", "the tutorial's FCNs: ConvTranspose + BatchNorm decoders over torchvision's VGG",
    {arch: f"fcn_jax.models.fcn:{cls}" for arch, cls in
     (("fcn32s", "FCN32s"), ("fcn16s", "FCN16s"), ("fcn8s", "FCN8s"), ("fcns", "FCNs"))},
    ("vgg11", "vgg13", "vgg16", "vgg19"), "fcn_jax.weights.tutorial_layout",
    backbone_class="fcn_jax.models.vgg:VGGBackbone"))
register(Family(
    "paper", "the paper's FCNs: convolutionalized VGG, padding 100, crops, bilinear upsampling",
    {arch: f"fcn_jax.models.paper:{cls}" for arch, cls in
     (("fcn32s_paper", "FCN32sPaper"), ("fcn16s_paper", "FCN16sPaper"), ("fcn8s_paper", "FCN8sPaper"),
      ("fcn8s_atonce_paper", "FCN8sAtOncePaper"))},
    ("vgg11", "vgg13", "vgg16", "vgg19"), "fcn_jax.weights.paper_layout"))
register(Family(
    "heatmap", "the convolutionalized ImageNet classifier: class scores per 32-pixel step",
    {"heatmap": "fcn_jax.models.paper:Heatmap"}, ("vgg11", "vgg13", "vgg16", "vgg19"),
    "fcn_jax.weights.paper_layout", segmenters=False))
register(Family(
    "resnet", "torchvision's FCN-ResNets: dilated ResNet v1.5 (output stride 8), FCNHead, optional aux head",
    {"fcn_resnet50": "fcn_jax.models.resnet:FCNResNet50", "fcn_resnet101": "fcn_jax.models.resnet:FCNResNet101"},
    ("resnet50", "resnet101"), "fcn_jax.weights.resnet_layout", backbone_class="fcn_jax.models.resnet:ResNetBackbone"))
