"""The ``fcn-jax convert`` job: PyTorch checkpoint <-> fcn-jax ``.safetensors``, optionally verified."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flax import nnx

from fcn_jax import extras, registry
from fcn_jax.atomic_files import refuse_overwriting
from fcn_jax.errors import ConfigError
from fcn_jax.models import Heatmap, PaperFCN, create_backbone, create_model
from fcn_jax.notes import note
from fcn_jax.weights.native import load_model, save_weights
from fcn_jax.weights.torch_layout import infer_config, load_torch_state_dict, read_torch_state_dict, to_torch_state_dict

TOLERANCE = 1e-5  # eval-mode max |jax - torch| / max |torch| that --verify accepts (fp32)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclasses.dataclass
class ConvertResult:
    output: Path
    model: object
    notes: list[str]
    differences: list  # fcn_jax.pytorch.parity.Difference rows; empty unless verified

    @property
    def verified_ok(self) -> bool:
        return all(d.relative <= TOLERANCE for d in self.differences)


def convert_checkpoint(*, output: str | os.PathLike, input: str | os.PathLike | None = None,
                       torchvision: str | None = None, arch: str | None = None, num_classes: int | None = None,
                       backbone: str | None = None, batch_norm: bool | None = None, seed: int = 0,
                       verify: bool = False, verify_size: tuple[int, int] = (224, 224)) -> ConvertResult:
    """Convert PyTorch weights to an fcn-jax ``.safetensors`` file, or an fcn-jax file to a torch ``.pth``.

    torch -> fcn-jax: ``input`` is a state_dict file (or ``torchvision`` names a VGG to fetch). A whole
    reference FCN needs ``arch`` (the four decoders share one layout); backbone depth, BatchNorm and
    ``num_classes`` are read from the weights unless given. A bare VGG gives a backbone file, or, with
    ``arch`` and ``num_classes``, an FCN whose decoder is freshly initialised from ``seed``.

    ``verify`` runs the PyTorch reference with the original weights and the converted JAX model on one
    random batch (eval mode) and records the differences.
    """
    if (input is None) == (torchvision is None):
        raise ConfigError("give exactly one of --input FILE and --torchvision NAME")
    output = Path(output)
    if input is not None:
        refuse_overwriting([("--output", output)], [("--input", input)])
    if input is not None and Path(input).suffix == ".safetensors" and output.suffix in TORCH_SUFFIXES:
        return _to_torch_file(Path(input), output, verify, verify_size)
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output must end in .safetensors (or .pth for an fcn-jax -> PyTorch conversion), "
                          f"got {output.name!r}")

    hub = extras.pytorch("hub", "--torchvision") if torchvision else None
    sd = read_torch_state_dict(hub.torchvision_state_dict(torchvision) if hub else input)
    found = infer_config(sd)
    backbone = backbone or found["backbone"]
    if backbone is None:
        raise ConfigError("could not tell the backbone's depth from the weights' layers; pass --backbone")
    batch_norm = found["batch_norm"] if batch_norm is None else batch_norm
    arch = arch or _arch_of_whole_network(found)
    if arch == "heatmap" and num_classes is None and "classifier.6.weight" in sd:
        num_classes = int(sd["classifier.6.weight"].shape[0])
    notes = []
    if arch is None:  # a bare backbone, every variable from the weights
        model = target = nnx.eval_shape(lambda: create_backbone(backbone, batch_norm=batch_norm, seed=seed))
    else:
        num_classes = num_classes or found.get("num_classes")
        if num_classes is None:
            raise ConfigError("pass --num-classes: the weights are a bare VGG backbone, the decoder is new")

        def build():
            return create_model(arch, num_classes=num_classes, backbone=backbone, batch_norm=batch_norm, seed=seed,
                                **found.get("options", {}))

        # A whole network's weights fill every variable: shapes only then, as a random initialisation takes seconds
        # (11 s for an FCN-ResNet-50 on 2 cores) and, for the paper's 4096-wide nets, a gigabyte, all written over.
        model = build() if found["layout"] == "vgg" else nnx.eval_shape(build)
        whole = isinstance(model, (PaperFCN, Heatmap))  # these take a whole VGG, classifier included
        target = model.backbone if found["layout"] == "vgg" and not whole else model
        if found["layout"] == "vgg" and arch != "heatmap":
            notes.append(f"backbone from the VGG weights; decoder and classifier freshly initialised (seed {seed})")
            note(notes[-1])
    notes += load_torch_state_dict(target, sd).notes
    names = None
    if arch == "heatmap" and model.num_classes == 1000:  # ImageNet's classifier: keep its class names
        names = extras.pytorch("hub", "ImageNet's class names").imagenet_categories()
    elif hub and arch == torchvision:  # torchvision's own FCN-ResNet: VOC's 21 class names
        names = hub.torchvision_categories(torchvision)
    save_weights(model, output, class_names=names)
    differences = _verify(model, sd, found["layout"] == "vgg", verify_size, seed) if verify else []
    return ConvertResult(output, model, notes, differences)


def _arch_of_whole_network(found: dict) -> str | None:
    """The arch a whole network's weights name (None for a bare backbone), or a ConfigError asking for --arch
    where its layers fit more than one."""
    if found.get("backbone_only"):
        return None
    if found.get("arch") and " " not in found["arch"]:
        return found["arch"]
    if found["layout"] == "fcn":
        tutorial = ", ".join(registry.archs(family="tutorial"))
        raise ConfigError(f"this is a whole FCN checkpoint: pass --arch ({tutorial}); the four "
                          f"decoders have the same layers, so the weights cannot tell which one it is")
    which = found.get("arch") or ", ".join(registry.archs(family=found.get("family")))
    raise ConfigError(f"the weights' layers fit more than one architecture: pass --arch ({which})")


def _to_torch_file(src: Path, output: Path, verify: bool, verify_size) -> ConvertResult:
    model = load_model(src)
    sd = to_torch_state_dict(model)
    extras.pytorch("io", f"writing {output.name}").save_file(sd, output)
    differences = _verify(model, sd, False, verify_size, 0) if verify else []
    return ConvertResult(output, model, [], differences)


def _verify(model, original_sd: dict, bare_vgg: bool, size: tuple[int, int], seed: int) -> list:
    return extras.pytorch("parity", "--verify").verify_conversion(model, original_sd, bare_vgg, size, seed)
