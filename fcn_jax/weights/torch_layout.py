"""PyTorch state_dicts <-> fcn-jax models, both ways, exactly: the machinery every family's layout shares.

Each registered family (:mod:`fcn_jax.registry`) has a layout module with its table and its checks
(:mod:`~fcn_jax.weights.tutorial_layout`, :mod:`~fcn_jax.weights.paper_layout`); a bare backbone takes
torchvision's VGG ``features.N.*`` (its ``classifier.{0,3,6}.*`` ignored with a note).

Every torch layer maps to one Flax layer through the table built by :func:`layer_table`, and each
layer kind has one transform (:data:`LAYER_KINDS`): Conv2d ``(out, in, kh, kw)`` and ConvTranspose2d
``(in, out, kh, kw)`` weights are both permuted ``(2, 3, 1, 0)`` into ``(kh, kw, ., .)`` kernels;
BatchNorm's ``weight, bias, running_mean, running_var, num_batches_tracked`` become ``scale, bias,
mean, var, num_batches_tracked``. Permutations are exact, so torch -> Flax -> torch is bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax import extras, registry
from fcn_jax.errors import WeightsError, check_keys, check_values
from fcn_jax.models import Segmenter, VGGBackbone, torch_feature_indices
from fcn_jax.notes import note
from fcn_jax.weights.native import flat_variables, read_safetensors


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
    "conv_no_bias": (Field("weight", "kernel", (2, 3, 1, 0)),),  # ResNet's convolutions
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


def layer_table(model) -> list[Layer]:
    """The torch-module -> Flax-module table of ``model`` (a registered network: its family's table; a bare
    backbone: the table of the classifier it comes from, e.g. torchvision's VGG ``features.N``), in torch's
    state_dict order."""
    if isinstance(model, Segmenter):
        return family_layout(model).layer_table(model)
    return backbone_layout(model).backbone_table(model)


def family_layout(model: Segmenter) -> ModuleType:
    """The torch-layout module of ``model``'s family (:mod:`fcn_jax.registry`)."""
    return registry.torch_layout(registry.FAMILIES[model.family])


def backbone_layout(backbone) -> ModuleType:
    """The layout module that knows ``backbone`` (one with ``backbone_table``) among the families built on it."""
    for family in registry.FAMILIES.values():
        layout = registry.torch_layout(family)
        if getattr(backbone, "name", None) in family.backbones and hasattr(layout, "backbone_table"):
            return layout
    raise TypeError(f"expected an fcn_jax network or backbone, got {type(backbone).__name__}")


def backbone_layers(backbone: VGGBackbone, prefix: str, path: tuple) -> Iterator[Layer]:
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
        meta, tensors = read_safetensors(path)
        if meta.get("format", "").startswith("fcn-jax"):
            raise WeightsError(f"{path} is an fcn-jax weights file (Flax layout), not a PyTorch "
                               f"state_dict: load it with fcn_jax.load_model or fcn_jax.load_weights")
        return tensors
    return extras.pytorch("io", f"reading {path.name}").load_file(path)


# ---------------------------------------------------------------------------------------------
# Inspecting and loading


def vgg_features_config(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
    """``backbone`` and ``batch_norm`` of torchvision's VGG ``features`` under ``prefix``."""
    feats = {k: v for k, v in sd.items() if k.startswith(prefix)}
    n_convs = sum(1 for k, v in feats.items() if k.endswith(".weight") and v.ndim == 4)
    return {"backbone": VGG_DEPTHS.get(n_convs), "batch_norm": any(k.endswith(".running_mean") for k in feats)}


def infer_config(sd: Mapping[str, np.ndarray]) -> dict:
    """What a torch state_dict holds: ``layout`` (the one a registered family recognises, e.g. "fcn" for the
    tutorial's FCN, "paper" for the paper's; else "vgg", torchvision's VGG), ``backbone``, ``batch_norm`` and,
    for a whole network, ``num_classes`` (and ``arch`` where the weights can tell)."""
    for layout in dict.fromkeys(registry.torch_layout(family) for family in registry.FAMILIES.values()):
        found = layout.recognize(sd)
        if found is not None:
            return found
    return {"layout": "vgg", "backbone_only": True, **vgg_features_config(sd, "features.")}


def _config_hints(found: dict, model) -> list[str]:
    backbone = model.backbone if isinstance(model, Segmenter) else model  # every whole net has one
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


def load_torch_state_dict(model: Segmenter | VGGBackbone, source, *, strict: bool = True) -> LoadReport:
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
    layers = None
    if isinstance(model, Segmenter):
        _check_family(model, found)
        sd, ignored, notes, layers = family_layout(model).adapt(model, sd, found)
    else:
        sd, ignored, notes = backbone_layout(model).adapt_backbone(model, sd, found)

    entries = {key: (field, var) for key, field, var in torch_entries(model, layers)}
    check_keys(model.describe(), {k: field.torch_shape(var.shape) for k, (field, var) in entries.items()},
               {k: v.shape for k, v in sd.items()}, _config_hints(found, model), strict=strict)
    check_values(source if isinstance(source, (str, os.PathLike)) else "the state_dict",
                 {k: (sd[k], jnp.issubdtype(var.dtype, jnp.floating)) for k, (_, var) in entries.items()})
    for key, (field, var) in entries.items():
        # jnp.array copies: jnp.asarray may alias the torch tensor's memory on CPU, and torch
        # updates BatchNorm statistics in place.
        var.set_value(jnp.array(field.to_flax(sd[key], var.shape), dtype=var.dtype, copy=True))
    _check_filled(model)
    for text in notes:
        note(text)
    ignored += [k for k in sd if k not in entries]
    return LoadReport(loaded=list(entries), ignored=ignored, notes=notes)


def _check_filled(model) -> None:
    """A model built with ``nnx.eval_shape`` (shapes only) must come out with every variable from the weights."""
    empty = [name for name, var in flat_variables(model).items() if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if empty:
        raise WeightsError(f"the torch layout of {type(model).__name__} gives no value for: {', '.join(empty)}")


def _check_family(model: Segmenter, found: dict) -> None:
    """A whole network of another family's layout: one error naming what to build."""
    other = registry.FAMILIES.get(found.get("family"))
    if other is None or registry.torch_layout(other) is family_layout(model):
        return
    archs = registry.archs(family=other.name)
    choices = found.get("arch") or (", ".join(archs[:-1]) + " or " + archs[-1] if len(archs) > 1 else archs[0])
    raise WeightsError(f"this state_dict is in the layout of {other.title}, which {model.arch} is not: build "
                       f"{choices} instead (e.g. create_model('{choices.split()[0]}', ...))")


def to_torch_state_dict(model: Segmenter | VGGBackbone, *, as_torch: bool = False) -> dict:
    """The torch state_dict of ``model``: the reference FCN layout for an FCN, torchvision's
    ``features.N.*`` for a backbone. Values are numpy arrays (``num_batches_tracked`` int64, as
    torch keeps it); ``as_torch=True`` gives torch tensors, ready for
    ``torch_model.load_state_dict(sd, strict=True)``."""
    sd = {}
    for key, field, var in torch_entries(model):
        a = field.to_torch(np.asarray(var[...]))
        sd[key] = a.astype(np.int64) if field.torch == "num_batches_tracked" else np.ascontiguousarray(a)
    return extras.pytorch("io", "as_torch=True").from_numpy(sd) if as_torch else sd
