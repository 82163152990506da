"""torchvision's FCN-ResNet layout (``backbone.conv1``, ``backbone.layerL.B.*``, ``classifier.{0,1,4}``,
``aux_classifier.{0,1,4}``), and torchvision's ImageNet ResNet (the same backbone keys without ``backbone.``,
plus ``fc.*``, which FCN does not use) into the backbone of an FCN-ResNet or a bare ResNet backbone."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from fcn_jax.errors import WeightsError
from fcn_jax.models.resnet import BLOCKS, FCNResNet, ResNetBackbone
from fcn_jax.weights.torch_layout import Layer

PREFIX = "backbone."
IMAGENET_FC = ("fc.weight", "fc.bias")
HEAD = ((0, "conv0", "conv_no_bias"), (1, "bn1", "bn"), (4, "conv4", "conv"))  # Sequential index, module, kind


def backbone_table(backbone: ResNetBackbone, prefix: str = "", path: tuple = ()) -> list[Layer]:
    """torchvision's ResNet keys (under ``prefix``) -> the backbone's modules (under ``path``)."""
    layers = [Layer(f"{prefix}conv1", (*path, "conv1"), "conv_no_bias"), Layer(f"{prefix}bn1", (*path, "bn1"), "bn")]
    for i in range(1, 5):
        for b, block in enumerate(getattr(backbone, f"layer{i}")):
            torch, flax = f"{prefix}layer{i}.{b}", (*path, f"layer{i}", b)
            for k in (1, 2, 3):
                layers += [Layer(f"{torch}.conv{k}", (*flax, f"conv{k}"), "conv_no_bias"),
                           Layer(f"{torch}.bn{k}", (*flax, f"bn{k}"), "bn")]
            if block.downsample is not None:
                layers += [Layer(f"{torch}.downsample.0", (*flax, "downsample", "conv"), "conv_no_bias"),
                           Layer(f"{torch}.downsample.1", (*flax, "downsample", "bn"), "bn")]
    return layers


def layer_table(model: FCNResNet) -> list[Layer]:
    heads = ["classifier"] + (["aux_classifier"] if model.aux_classifier is not None else [])
    return [*backbone_table(model.backbone, PREFIX, ("backbone",)),
            *(Layer(f"{head}.{index}", (head, name), kind) for head in heads for index, name, kind in HEAD)]


def _depth(sd: Mapping, prefix: str) -> str | None:
    blocks = {m.group(1) for k in sd if (m := re.fullmatch(rf"{re.escape(prefix)}layer3\.(\d+)\.conv1\.weight", k))}
    return next((name for name, counts in BLOCKS.items() if counts[2] == len(blocks)), None)


def recognize(sd: Mapping[str, np.ndarray]) -> dict | None:
    """A whole FCN-ResNet (``layout`` "fcn_resnet", with ``arch``, ``num_classes`` and ``options``: ``aux_loss``)
    or an ImageNet ResNet (``layout`` "resnet", ``backbone_only``); None for another layout."""
    if f"{PREFIX}layer1.0.conv1.weight" in sd:
        backbone = _depth(sd, PREFIX)
        found = {"layout": "fcn_resnet", "family": "resnet", "backbone": backbone, "batch_norm": True,
                 "arch": backbone and f"fcn_{backbone}", "options": {"aux_loss": "aux_classifier.4.weight" in sd}}
        if "classifier.4.weight" in sd:
            found["num_classes"] = int(sd["classifier.4.weight"].shape[0])
        return found
    if "layer1.0.conv1.weight" in sd:
        backbone = _depth(sd, "")
        return {"layout": "resnet", "family": "resnet", "backbone": backbone, "batch_norm": True,
                "arch": backbone and f"fcn_{backbone}", "backbone_only": True}
    return None


def adapt(model: FCNResNet, sd: dict, found: dict) -> tuple[dict, list[str], list[str], list[Layer] | None]:
    """``(state_dict, ignored keys, notes, layers to load)``: an ImageNet ResNet loads the backbone only; a file's
    aux head is left out of a model built without one (with a note)."""
    if found["layout"] == "resnet":
        sd, ignored, notes = _without_fc({PREFIX + k if k not in IMAGENET_FC else k: v for k, v in sd.items()})
        notes.append(f"loaded the ImageNet ResNet into the backbone; {model.arch}'s heads keep their initial values")
        return sd, ignored, notes, backbone_table(model.backbone, PREFIX, ("backbone",))
    aux_loss = found["options"]["aux_loss"]
    if aux_loss and model.aux_classifier is None:
        aux = [k for k in sd if k.startswith("aux_classifier.")]
        return ({k: v for k, v in sd.items() if k not in aux}, aux,
                ["the state_dict's aux head (aux_classifier.*) is not used: build the model with aux_loss=True to "
                 "keep it"], None)
    if model.aux_classifier is not None and not aux_loss:
        raise WeightsError("the state_dict has no aux head (aux_classifier.*): build the model with aux_loss=False")
    return sd, [], [], None


def adapt_backbone(backbone: ResNetBackbone, sd: dict, found: dict) -> tuple[dict, list[str], list[str]]:
    """``(state_dict, ignored keys, notes)`` for a bare backbone: an ImageNet ResNet (its ``fc`` unused), or the
    backbone of a whole FCN-ResNet (its heads unused)."""
    if found["layout"] == "fcn_resnet":
        heads = [k for k in sd if not k.startswith(PREFIX)]
        return ({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, heads,
                ["loaded the backbone of a whole FCN-ResNet state_dict; its heads were ignored"])
    return _without_fc(sd)


def _without_fc(sd: dict) -> tuple[dict, list[str], list[str]]:
    fc = [k for k in IMAGENET_FC if k in sd]
    notes = ["ignored the ImageNet classifier (fc.weight, fc.bias), which FCN does not use"] if fc else []
    return {k: v for k, v in sd.items() if k not in fc}, fc, notes
