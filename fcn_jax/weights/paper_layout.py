"""The paper's FCNs in the layout of the PyTorch port of the Caffe weights (``conv1_1`` .. ``conv5_3``, ``fc6``,
``fc7``, ``score_fr``, ``score_poolN``, ``upscore*``), and the heatmap in torchvision's VGG layout (``features.N``,
``classifier.0/3/6``, the fully connected layers as convolutions). A whole torchvision VGG also loads into a paper
net's trunk."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from fcn_jax.errors import WeightsError
from fcn_jax.models.paper import Heatmap, PaperFCN
from fcn_jax.models.vgg import conv_names, torch_feature_indices
from fcn_jax.weights.torch_layout import VGG_DEPTHS, Layer, backbone_layers

# the head's last upsampling names the arch (FCN-8s and FCN-8s at-once share their layers)
PAPER_HEADS = {"upscore8.weight": "fcn8s_paper (or fcn8s_atonce_paper)", "upscore16.weight": "fcn16s_paper",
               "upscore.weight": "fcn32s_paper"}


def layer_table(model: PaperFCN | Heatmap) -> list[Layer]:
    if isinstance(model, Heatmap):  # torchvision's VGG, classifier included
        return [*backbone_layers(model.backbone, "features", ("vgg", "backbone")),
                *(Layer(f"classifier.{i}", path, "linear") for i, path in TORCHVISION_FC.items())]
    head = [Layer("score_fr", ("score_fr",), "conv")]
    for _, score, upsampling, _, _ in model.skips:
        head += [Layer(score, (score,), "conv"), Layer(upsampling, (upsampling,), "upsampling")]
    return [*trunk_layers(model), *head, Layer(model.upsample[0], (model.upsample[0],), "upsampling")]


TORCHVISION_FC = {0: ("vgg", "fc6"), 3: ("vgg", "fc7"), 6: ("fc8",)}  # classifier.i -> the convolution


def trunk_layers(model: PaperFCN) -> list[Layer]:
    """conv1_1 .. conv5_3, fc6, fc7: what a paper net shares with (and loads from) an ImageNet VGG."""
    convs = [Layer(name, ("vgg", "backbone", "convs", j), "conv")
             for j, name in enumerate(conv_names(model.backbone.name))]
    return [*convs, Layer("fc6", ("vgg", "fc6"), "conv"), Layer("fc7", ("vgg", "fc7"), "conv")]


def recognize(sd: Mapping[str, np.ndarray]) -> dict | None:
    """``layout`` "paper", ``backbone``, ``arch`` (where the weights can tell) and ``num_classes``; None for another
    layout (torchvision's VGG is recognised by :func:`fcn_jax.weights.torch_layout.infer_config`)."""
    if "conv1_1.weight" not in sd:
        return None
    n_convs = sum(1 for k in sd if re.fullmatch(r"conv\d+_\d+\.weight", k))
    cfg = {"layout": "paper", "family": "paper", "backbone": VGG_DEPTHS.get(n_convs), "batch_norm": False,
           "arch": next((arch for key, arch in PAPER_HEADS.items() if key in sd), None)}
    if "score_fr.weight" in sd:
        cfg["num_classes"] = int(sd["score_fr.weight"].shape[0])
    return cfg


def adapt(model: PaperFCN | Heatmap, sd: dict, found: dict) -> tuple[dict, list[str], list[str], list[Layer] | None]:
    """``(state_dict, ignored keys, notes, layers to load)``: a torchvision VGG into a paper net's trunk."""
    if isinstance(model, Heatmap):
        if found["layout"] != "vgg":
            raise WeightsError("the heatmap model loads torchvision's whole VGG state_dict (features.N.*, "
                               "classifier.0/3/6.*); this one is an FCN's")
        return sd, [], [], None
    if found["layout"] == "vgg":  # an ImageNet VGG: the shared trunk only
        sd, ignored, notes = trunk_from_torchvision(sd, model)
        return sd, ignored, notes, trunk_layers(model)
    return sd, [], [], None


def trunk_from_torchvision(sd: dict, model: PaperFCN) -> tuple[dict, list[str], list[str]]:
    """torchvision's VGG keys renamed to the paper's (``features.N`` -> ``convB_L``, ``classifier.0/3`` -> ``fc6``/
    ``fc7``, reshaped to convolutions); ``(state_dict, ignored keys, notes)``. Keys that do not map stay as they
    are, so that a VGG of another depth is reported as such."""
    renamed, used = {}, set()
    layers = zip(conv_names(model.backbone.name), torch_feature_indices(model.backbone.name, False), strict=True)
    for name, (index, _) in layers:
        for t in ("weight", "bias"):
            if f"features.{index}.{t}" in sd:
                renamed[f"{name}.{t}"] = sd[f"features.{index}.{t}"]
                used.add(f"features.{index}.{t}")
    for i, (name, shape) in {0: ("fc6", (4096, 512, 7, 7)), 3: ("fc7", (4096, 4096, 1, 1))}.items():
        for t in ("weight", "bias"):
            if (a := sd.get(f"classifier.{i}.{t}")) is not None:
                renamed[f"{name}.{t}"] = a.reshape(shape) if t == "weight" and a.size == np.prod(shape) else a
                used.add(f"classifier.{i}.{t}")
    ignored = [k for k in ("classifier.6.weight", "classifier.6.bias") if k in sd]
    renamed.update({k: v for k, v in sd.items() if k not in used and k not in ignored})
    notes = [f"loaded the VGG trunk (convolutions, fc6 and fc7 as convolutions); {model.arch}'s score and "
             f"upsampling layers keep their initial values" + ("; ImageNet's fc8 (classifier.6) is not used"
                                                                if ignored else "")]
    return renamed, ignored, notes
