"""How close a JAX model is to its PyTorch twin: used by ``fcn-jax convert --verify``, ``fcn-jax compare``
and the fidelity tests, so that all three build the twin the same way and measure with the same ruler.

- :func:`torch_twin`: the PyTorch reference of a JAX model's architecture, holding given (or its own) weights.
- :func:`jax_twin`: the JAX model of a PyTorch reference's architecture, holding its weights.
- :func:`random_reference`: a PyTorch reference with random weights and BatchNorm moved off its defaults.
- :func:`relative_error`: ``max |ours - ref| / scale``, the scale being ``max |ref|`` unless given.
- :func:`compare_outputs`: the ``--verify`` rows; :func:`fidelity_checks`: the ``compare`` rows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from fcn_jax import registry
from fcn_jax.errors import ConfigError
from fcn_jax.models import FCN, Heatmap, PaperFCN, Segmenter, VGGBackbone, create_model, torch_feature_indices
from fcn_jax.models.modes import in_mode
from fcn_jax.models.resnet import FCNResNet, ResNetBackbone
from fcn_jax.pytorch.io import from_numpy, to_numpy
from fcn_jax.pytorch.paper_reference import build_paper_model
from fcn_jax.pytorch.reference import VGGNet, build_torch_model, randomize_batchnorm_
from fcn_jax.pytorch.resnet_reference import build_torchvision_fcn, random_torchvision_fcn
from fcn_jax.training.losses import cross_entropy
from fcn_jax.weights.paper_layout import trunk_from_torchvision
from fcn_jax.weights.torch_layout import (
    infer_config,
    load_torch_state_dict,
    read_torch_state_dict,
    to_torch_state_dict,
    torch_entries,
)

PAPER_ARCHS = registry.archs(family="paper")

IGNORE_INDEX = 255
# (float32, float64) bars on max |jax - torch| / scale, scale = max |torch| of the tensor, except for
# gradients and parameters after the step (see fidelity_checks).
TOLERANCES = {
    "eval": (1e-5, 1e-10),
    "train": (1e-4, 1e-10),  # train-mode BatchNorm divides by batch statistics: more rounding
    "loss": (1e-5, 1e-12),
    "gradients": (2e-2, 1e-8),  # float32: of the model's largest gradient; measured up to 1e-2
    "bn stats": (1e-5, 1e-10),
    "parameters": (1e-5, 1e-12),
}
# JAX/PyTorch ratios of float32 error against float64 measured 0.5..2.5 on most rows; up to 7 on a
# VGG16-BN first-conv gradient, which PyTorch's CPU BatchNorm (double accumulation) gets closer.
TRUTH_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Difference:
    name: str  # what was compared: "logits", "x1".."x5", a state_dict key, a row of compare
    max_abs: float  # max |ours - reference|
    max_ref: float  # the scale the error is divided by: max |reference| unless stated otherwise

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.max_ref, np.finfo(np.float64).tiny)


def relative_error(ours, reference, *, scale: float | None = None, name: str = "") -> Difference:
    """``max |ours - reference|`` and the scale it is judged against (``max |reference|`` by default),
    computed in float64; shapes must agree."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"{name}: shape {ours.shape} != reference shape {reference.shape}")
    scale = float(np.abs(reference).max(initial=0.0)) if scale is None else float(scale)
    return Difference(name, float(np.abs(ours - reference).max(initial=0.0)), scale)


# ---------------------------------------------------------------------------------------------
# Twins


def random_reference(arch: str, num_classes: int, backbone: str, batch_norm: bool, seed: int = 0,
                     double: bool = False) -> torch.nn.Module:
    """The PyTorch reference FCN initialised from ``seed``, every BatchNorm's parameters and running
    statistics moved off their defaults (so that eval and train mode differ), in train mode. The paper's
    nets (no BatchNorm) get random weights in every layer but the bilinear upsampling."""
    if registry.family_of(arch).name == "resnet":  # torchvision's own module; dropout off as for the paper's nets
        twin = random_torchvision_fcn(arch, num_classes, seed=seed, dropout=False)
    elif arch in PAPER_ARCHS:
        if batch_norm:
            raise ConfigError(f"{arch} has no BatchNorm (the paper's networks are plain VGG)")
        twin = build_paper_model(arch, num_classes, backbone, seed=seed).train()
    else:
        torch.manual_seed(seed)
        twin = randomize_batchnorm_(build_torch_model(arch, num_classes, backbone, batch_norm), seed)
    return twin.double() if double else twin


def torch_twin(model: FCN | VGGBackbone, state_dict: dict[str, np.ndarray] | None = None) -> torch.nn.Module:
    """The PyTorch reference of ``model``'s architecture holding ``state_dict`` (torch layout, numpy arrays,
    loaded strictly), by default ``model``'s own weights."""
    if state_dict is None:
        state_dict = to_torch_state_dict(model)
    if isinstance(model, FCN):
        twin = build_torch_model(model.arch, model.num_classes, model.backbone.name, model.backbone.batch_norm)
    elif isinstance(model, (PaperFCN, Heatmap)):
        twin = build_paper_model(model.arch, model.num_classes, model.backbone.name)
    elif isinstance(model, FCNResNet):
        twin = build_torchvision_fcn(model.arch, model.num_classes, aux_loss=model.aux_loss)
    elif isinstance(model, ResNetBackbone):  # torchvision's own dilated ResNet of its FCN, without fc
        twin = build_torchvision_fcn(f"fcn_{model.name}").backbone
    else:
        twin = VGGNet(model.name, batch_norm=model.batch_norm)
    twin.load_state_dict(from_numpy(state_dict), strict=True)
    return twin


def jax_twin(torch_model: torch.nn.Module, arch: str, *, dtype=jnp.float32) -> FCN:
    """The JAX ``arch`` with ``torch_model``'s weights, through the converter; depth, BatchNorm and the
    number of classes are read from the weights, compute and parameter dtype are ``dtype``."""
    state_dict = read_torch_state_dict(torch_model)
    found = infer_config(state_dict)
    model = nnx.eval_shape(lambda: create_model(  # shapes only: every variable comes from the state_dict
        arch, num_classes=found["num_classes"], backbone=found["backbone"], batch_norm=found["batch_norm"],
        dtype=dtype, param_dtype=dtype, **found.get("options", {})))
    load_torch_state_dict(model, state_dict)
    return model


# ---------------------------------------------------------------------------------------------
# convert --verify


def compare_outputs(model, twin: torch.nn.Module, images_nchw: np.ndarray, *, train: bool = False) -> list[Difference]:
    """Logits (FCN; ``out`` and ``aux`` for torchvision's FCN-ResNets) or the features (backbone) of both models on
    ``images_nchw``, in eval or train mode (in train mode their BatchNorm statistics are updated); both models are
    left in the mode they had."""
    was_training = twin.training
    try:
        with torch.no_grad():
            ref = twin.train(train)(torch.from_numpy(images_nchw))
    finally:
        twin.train(was_training)
    both_heads = isinstance(model, Segmenter) and isinstance(ref, dict) and "aux" in ref
    with in_mode(model, train=train), jax.default_matmul_precision("highest"):
        images = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
        out = _compiled_outputs(model, images, both_heads)
    if both_heads:
        out = dict(zip(("out", "aux"), out, strict=True))
    elif isinstance(model, Segmenter):
        ref, out = {"logits": main_logits(ref)}, {"logits": out}
    return [relative_error(_nchw(out[name]), r.numpy(), name=name) for name, r in ref.items()]


@functools.partial(nnx.jit, static_argnames="both_heads")
def _compiled_outputs(model, images, both_heads: bool):
    """``model(images)`` as one program (eagerly, each operation is compiled on its own: slow on CPU)."""
    return model(images, aux=True) if both_heads else model(images)


def verify_conversion(model, original: dict, bare_vgg: bool, size: tuple[int, int], seed: int) -> list[Difference]:
    """Eval-mode differences between ``model`` and the reference holding the ``original`` torch weights (for
    an FCN built around a bare VGG, ``bare_vgg``: the VGG's weights and ``model``'s fresh decoder)."""
    state_dict = to_torch_state_dict(model)
    prefix = "pretrained_net." if bare_vgg and isinstance(model, FCN) else ""
    if bare_vgg and isinstance(model, PaperFCN):  # the VGG's trunk under the paper's names
        original = trunk_from_torchvision(original, model)[0]
    state_dict.update({prefix + k: v for k, v in original.items() if prefix + k in state_dict})
    images = np.random.default_rng(seed).standard_normal((2, 3, *size), dtype=np.float32)
    return compare_outputs(model, torch_twin(model, state_dict), images)


# ---------------------------------------------------------------------------------------------
# compare: both frameworks produce the same named groups of tensors, torch-named: "eval x1" .. "eval
# logits", "train x1" .. "train loss" (one train-mode forward), "step gradients", "step bn stats" and
# "step parameters" (after one SGD step with momentum 0.9).


@dataclasses.dataclass(frozen=True)
class Check(Difference):
    """One fidelity row: ``section`` (eval, train, step) and ``name`` (x1, logits, loss, ...);
    ``max_ref`` is the scale the error is divided by."""
    section: str
    tolerance: float
    worst: str = ""  # the tensor with the largest relative error, for rows over many tensors
    jax_vs_float64: float | None = None  # float32 runs: each framework's relative error against
    torch_vs_float64: float | None = None  # the PyTorch reference run in float64

    @property
    def ok(self) -> bool:
        """Within the tolerance, or (float32) no more than ``TRUTH_FACTOR`` times as far from the float64
        reference as PyTorch's own float32 result: then the difference is rounding, not a bug."""
        if self.relative <= self.tolerance:
            return True
        return self.jax_vs_float64 is not None and self.jax_vs_float64 <= TRUTH_FACTOR * self.torch_vs_float64


def main_logits(output) -> torch.Tensor:
    """The logits of a torch segmentation model's output: torchvision's models return ``{"out": ..., "aux": ...}``."""
    return output["out"] if isinstance(output, dict) else output


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _torch_forward(twin, x):
    """``(features, logits)`` of the torch FCN, features captured from its backbone's output (the paper's
    reference returns its pools itself)."""
    if hasattr(twin, "features_and_logits"):
        return twin.features_and_logits(x)
    captured = {}
    backbone = twin.pretrained_net if hasattr(twin, "pretrained_net") else twin.backbone  # torchvision's: {aux, out}
    handle = backbone.register_forward_hook(lambda m, i, out: captured.update(out))
    try:
        logits = twin(x)
    finally:
        handle.remove()
    return captured, main_logits(logits)


def torch_results(twin, images: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, dict[str, np.ndarray]]:
    """The groups of the PyTorch reference (run on a copy of ``twin``)."""
    twin = copy.deepcopy(twin)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    out = {}
    with torch.no_grad():
        feats, logits = _torch_forward(twin.eval(), x)
    out.update({f"eval {k}": {k: to_numpy(v)} for k, v in sorted(feats.items())})
    out["eval logits"] = {"logits": to_numpy(logits)}
    optimizer = torch.optim.SGD(twin.train().parameters(), lr=lr, momentum=0.9)
    feats, logits = _torch_forward(twin, x)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
    loss.backward()
    optimizer.step()
    out.update({f"train {k}": {k: to_numpy(v)} for k, v in sorted(feats.items())})
    out["train logits"] = {"logits": to_numpy(logits)}
    out["train loss"] = {"loss": np.asarray(loss.item())}
    out["step gradients"] = {k: to_numpy(p.grad) for k, p in twin.named_parameters()}
    state = {k: to_numpy(v) for k, v in twin.state_dict().items()}
    out["step bn stats"] = {k: state[k] for k in state if k.endswith(("running_mean", "running_var"))}
    out["step parameters"] = {k: state[k] for k in out["step gradients"]}
    return out


def jax_results(model, images: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, dict[str, np.ndarray]]:
    """The groups of the JAX model (run on a copy of ``model``), torch-named."""
    model = nnx.clone(model)
    x, y = jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(labels)
    out = {}
    model.eval()
    feats, logits = nnx.jit(lambda m, x: m.features_and_logits(x))(model, x)
    out.update({f"eval {k}": {k: _nchw(v)} for k, v in sorted(feats.items())})
    out["eval logits"] = {"logits": _nchw(logits)}

    def loss_fn(m):
        f, out = m.features_and_logits(x)
        return cross_entropy(out, y, ignore_index=IGNORE_INDEX), (f, out)

    @nnx.jit
    def sgd_step(m, optimizer):
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        optimizer.update(m, grads)
        return loss, aux, grads

    model.train()
    loss, (feats, logits), grads = sgd_step(model, nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param))
    out.update({f"train {k}": {k: _nchw(v)} for k, v in sorted(feats.items())})
    out["train logits"] = {"logits": _nchw(logits)}
    out["train loss"] = {"loss": np.asarray(loss)}
    holder = nnx.clone(model)  # the converter lays the gradients out as torch's parameters
    nnx.update(holder, grads)
    grads = to_torch_state_dict(holder)
    state = to_torch_state_dict(model)
    params = [key for key, _, var in torch_entries(model) if isinstance(var, nnx.Param)]
    out["step gradients"] = {k: grads[k] for k in params}
    out["step bn stats"] = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    out["step parameters"] = {k: state[k] for k in params}
    return out


def _tolerance(group: str, float64: bool) -> float:
    section, name = group.split(" ", 1)
    kind = name if section == "step" else "loss" if name == "loss" else section
    return TOLERANCES[kind][1 if float64 else 0]


def _worst(ours: dict, ref: dict, scales: dict) -> tuple[Difference, str]:
    """The tensor with the largest relative error, and its key."""
    return max(((relative_error(ours[key], r, scale=scales[key], name=key), key) for key, r in ref.items()),
               key=lambda item: item[0].relative)


def fidelity_checks(model, twin, images: np.ndarray, labels: np.ndarray, *, lr: float = 0.01,
                    float64: bool = False) -> list[Check]:
    """One :class:`Check` per group, each tensor judged against its own largest value.

    Two exceptions. A conv bias feeding a train-mode BatchNorm has a true gradient of zero and stays
    ~0: its gradient and value are judged against the model's largest. In float32 every gradient (and
    parameter after the step) is judged against the model's largest: a deep backward pass (with
    train-mode BatchNorm subtracting nearly equal terms) leaves small gradients with rounding noise of
    the size of the large ones' (PyTorch on CPU hides part of it by accumulating BatchNorm in double).
    ``float64`` checks each tensor against its own scale at 1e-8.

    In float32 the PyTorch reference also runs in float64 as the truth, and each row records both
    frameworks' error against it: a row over its tolerance still passes when JAX's error is at most
    ``TRUTH_FACTOR`` times PyTorch's (see :attr:`Check.ok`).
    """
    ours = jax_results(model, images, labels, lr)
    ref = torch_results(twin, images, labels, lr)
    truth = None if float64 else torch_results(copy.deepcopy(twin).double(), images.astype(np.float64), labels, lr)
    zero_grad_biases = set() if not isinstance(model.backbone, VGGBackbone) else {  # ResNets: no bias before BN
        f"pretrained_net.features.{conv}.bias"
        for conv, bn in torch_feature_indices(model.backbone.name, model.backbone.batch_norm) if bn is not None}
    checks = []
    for group, tensors in ref.items():
        if not tensors:  # "step bn stats" of the paper's nets, which have no BatchNorm
            continue
        scales = {k: float(np.abs(v).max()) for k, v in tensors.items()}
        if group in ("step gradients", "step parameters"):
            largest = max(scales.values())
            scales.update({k: largest for k in zero_grad_biases})
            if not float64:  # parameters after the step differ by lr x the gradients' difference
                scales = dict.fromkeys(scales, largest)
        worst, key = _worst(ours[group], tensors, scales)
        vs_truth = {}
        if truth is not None:
            vs_truth = {"jax_vs_float64": _worst(ours[group], truth[group], scales)[0].relative,
                        "torch_vs_float64": _worst(tensors, truth[group], scales)[0].relative}
        section, name = group.split(" ", 1)
        checks.append(Check(name=name, max_abs=worst.max_abs, max_ref=worst.max_ref, section=section,
                            tolerance=_tolerance(group, float64), worst=key if len(tensors) > 1 else "", **vs_truth))
    return checks

