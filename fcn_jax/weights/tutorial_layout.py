"""The tutorial's FCN in PyTorch's layout: ``pretrained_net.features.N.*`` (torchvision's VGG numbering, with
``_bn`` BatchNorms), ``deconvK.*``, ``bnK.*``, ``classifier.*``. The four decoders have the same layers, so
the weights cannot tell which one they are."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fcn_jax.errors import WeightsError
from fcn_jax.models.fcn import FCN
from fcn_jax.models.vgg import VGGBackbone
from fcn_jax.weights.torch_layout import TORCHVISION_CLASSIFIER, Layer, backbone_layers, vgg_features_config

PREFIX = "pretrained_net."


def layer_table(model: FCN) -> list[Layer]:
    decoder = [Layer(f"{name}{k}", (f"{name}{k}",), kind)
               for k in range(1, 6) for name, kind in (("deconv", "conv"), ("bn", "bn"))]
    return [*backbone_layers(model.backbone, "pretrained_net.features", ("backbone",)), *decoder,
            Layer("classifier", ("classifier",), "conv")]


def recognize(sd: Mapping[str, np.ndarray]) -> dict | None:
    """``layout`` "fcn", ``backbone``, ``batch_norm`` and ``num_classes``; None for another layout."""
    if not any(k.startswith(PREFIX) for k in sd):
        return None
    cfg = {"layout": "fcn", "family": "tutorial", **vgg_features_config(sd, PREFIX + "features.")}
    if "classifier.weight" in sd and sd["classifier.weight"].ndim == 4:
        cfg["num_classes"] = int(sd["classifier.weight"].shape[0])
    return cfg


def adapt(model: FCN, sd: dict, found: dict) -> tuple[dict, list[str], list[str], list[Layer] | None]:
    """``(state_dict, ignored keys, notes, layers to load)``; a backbone-only file is an error saying where it
    loads."""
    if found["layout"] == "vgg" and any(k.startswith("features.") for k in sd):
        raise WeightsError("this is a backbone-only (torchvision VGG) state_dict, not a whole FCN: load it "
                           "into the backbone with fcn_jax.load_torch_state_dict(model.backbone, ...)")
    return sd, [], [], None


def backbone_table(backbone: VGGBackbone) -> list[Layer]:
    """torchvision's VGG ``features.N`` -> a bare VGG backbone."""
    return list(backbone_layers(backbone, "features", ()))


def adapt_backbone(backbone: VGGBackbone, sd: dict, found: dict) -> tuple[dict, list[str], list[str]]:
    """``(state_dict, ignored keys, notes)`` for a bare VGG backbone: a torchvision VGG (its fully connected
    classifier unused) or the backbone of a whole tutorial FCN (its decoder unused)."""
    ignored, notes = [], []
    if found["layout"] == "fcn":
        ignored = [k for k in sd if not k.startswith(PREFIX)]
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
        notes.append("loaded the backbone of a whole FCN state_dict; its decoder was ignored")
    fully_connected = [k for k in TORCHVISION_CLASSIFIER if k in sd]
    if fully_connected:
        notes.append("ignored torchvision's fully connected classifier (classifier.0/3/6), which FCN does not use")
        ignored += fully_connected
        sd = {k: v for k, v in sd.items() if k not in fully_connected}
    return sd, ignored, notes
