"""Everything a training run does before its first step: the run folder checked, the datasets read, the
loaders and their workers started, the model built and initialised (from ImageNet weights or an earlier
stage), the optimizer and the device mesh. :func:`prepare` returns it all; :mod:`fcn_jax.training.run` runs the
loop over it."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax.data import Augment, Loader, get_dataset
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.devices import make_mesh, replicate_state
from fcn_jax.errors import ConfigError, DatasetError, RunError
from fcn_jax.models import MODELS, PaperFCN, create_model
from fcn_jax.notes import note
from fcn_jax.training.config import TrainConfig
from fcn_jax.training.losses import get_loss
from fcn_jax.training.optim import make_optimizer, make_schedule
from fcn_jax.training.step import trainable
from fcn_jax.weights.native import flat_variables, load_matching, load_weights, read_weights_config


@dataclasses.dataclass
class Prepared:
    """What the loop runs over. ``labels``: what is stored with the weights (class names, palette, normalisation);
    ``fingerprints``: what identifies the splits, checked on resume."""

    run_dir: Path
    datasets: dict
    fingerprints: dict
    labels: dict
    train_loader: Loader
    val_loader: EvalBatches
    model: nnx.Module
    optimizer: nnx.Optimizer
    schedule: object
    loss_fn: object
    mesh: jax.sharding.Mesh
    total_steps: int
    aux_weight: float  # the aux head's share of the loss (0: the model has none)


def prepare(config: TrainConfig, resume: bool) -> Prepared:
    """The run folder checked (a new run in an empty one, a resumed one with a checkpoint), then datasets,
    loaders (their workers started: close them, or use them in a ``with`` block), model and optimizer."""
    run_dir = Path(config.run_dir).absolute()
    _check_run_folder(run_dir, config, resume)
    datasets = _datasets(config)
    if not resume:  # a resumed run's weights come from its checkpoint
        _check_init_files(config)  # before the workers start
    num_classes = datasets["train"].num_classes
    if config.class_weights is not None and len(config.class_weights) != num_classes:
        raise ConfigError(f"--class-weights has {len(config.class_weights)} values; the dataset has "
                          f"{num_classes} classes")
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    feeding = dict(workers=config.workers, prefetch=config.prefetch)
    train_loader = Loader(datasets["train"], config.batch_size, seed=config.seed, normalization=None,  # on device
                          augment=_augment(config), **feeding, **shard)
    val_loader = EvalBatches(datasets["val"], config.batch_size, normalization=config.normalization,
                             multiple=MODELS[config.arch].size_multiple, **feeding, **shard)
    aux_weight = _aux_weight(config)
    model = create_model(config.arch, num_classes=num_classes, backbone=config.backbone, batch_norm=config.batch_norm,
                         seed=config.seed, dtype=jnp.dtype(config.dtype), remat=config.remat,
                         **({"aux_loss": True} if aux_weight else {}))
    if not resume:  # a resumed run's weights come from its checkpoint
        _load_init_weights(model, config)
    schedule = make_schedule(config.schedule, config.lr, total_steps=config.epochs * len(train_loader),
                             steps_per_epoch=len(train_loader), warmup_steps=config.warmup_steps,
                             step_epochs=config.step_epochs, gamma=config.gamma, power=config.power)
    tx = make_optimizer(config.optimizer, schedule, momentum=config.momentum, nesterov=config.nesterov,
                        weight_decay=config.weight_decay, bias_lr_factor=config.bias_lr_factor,
                        decay_biases=config.decay_biases,
                        lr_factors={"aux_classifier": config.aux_lr_factor} if aux_weight else None)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable(config.freeze_backbone, config.learn_upsampling))
    mesh = make_mesh()
    replicate_state((model, optimizer), mesh)
    loss_fn = functools.partial(get_loss(config.loss), ignore_index=config.ignore_index,
                                class_weights=config.class_weights)
    labels = {"class_names": datasets["train"].class_names, "palette": datasets["train"].palette,
              "normalization": config.normalization}
    return Prepared(run_dir, datasets, {role: _fingerprint(ds) for role, ds in datasets.items()}, labels,
                    train_loader, val_loader, model, optimizer, schedule, loss_fn, mesh,
                    config.epochs * len(train_loader), aux_weight)


def _augment(config: TrainConfig) -> Augment:
    shorter = tuple(config.resize_shorter) if config.resize_shorter else None
    return Augment(config.crop, tuple(config.scale), config.hflip, shorter=shorter)


def _aux_weight(config: TrainConfig) -> float:
    """``--aux-weight``, by default 0.5 for archs with an aux head (torchvision's recipe) and 0 for the rest."""
    if not MODELS[config.arch].takes_aux:
        if config.aux_weight:
            raise ConfigError(f"--aux-weight {config.aux_weight}: {config.arch} has no aux head (the FCN-ResNets do)")
        return 0.0
    return 0.5 if config.aux_weight is None else config.aux_weight


def _check_run_folder(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    if jax.process_index() == 0:
        _remove_half_written(run_dir)
    existing = checkpoint_steps(run_dir)
    if resume and not existing:
        raise RunError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    if not resume and existing:
        raise RunError(f"{run_dir} already holds a run (checkpoint at step {existing[-1]}): continue it with "
                       f"--resume or choose another --run-dir")
    if config.batch_size % jax.device_count():
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {jax.device_count()} devices")


def _datasets(config: TrainConfig) -> dict:
    datasets = {role: get_dataset(config.dataset, split, data_dir=config.data_dir, seed=config.seed,
                                  synthetic_size=config.synthetic_size, skip_bad=config.skip_bad_samples,
                                  synthetic_samples=config.synthetic_train if role == "train" else config.synthetic_val,
                                  resize_shorter=config.val_resize_shorter if role == "val" else None)
                for role, split in (("train", config.train_split), ("val", config.val_split))}
    if config.dataset == "folder":
        _check_classes_used(datasets["train"], config.ignore_index)
    return datasets


def _load_init_weights(model, config: TrainConfig) -> None:
    """``--backbone-weights``, then ``--init-weights``: in staged training the previous stage's whole net wins over
    the ImageNet start it also holds. For the paper's nets each file gives every layer of the same name and
    shape, and one note says which file each layer came from."""
    paper = isinstance(model, PaperFCN)
    source: dict[str, str] = {}  # variable name -> the file it was copied from, the last one winning
    for target, path, what in ((model.backbone, config.backbone_weights, "--backbone-weights"),
                               (model, config.init_weights, "--init-weights")):
        if path is None:
            continue
        if not paper or read_weights_config(path)["model"] == "vgg":
            load_weights(target, path)  # a paper net given a bare backbone: fc6 and fc7 keep their random start
            continue
        copied, _ = load_matching(model, path)
        source.update(dict.fromkeys(copied, f"{path} ({what})"))
    if source and jax.process_index() == 0:
        by_file = {f: [k for k, v in source.items() if v == f] for f in dict.fromkeys(source.values())}
        left = [k for k in flat_variables(model) if k not in source]
        note("; ".join(f"from {f}: {_layers(names)}" for f, names in by_file.items())
             + f"; left at their initial values: {_layers(left) or 'nothing'}")


def _check_init_files(config: TrainConfig) -> None:
    """The weights files a run starts from exist (checked before the datasets and workers are set up)."""
    for path, what in ((config.backbone_weights, "--backbone-weights"), (config.init_weights, "--init-weights")):
        if path is not None and not Path(path).is_file():
            vgg_bn = config.batch_norm and MODELS[config.arch].family == "tutorial"
            how = (f"--torchvision {config.backbone} --arch heatmap" if issubclass(MODELS[config.arch], PaperFCN)
                   else f"--torchvision {config.backbone}{'_bn' if vgg_bn else ''}")
            raise ConfigError(f"{what} {path}: no such file. Make one from torchvision's ImageNet weights with "
                              f"`fcn-jax convert {how} --output {path}` (needs internet once), or train without it")


def _layers(names: list[str]) -> str:
    """``vgg.backbone.convs.0.kernel, vgg.backbone.convs.0.bias, score_fr.kernel`` -> ``vgg.backbone.convs.0,
    score_fr``: the layers of variable names, in order."""
    return ", ".join(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The complete checkpoints in the folder, read from the file system (orbax names them by step and
    writes them under temporary names until they are complete)."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _remove_half_written(run_dir: Path) -> None:
    """Temporary files that a killed run left behind (``.best.safetensors.tmp-HOST-PID``); the lock says that no
    live run writes here."""
    leftovers = sorted(run_dir.glob(".*.tmp-*"))
    for path in leftovers:
        path.unlink()
    if leftovers:
        note(f"removed {len(leftovers)} half-written file(s) of an earlier run: "
              f"{', '.join(p.name for p in leftovers)}")


def _fingerprint(dataset) -> dict:
    """What identifies a split's samples: their number and, where the dataset can say, a digest of them."""
    return {"samples": len(dataset), "digest": dataset.fingerprint() if hasattr(dataset, "fingerprint") else None}


def check_same_data(saved: dict | None, now: dict) -> None:
    for role, name in (("train", "training"), ("val", "validation")):
        before, after = (saved or {}).get(role), now[role]
        if before and before != after:
            what = (f"{before['samples']} -> {after['samples']} samples" if before["samples"] != after["samples"]
                    else "the same number of samples, but other files")
            raise DatasetError(f"the {name} split changed since the run started ({what}): resuming would not "
                               f"continue the same run. Restore the split as it was, or start a new run from this "
                               f"one's weights with --init-weights")


def _check_classes_used(dataset, ignore_index: int) -> None:
    """A folder dataset whose masks hold one class besides the ignore label trains nothing (binary masks
    saved as 0/255, with 255 meant as the object)."""
    used = dataset.label_values()
    classes = used - {ignore_index}
    if dataset.num_classes >= 2 and len(classes) <= 1 and ignore_index in used:
        only = ", ".join(f"{c} ({dataset.class_names[c]!r})" for c in sorted(classes)) or "none"
        raise DatasetError(
            f"the train split's masks hold only class {only} and {ignore_index}, the ignore label: the other "
            f"classes would never be trained. If {ignore_index} marks objects (binary masks saved as "
            f"0/{ignore_index}), remap it to class 1 in the mask files (the README's 'Binary masks' shows how), or "
            f"give the masks' real ignore value with --ignore-index")
