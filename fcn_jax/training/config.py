"""Training configuration: one dataclass, named presets, every field overridable from the command line.

The defaults train FCNs-VGG11-BN on the built-in synthetic dataset in a few minutes on a 2-core
CPU. ``--preset`` starts from a published recipe instead; explicit flags override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from fcn_jax import registry
from fcn_jax.choices import LOSSES, NORMALIZATIONS, OPTIMIZERS, SCHEDULES
from fcn_jax.data import DATASETS
from fcn_jax.errors import ConfigError, RunError
from fcn_jax.inference import runs
from fcn_jax.notes import note


def _field(default, help: str, *, check=None, **kw):
    """A config field: its ``--flag`` help, argparse details (``choices``, ``kind``), and ``check``, a function
    of the value that returns what is wrong with it (or None); see :meth:`TrainConfig.__post_init__`."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, **kw})


def _above(bound):
    return lambda v: None if v > bound else f"must be > {bound:g}"  # False for NaN too


def _at_least(bound):
    return lambda v: None if v >= bound else f"must be >= {bound:g}"


def _fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _label_value(v):
    return None if 0 <= v <= 255 else "must be in [0, 255] (masks are 8-bit)"


def _scale_range(v):
    return None if len(v) == 2 and 0 < v[0] <= v[1] < math.inf else "takes MIN,MAX with 0 < MIN <= MAX"


def _size_range(v):
    return None if len(v) == 2 and 0 < v[0] <= v[1] else "takes MIN,MAX with 0 < MIN <= MAX"


def _positive_size(v):
    return None if all(x > 0 for x in v) else "must be positive"


def _segmenter(v):
    return None if v in registry.archs(segmenters=True) else \
        f"must be a segmentation architecture ({', '.join(registry.archs(segmenters=True))})"


def _class_weights(v):
    return None if all(math.isfinite(x) and x >= 0 for x in v) else "must be >= 0 and finite"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = _field("synthetic", "dataset (synthetic is built in, no download)",
                          choices=DATASETS)
    data_dir: str | None = _field(None, "dataset root folder (real datasets, in their published layouts)")
    train_split: str = _field("train", "split to train on (voc: train, trainval, train_aug; coco: train2017)")
    val_split: str = _field("val", "split to validate on (voc: val, seg11valid; coco: val2017)")
    skip_bad_samples: bool = _field(False, "check every sample first and leave out unreadable or invalid ones "
                                           "(counted at the end) instead of stopping at the first")
    synthetic_size: int = _field(64, "synthetic images are SIZE x SIZE", check=_at_least(1))
    synthetic_train: int = _field(2000, "number of synthetic training images", check=_at_least(1))
    synthetic_val: int = _field(200, "number of synthetic validation images", check=_at_least(1))
    crop: tuple | None = _field(None, "random crop HxW for training (None: whole images)", kind="size",
                                check=_positive_size)
    scale: tuple = _field((1.0, 1.0), "random scale range MIN,MAX for training", kind="floats", check=_scale_range)
    resize_shorter: tuple | None = _field(None, "for training, resize the shorter side to a random MIN,MAX pixels "
                                                "instead of --scale (torchvision's recipe: 260,1040)", kind="ints",
                                          check=_size_range)
    val_resize_shorter: int | None = _field(None, "validate on images resized to this shorter side (torchvision's "
                                                  "evaluation: 520; default: their own sizes)", check=_at_least(1))
    hflip: bool = _field(True, "random horizontal flips for training")
    normalization: str = _field("imagenet", "imagenet (RGB mean/std) or reference (BGR mean subtraction)",
                                choices=NORMALIZATIONS)
    workers: int | None = _field(None, "data loading processes, 0: load in the main process",
                                 shown_default="one per core but one, at most 16", check=_at_least(0))
    prefetch: int = _field(2, "batches the data workers prepare ahead", check=_at_least(1))
    device_prefetch: int = _field(2, "batches placed on the devices ahead of the step", check=_at_least(1))
    # model
    arch: str = _field("fcns", "FCN variant (the *_paper ones: the paper's networks, no BatchNorm)",
                       choices=lambda: registry.archs(segmenters=True), check=_segmenter)
    backbone: str | None = _field(None, "backbone", choices=registry.backbones,
                                  shown_default="the arch's: vgg11 for the VGG families, resnet50 for fcn_resnet50")
    batch_norm: bool = _field(True, "use the vgg*_bn backbone")
    backbone_weights: str | None = _field(None, "fcn-jax .safetensors with a VGG backbone (from `fcn-jax convert`)"
                                                " or a whole FCN, to initialise the backbone")
    init_weights: str | None = _field(None, "fcn-jax .safetensors of a whole FCN to start from")
    freeze_backbone: bool = _field(False, "train the decoder only (BatchNorm statistics still update)")
    aux_weight: float | None = _field(None, "weight w of the aux head's loss, CE(out) + w * CE(aux), for archs with "
                                            "one (fcn_resnet*); 0: no aux head", check=_at_least(0),
                                      shown_default="0.5 for archs with an aux head")
    aux_lr_factor: float = _field(10.0, "the aux head learns at this multiple of the learning rate (torchvision: 10)",
                                  check=_above(0))
    learn_upsampling: bool = _field(False, "train the paper nets' bilinear upsampling too (frozen by default)")
    remat: bool = _field(False, "rematerialise the backbone (each VGG stage, each ResNet block) in the backward "
                                "pass: less memory for more compute, the same losses")
    dtype: str = _field("float32", "compute dtype (bfloat16 keeps float32 params and BN statistics)",
                        choices=("float32", "bfloat16"))
    # objective and optimisation
    loss: str = _field("cross_entropy", "cross_entropy (softmax, paper) or bce (one-hot BCE, reference)",
                       choices=LOSSES)
    ignore_index: int = _field(255, "label value excluded from loss and metrics", check=_label_value)
    class_weights: tuple | None = _field(None, "per-class loss weights W0,W1,...", kind="floats", check=_class_weights)
    optimizer: str = _field("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = _field(1e-3, "peak learning rate", check=_above(0))
    momentum: float = _field(0.9, "SGD/RMSprop momentum", check=_fraction)
    nesterov: bool = _field(False, "Nesterov momentum (SGD)")
    weight_decay: float = _field(1e-4, "L2 (SGD, RMSprop) or decoupled (AdamW) weight decay", check=_at_least(0))
    bias_lr_factor: float = _field(1.0, "biases learn at this multiple of the learning rate (the paper: 2)",
                                   check=_above(0))
    decay_biases: bool = _field(True, "apply weight decay to biases too (the paper: no)")
    schedule: str = _field("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int = _field(30, "linear warm-up steps", check=_at_least(0))
    step_epochs: int = _field(50, "step schedule: decay every this many epochs", check=_at_least(1))
    gamma: float = _field(0.5, "step schedule: decay factor", check=_above(0))
    power: float = _field(0.9, "poly schedule: exponent", check=_above(0))
    epochs: int = _field(3, "training epochs", check=_at_least(1))
    batch_size: int = _field(16, "global batch size (split over all devices and processes)", check=_at_least(1))
    seed: int = _field(0, "seed of the initialisation, data order and augmentation", check=_at_least(0))
    # run
    run_dir: str = _field("runs/fcn", "where checkpoints, logs and pictures go")
    eval_every_epochs: int = _field(1, "validate every N epochs (and at the end)", check=_at_least(1))
    log_every_steps: int = _field(10, "write metrics every N steps", check=_at_least(1))
    checkpoint_every_steps: int = _field(100, "checkpoint every N steps, 0: only at the end of each epoch (there is "
                                              "always one then)", check=_at_least(0))
    keep_checkpoints: int = _field(2, "latest checkpoints kept (the best one is kept too)", check=_at_least(1))
    overlays: int = _field(4, "validation images drawn with their predictions at the end", check=_at_least(0))

    def __post_init__(self):
        """Every field's ``check``: a value that makes no sense is refused here, before anything runs."""
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata["check"]
            problem = check(value) if check and value is not None else None
            if problem:
                raise ConfigError(f"--{f.name.replace('_', '-')} {problem}, got {_shown(f, value)}")
        family = registry.family_of(self.arch)
        if self.backbone is None:  # the arch's own (stored resolved, so a run's config.json names it)
            object.__setattr__(self, "backbone", registry.default_backbone(self.arch))
        if self.backbone not in family.backbones:
            raise ConfigError(f"--backbone {self.backbone}: {self.arch} takes {', '.join(family.backbones)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _shown(f: dataclasses.Field, value) -> str:
    """``value`` as it is written on the command line."""
    if f.metadata.get("kind") == "size":
        return "x".join(str(v) for v in value)
    if f.metadata.get("kind") in ("floats", "ints"):
        return ",".join(str(v) for v in value)
    return str(value)


PRESETS: dict[str, dict] = {
    "synthetic": {},
    # The reference's published recipe (docs/reference-fcn.md): CamVid's 32 classes.
    "camvid-fcns-reference": dict(
        dataset="camvid", arch="fcns", backbone="vgg16", batch_norm=False,
        loss="bce", optimizer="rmsprop", lr=1e-4, momentum=0.0, weight_decay=1e-5, schedule="step",
        step_epochs=50, gamma=0.5, warmup_steps=0, epochs=500, batch_size=6, crop=(480, 640), hflip=True,
        normalization="reference", backbone_weights="{backbone}{bn}.safetensors"),
    # The FCN paper's FCN-8s on PASCAL VOC: SGD, momentum 0.99, weight decay 5e-4, ImageNet VGG16, whole
    # images one at a time; lr 1e-10 per pixel of a summed loss ~ 1.75e-5 for our per-pixel mean.
    "voc-fcn8s": dict(
        dataset="voc", train_split="train_aug", val_split="seg11valid", arch="fcn8s", backbone="vgg16",
        batch_norm=False, loss="cross_entropy", optimizer="sgd",
        lr=1.75e-5, momentum=0.99, weight_decay=5e-4, schedule="constant", warmup_steps=0, epochs=50,
        batch_size=1, hflip=True, normalization="imagenet", backbone_weights="{backbone}{bn}.safetensors"),
    # The paper's networks and recipe (README, "The paper's networks"): batch 1 whole images, no augmentation,
    # summed cross-entropy, SGD momentum 0.99, weight decay 5e-4 on weights, biases at 2x lr, frozen
    # upsampling, Caffe's input; ~100k iterations of SBD train. Staged: 16s from a trained 32s, 8s from a 16s.
    **{f"voc-{name}-paper": dict(
        dataset="voc", train_split="train_aug", val_split="seg11valid", arch=f"{name}_paper", backbone="vgg16",
        batch_norm=False, loss="cross_entropy_sum", optimizer="sgd", lr=lr, momentum=0.99, weight_decay=5e-4,
        bias_lr_factor=2.0, decay_biases=False, schedule="constant", warmup_steps=0, epochs=12, batch_size=1,
        hflip=False, normalization="caffe", backbone_weights="{backbone}_heatmap.safetensors")
       for name, lr in (("fcn32s", 1e-10), ("fcn16s", 1e-12), ("fcn8s", 1e-14), ("fcn8s_atonce", 1e-10))},
    # torchvision's segmentation recipe (docs/fcn-resnet.md): lr 0.02 for a global batch of 32 (see LR_FOR_BATCH),
    # poly 0.9 stepped every iteration, the aux loss at 0.5 with its head at 10x lr, shorter side 260..1040 then
    # 480x480 crops, validation at a shorter side of 520, ImageNet ResNet weights.
    **{f"{data}-{arch.replace('_', '-')}": dict(
        dataset=data, train_split=splits[0], val_split=splits[1], arch=arch, backbone=arch.split("_")[1],
        loss="cross_entropy", optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, schedule="poly", power=0.9,
        warmup_steps=0, epochs=30, batch_size=32, resize_shorter=(260, 1040), crop=(480, 480), hflip=True,
        val_resize_shorter=520, aux_weight=0.5, aux_lr_factor=10.0, normalization="imagenet",
        backbone_weights="{backbone}.safetensors")
       for data, arch, splits in (("coco", "fcn_resnet50", ("train2017", "val2017")),
                                  ("coco", "fcn_resnet101", ("train2017", "val2017")),
                                  ("voc", "fcn_resnet50", ("train_aug", "val")))},
}
# The global batch a preset's learning rate was published for: with another --batch-size, torchvision's linear
# rule (lr x batch / 32) is suggested, never applied behind the user's back.
LR_FOR_BATCH = {name: 32 for name in ("coco-fcn-resnet50", "coco-fcn-resnet101", "voc-fcn-resnet50")}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 480x640, got {text!r}") from None
    return h, w


def _parse_numbers(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {'whole ' * (kind is int)}numbers, got "
                                             f"{text!r}") from None
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--FIELD`` for every TrainConfig field; defaults are None so explicit flags can be told apart."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="start from a named recipe (default: synthetic); not with --resume")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.metadata.get("kind")
        help_text = f"{f.metadata['help']} (default: {f.metadata.get('shown_default', f.default)})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "size":
            parser.add_argument(flag, type=parse_size, default=None, metavar="HxW", help=help_text)
        elif kind in ("floats", "ints"):
            parser.add_argument(flag, type=_parse_numbers(float if kind == "floats" else int), default=None,
                                metavar="A,B,...", help=help_text)
        else:
            convert = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            choices = f.metadata.get("choices")  # a function where the registry decides (families registered late)
            parser.add_argument(flag, type=convert, default=None, choices=choices() if callable(choices) else choices,
                                help=help_text)


def explicit_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def resolve_config(preset: str = "synthetic", **overrides) -> TrainConfig:
    """The preset with ``overrides``. A preset's ``backbone_weights`` names the file ``fcn-jax convert`` makes for
    the backbone in use (``{backbone}``, ``{bn}``); a stage started from a whole earlier net (``init_weights``)
    does not need it."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    values = {**PRESETS[preset], **overrides}
    published = LR_FOR_BATCH.get(preset)
    if published and values["batch_size"] != published and "lr" not in overrides:
        note("preset %s: lr %g is for a global batch of %d; for --batch-size %d the linear rule gives --lr %g",
             preset, values["lr"], published, values["batch_size"], values["lr"] * values["batch_size"] / published)
    if "backbone_weights" not in overrides and values.get("backbone_weights"):
        values["backbone_weights"] = None if values.get("init_weights") else values["backbone_weights"].format(
            backbone=values.get("backbone") or registry.default_backbone(values.get("arch", TrainConfig.arch)),
            bn="_bn" if values.get("batch_norm", TrainConfig.batch_norm) else "")
    return TrainConfig(**values)


# The learning rate (e.g. lower after a NaN stop) and how data is fed, which does not change the batches;
# anything else would make it another run.
RESUME_MAY_CHANGE = ("lr", "workers", "prefetch", "device_prefetch")


def resume_config(run_dir: str, overrides: dict) -> TrainConfig:
    """The saved config of the run in ``run_dir``, with the learning rate of ``overrides`` if it has one;
    other explicit settings must agree with the run's."""
    path = Path(run_dir) / runs.CONFIG
    if not path.is_file():
        raise RunError(f"nothing to resume in {run_dir}: it has no {runs.CONFIG} (start without --resume)")
    saved = TrainConfig.from_json(path.read_text())
    differing = [f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})" for k, v in overrides.items()
                 if k not in ("run_dir", *RESUME_MAY_CHANGE) and getattr(saved, k) != v]
    if differing:
        may_change = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
        raise ConfigError("--resume continues a run with its saved settings, but these differ: "
                          + ", ".join(differing) + f" (only {may_change} may change)")
    changes = {k: overrides[k] for k in RESUME_MAY_CHANGE if k in overrides}
    return dataclasses.replace(saved, run_dir=str(run_dir), **changes)
