"""PyTorch state_dicts <-> fcn-jax models, both ways, exactly.

Two torch layouts are understood:

- the whole reference FCN: ``pretrained_net.features.N.*``, ``deconvK.*``, ``bnK.*``, ``classifier.*``;
- torchvision's VGG: ``features.N.*`` (and ``classifier.{0,3,6}.*``, which FCN does not use and
  which are ignored with a note).

Every torch layer maps to one Flax layer through the table built by :func:`layer_table`, and each
layer kind has one transform (:data:`LAYER_KINDS`): Conv2d ``(out, in, kh, kw)`` and ConvTranspose2d
``(in, out, kh, kw)`` weights are both permuted ``(2, 3, 1, 0)`` into ``(kh, kw, ., .)`` kernels;
BatchNorm's ``weight, bias, running_mean, running_var, num_batches_tracked`` become ``scale, bias,
mean, var, num_batches_tracked``. Permutations are exact, so torch -> Flax -> torch is bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax import extras
from fcn_jax.errors import WeightsError, check_values, key_problems_message
from fcn_jax.models import FCN, VGGBackbone, torch_feature_indices
from fcn_jax.models.paper import Heatmap, PaperFCN
from fcn_jax.models.vgg import conv_names
from fcn_jax.notes import note


@dataclasses.dataclass(frozen=True)
class Field:
    torch: str  # tensor name in the torch layer
    flax: str  # variable name in the Flax layer
    perm: tuple[int, ...] | None = None  # torch -> Flax axis permutation
    flat: bool = False  # torch holds the (out, in, kh, kw) kernel flattened to (out, in * kh * kw): a Linear

    def to_flax(self, a: np.ndarray, flax_shape: tuple) -> np.ndarray:
        if self.flat:
            a = a.reshape(self._unflattened(flax_shape))
        return a if self.perm is None else np.transpose(a, self.perm)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        a = a if self.perm is None else np.transpose(a, np.argsort(self.perm))
        return a.reshape(a.shape[0], -1) if self.flat else a

    def torch_shape(self, flax_shape: tuple) -> tuple:
        shape = self._unflattened(flax_shape)
        return (shape[0], int(np.prod(shape[1:]))) if self.flat else shape

    def _unflattened(self, flax_shape: tuple) -> tuple:
        return flax_shape if self.perm is None else tuple(flax_shape[i] for i in np.argsort(self.perm))


LAYER_KINDS: dict[str, tuple[Field, ...]] = {
    "conv": (Field("weight", "kernel", (2, 3, 1, 0)), Field("bias", "bias")),
    "upsampling": (Field("weight", "kernel", (2, 3, 1, 0)),),  # the paper's bias-free ConvTranspose2d
    "linear": (Field("weight", "kernel", (2, 3, 1, 0), flat=True), Field("bias", "bias")),  # fc as a conv
    "bn": (Field("weight", "scale"), Field("bias", "bias"), Field("running_mean", "mean"),
           Field("running_var", "var"), Field("num_batches_tracked", "num_batches_tracked")),
}
VGG_DEPTHS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}  # conv layers -> name
TORCHVISION_CLASSIFIER = tuple(f"classifier.{i}.{t}" for i in (0, 3, 6) for t in ("weight", "bias"))


@dataclasses.dataclass(frozen=True)
class Layer:
    torch: str  # torch module prefix, e.g. "pretrained_net.features.0"
    flax: tuple  # path of the Flax module, e.g. ("backbone", "convs", 0)
    kind: str  # key of LAYER_KINDS


def layer_table(model: FCN | PaperFCN | Heatmap | VGGBackbone) -> list[Layer]:
    """The torch-module -> Flax-module table of ``model``, in torch's state_dict order."""
    if isinstance(model, VGGBackbone):
        return list(_backbone_layers(model, "features", ()))
    if isinstance(model, FCN):
        decoder = [Layer(f"{name}{k}", (f"{name}{k}",), kind)
                   for k in range(1, 6) for name, kind in (("deconv", "conv"), ("bn", "bn"))]
        return [*_backbone_layers(model.backbone, "pretrained_net.features", ("backbone",)), *decoder,
                Layer("classifier", ("classifier",), "conv")]
    if isinstance(model, PaperFCN):  # the published port's names
        head = [Layer("score_fr", ("score_fr",), "conv")]
        for _, score, upsampling, _, _ in model.skips:
            head += [Layer(score, (score,), "conv"), Layer(upsampling, (upsampling,), "upsampling")]
        return [*_paper_trunk(model), *head, Layer(model.upsample[0], (model.upsample[0],), "upsampling")]
    if isinstance(model, Heatmap):  # torchvision's VGG, classifier included
        return [*_backbone_layers(model.backbone, "features", ("vgg", "backbone")),
                *(Layer(f"classifier.{i}", path, "linear") for i, path in TORCHVISION_FC.items())]
    raise TypeError(f"expected an fcn_jax model or VGGBackbone, got {type(model).__name__}")


TORCHVISION_FC = {0: ("vgg", "fc6"), 3: ("vgg", "fc7"), 6: ("fc8",)}  # classifier.i -> the convolution


def _paper_trunk(model: PaperFCN) -> list[Layer]:
    """conv1_1 .. conv5_3, fc6, fc7: what a paper net shares with (and loads from) an ImageNet VGG."""
    convs = [Layer(name, ("vgg", "backbone", "convs", j), "conv")
             for j, name in enumerate(conv_names(model.backbone.name))]
    return [*convs, Layer("fc6", ("vgg", "fc6"), "conv"), Layer("fc7", ("vgg", "fc7"), "conv")]


def _backbone_layers(backbone: VGGBackbone, prefix: str, path: tuple) -> Iterator[Layer]:
    for j, (conv, bn) in enumerate(torch_feature_indices(backbone.name, backbone.batch_norm)):
        yield Layer(f"{prefix}.{conv}", (*path, "convs", j), "conv")
        if bn is not None:
            yield Layer(f"{prefix}.{bn}", (*path, "bns", j), "bn")


def torch_entries(model, layers: list[Layer] | None = None) -> Iterator[tuple[str, Field, nnx.Variable]]:
    """``(torch key, field, Flax variable)`` for every tensor of the torch layout of ``model`` (or of ``layers``)."""
    for layer in layer_table(model) if layers is None else layers:
        module = model
        for p in layer.flax:
            module = module[p] if isinstance(p, int) else getattr(module, p)
        for field in LAYER_KINDS[layer.kind]:
            yield f"{layer.torch}.{field.torch}", field, getattr(module, field.flax)


def describe(model) -> str:
    """``FCN8s(vgg16, batch_norm=False, num_classes=21)`` or ``VGGBackbone(vgg16_bn)``."""
    if isinstance(model, (PaperFCN, Heatmap)):
        return f"{type(model).__name__}({model.backbone.name}, num_classes={model.num_classes})"
    if isinstance(model, FCN):
        return (f"{type(model).__name__}({model.backbone.name}, batch_norm={model.backbone.batch_norm}, "
                f"num_classes={model.num_classes})")
    return f"VGGBackbone({model.name}{'_bn' if model.batch_norm else ''})"


# ---------------------------------------------------------------------------------------------
# Reading state_dicts


def read_torch_state_dict(source) -> dict[str, np.ndarray]:
    """A state_dict as ``{key: np.ndarray}`` from a mapping of tensors/arrays, an ``nn.Module``, or a
    ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or torch-layout ``.safetensors`` path.
    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a
    ``module.`` prefix (DataParallel) is removed."""
    if isinstance(source, (str, os.PathLike)):
        sd = _read_file(Path(source))
    elif isinstance(source, Mapping):
        sd = source
    elif callable(getattr(source, "state_dict", None)):
        sd = source.state_dict()
    else:
        raise WeightsError(f"expected a state_dict, an nn.Module or a path, got {type(source).__name__}")
    sd = _unwrap(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: _to_numpy(k, v) for k, v in sd.items()}


def _unwrap(sd: Mapping) -> Mapping:
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(sd.get(key), Mapping) and not any(_is_array(v) for v in sd.values()):
            note("using the weights under %r of the checkpoint", key)
            return sd[key]
    return sd


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(key: str, v) -> np.ndarray:
    if not _is_array(v):
        raise WeightsError(f"state_dict entry {key!r} is a {type(v).__name__}, not a tensor; pass the "
                           f"model's state_dict (e.g. checkpoint['model']), not a training checkpoint")
    if type(v).__module__.startswith("torch"):
        return extras.pytorch("io", "reading PyTorch tensors").to_numpy(v)
    return np.asarray(v)


def _read_file(path: Path) -> Mapping:
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                if (f.metadata() or {}).get("format", "").startswith("fcn-jax"):
                    raise WeightsError(f"{path} is an fcn-jax weights file (Flax layout), not a PyTorch "
                                       f"state_dict: load it with fcn_jax.load_model or fcn_jax.load_weights")
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except SafetensorError as e:
            raise WeightsError(f"could not read {path} as safetensors ({e}); the file is truncated or "
                               f"not a safetensors file: download or save it again") from e
    return extras.pytorch("io", f"reading {path.name}").load_file(path)


# ---------------------------------------------------------------------------------------------
# Inspecting and loading


PAPER_HEADS = {"upscore8.weight": "fcn8s_paper (or fcn8s_atonce_paper)", "upscore16.weight": "fcn16s_paper",
               "upscore.weight": "fcn32s_paper"}


def infer_config(sd: Mapping[str, np.ndarray]) -> dict:
    """What a torch state_dict holds: ``layout`` ("fcn" for the tutorial's FCN, "paper" for the paper's, "vgg"
    for torchvision's VGG), ``backbone``, ``batch_norm`` and, for a whole FCN, ``num_classes``. The tutorial's
    FCN arch cannot be told from the weights (all four decoders have the same layers); the paper's can
    (``arch``), except FCN-8s from FCN-8s at-once."""
    if "conv1_1.weight" in sd:
        n_convs = sum(1 for k in sd if re.fullmatch(r"conv\d+_\d+\.weight", k))
        cfg = {"layout": "paper", "backbone": VGG_DEPTHS.get(n_convs), "batch_norm": False,
               "arch": next((arch for key, arch in PAPER_HEADS.items() if key in sd), None)}
        if "score_fr.weight" in sd:
            cfg["num_classes"] = int(sd["score_fr.weight"].shape[0])
        return cfg
    layout = "fcn" if any(k.startswith("pretrained_net.") for k in sd) else "vgg"
    prefix = "pretrained_net.features." if layout == "fcn" else "features."
    feats = {k: v for k, v in sd.items() if k.startswith(prefix)}
    n_convs = sum(1 for k, v in feats.items() if k.endswith(".weight") and v.ndim == 4)
    cfg = {"layout": layout, "backbone": VGG_DEPTHS.get(n_convs),
           "batch_norm": any(k.endswith(".running_mean") for k in feats)}
    if layout == "fcn" and "classifier.weight" in sd and sd["classifier.weight"].ndim == 4:
        cfg["num_classes"] = int(sd["classifier.weight"].shape[0])
    return cfg


def _config_hints(found: dict, model) -> list[str]:
    backbone = model if isinstance(model, VGGBackbone) else model.backbone  # every whole net has one
    hints = []
    if found["batch_norm"] != backbone.batch_norm:
        hints.append(
            "the state_dict has BatchNorm statistics in its backbone (a vgg*_bn model): build the model "
            "with batch_norm=True" if found["batch_norm"] else
            "the state_dict has no BatchNorm layers in its backbone (a plain vgg model): build the model "
            "with batch_norm=False")
    if found["backbone"] and found["backbone"] != backbone.name:
        hints.append(f"the state_dict's backbone has the conv layers of {found['backbone']}: build the "
                     f"model with backbone={found['backbone']!r}")
    arch = getattr(model, "arch", None)
    if found.get("arch") and arch and arch not in found["arch"]:
        hints.append(f"the state_dict holds the layers of {found['arch']}: convert it as that (--arch "
                     f"{found['arch'].split()[0]}); to start {arch} from it, train with --init-weights on the result")
    if hasattr(model, "num_classes") and found.get("num_classes", model.num_classes) != model.num_classes:
        hints.append(f"the state_dict's classifier has {found['num_classes']} classes: build the model "
                     f"with num_classes={found['num_classes']}")
    return hints


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]  # torch keys copied into the model
    ignored: list[str]  # torch keys deliberately skipped (see notes)
    notes: list[str]


def load_torch_state_dict(model: FCN | VGGBackbone, source, *, strict: bool = True) -> LoadReport:
    """Copy PyTorch weights into ``model`` (an FCN or ``model.backbone``), in place.

    ``source``: a state_dict (torch tensors or numpy arrays), an ``nn.Module``, or a path (``.pth``,
    ``.pt``, ``.bin``, torch-layout ``.safetensors``). A whole reference FCN loads into an FCN; a
    torchvision VGG state_dict loads into a :class:`VGGBackbone` (its fully connected
    ``classifier`` is ignored), as does the backbone part of a whole FCN.

    Nothing is written unless everything fits: every missing, unexpected (with ``strict``) and
    mis-shaped key is collected into one :class:`~fcn_jax.errors.WeightsError`, with hints when the
    state_dict comes from another backbone depth, BatchNorm variant or number of classes.
    """
    sd = read_torch_state_dict(source)
    found = infer_config(sd)
    ignored, notes, layers = [], [], None
    if isinstance(model, VGGBackbone):
        if found["layout"] == "fcn":
            ignored = [k for k in sd if not k.startswith("pretrained_net.")]
            sd = {k[len("pretrained_net."):]: v for k, v in sd.items() if k.startswith("pretrained_net.")}
            notes.append("loaded the backbone of a whole FCN state_dict; its decoder was ignored")
        fully_connected = [k for k in TORCHVISION_CLASSIFIER if k in sd]
        if fully_connected:
            notes.append("ignored torchvision's fully connected classifier (classifier.0/3/6), which FCN "
                         "does not use")
            ignored += fully_connected
            sd = {k: v for k, v in sd.items() if k not in fully_connected}
    elif isinstance(model, PaperFCN):
        if found["layout"] == "fcn":
            raise WeightsError("this is the tutorial FCN's layout (pretrained_net.features.N, deconvK, bnK), not the "
                               "paper's: build fcn32s, fcn16s, fcn8s or fcns (e.g. create_model('fcn8s', ...))")
        if found["layout"] == "vgg":  # an ImageNet VGG: the shared trunk only
            sd, ignored, notes = trunk_from_torchvision(sd, model)
            layers = _paper_trunk(model)
    elif isinstance(model, Heatmap):
        if found["layout"] != "vgg":
            raise WeightsError("the heatmap model loads torchvision's whole VGG state_dict (features.N.*, "
                               "classifier.0/3/6.*); this one is an FCN's")
    elif found["layout"] == "paper":
        raise WeightsError(f"this is the paper's FCN layout (conv1_1, fc6, score_fr, upscore...): build "
                           f"{found['arch'] or 'fcn32s_paper, fcn16s_paper or fcn8s_paper'} instead "
                           f"(e.g. create_model('{(found['arch'] or 'fcn8s_paper').split()[0]}', ...))")
    elif found["layout"] == "vgg" and any(k.startswith("features.") for k in sd):
        raise WeightsError("this is a backbone-only (torchvision VGG) state_dict, not a whole FCN: load it "
                           "into the backbone with fcn_jax.load_torch_state_dict(model.backbone, ...)")

    entries = {key: (field, var) for key, field, var in torch_entries(model, layers)}
    missing = [(k, field.torch_shape(var.shape)) for k, (field, var) in entries.items() if k not in sd]
    unexpected = [(k, v.shape) for k, v in sd.items() if k not in entries] if strict else []
    misshaped = [(k, field.torch_shape(var.shape), sd[k].shape) for k, (field, var) in entries.items()
                 if k in sd and sd[k].shape != field.torch_shape(var.shape)]
    if missing or unexpected or misshaped:
        raise WeightsError(key_problems_message(describe(model), missing, unexpected, misshaped,
                                                _config_hints(found, model)))
    check_values(source if isinstance(source, (str, os.PathLike)) else "the state_dict",
                 {k: (sd[k], jnp.issubdtype(var.dtype, jnp.floating)) for k, (_, var) in entries.items()})
    for key, (field, var) in entries.items():
        # jnp.array copies: jnp.asarray may alias the torch tensor's memory on CPU, and torch
        # updates BatchNorm statistics in place.
        var.set_value(jnp.array(field.to_flax(sd[key], var.shape), dtype=var.dtype, copy=True))
    for text in notes:
        note(text)
    ignored += [k for k in sd if k not in entries]
    return LoadReport(loaded=list(entries), ignored=ignored, notes=notes)


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


def to_torch_state_dict(model: FCN | VGGBackbone, *, as_torch: bool = False) -> dict:
    """The torch state_dict of ``model``: the reference FCN layout for an FCN, torchvision's
    ``features.N.*`` for a backbone. Values are numpy arrays (``num_batches_tracked`` int64, as
    torch keeps it); ``as_torch=True`` gives torch tensors, ready for
    ``torch_model.load_state_dict(sd, strict=True)``."""
    sd = {}
    for key, field, var in torch_entries(model):
        a = field.to_torch(np.asarray(var[...]))
        sd[key] = a.astype(np.int64) if field.torch == "num_batches_tracked" else np.ascontiguousarray(a)
    return extras.pytorch("io", "as_torch=True").from_numpy(sd) if as_torch else sd
