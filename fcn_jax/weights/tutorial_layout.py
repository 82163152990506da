"""The tutorial's FCN in PyTorch's layout: ``pretrained_net.features.N.*`` (torchvision's VGG numbering, with
``_bn`` BatchNorms), ``deconvK.*``, ``bnK.*``, ``classifier.*``. The four decoders have the same layers, so
the weights cannot tell which one they are."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fcn_jax.errors import WeightsError
from fcn_jax.models.fcn import FCN
from fcn_jax.weights.torch_layout import Layer, backbone_layers, vgg_features_config

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
    cfg = {"layout": "fcn", **vgg_features_config(sd, PREFIX + "features.")}
    if "classifier.weight" in sd and sd["classifier.weight"].ndim == 4:
        cfg["num_classes"] = int(sd["classifier.weight"].shape[0])
    return cfg


def adapt(model: FCN, sd: dict, found: dict) -> tuple[dict, list[str], list[str], list[Layer] | None]:
    """``(state_dict, ignored keys, notes, layers to load)``; another family's layout is an error naming the
    model to build."""
    if found["layout"] == "paper":
        raise WeightsError(f"this is the paper's FCN layout (conv1_1, fc6, score_fr, upscore...): build "
                           f"{found['arch'] or 'fcn32s_paper, fcn16s_paper or fcn8s_paper'} instead "
                           f"(e.g. create_model('{(found['arch'] or 'fcn8s_paper').split()[0]}', ...))")
    if found["layout"] == "vgg" and any(k.startswith("features.") for k in sd):
        raise WeightsError("this is a backbone-only (torchvision VGG) state_dict, not a whole FCN: load it "
                           "into the backbone with fcn_jax.load_torch_state_dict(model.backbone, ...)")
    return sd, [], [], None
