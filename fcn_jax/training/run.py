"""The training program behind ``fcn-jax train``: data, model, compiled step, evaluation, checkpoints and
reports, resumable to the bit.

Only process 0 logs and writes files (orbax coordinates the checkpoint writes of all processes). What a run
guarantees (the README's "Reliability"): one run per folder (:mod:`~fcn_jax.training.lock`, taken before
anything in the folder is touched); SIGTERM and Ctrl-C stop after the current step with a checkpoint of it
(:mod:`~fcn_jax.training.stopping`); resuming skips a damaged checkpoint for the newest one that restores and
refuses a training split that changed; nothing non-finite is ever checkpointed; a full disk stops the run in
one line with the last complete checkpoint intact.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from fcn_jax import runs
from fcn_jax.data import Augment, Loader, get_dataset
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.device_input import prefetch_to_devices
from fcn_jax.drawing import overlay_panel, plot_learning_curve
from fcn_jax.errors import ConfigError, DatasetError, RunError, TrainingDiverged
from fcn_jax.evaluation import confusion_over
from fcn_jax.metrics import metrics_table, segmentation_metrics
from fcn_jax.models import MODELS, PaperFCN, create_model
from fcn_jax.notes import note
from fcn_jax.prediction import predict
from fcn_jax.sharding import host_array, make_mesh, replicate_state
from fcn_jax.training.checkpoint import RunCheckpoints
from fcn_jax.training.config import TrainConfig, resume_config
from fcn_jax.training.lock import hold_run_folder
from fcn_jax.training.losses import get_loss
from fcn_jax.training.meter import LossMeter
from fcn_jax.training.optim import make_optimizer, make_schedule
from fcn_jax.training.reporting import MetricsLog
from fcn_jax.training.step import train_step, trainable
from fcn_jax.training.stopping import StopRequests, TrainingStopped
from fcn_jax.weights import flat_variables, load_matching, load_weights, read_weights_config, save_weights


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize``: with no arguments on Cloud TPU, SLURM and Kubernetes (detected
    from the environment), explicit coordinator/process numbers elsewhere."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as ``config`` says; returns the last validation metrics. With ``resume``, continue the run in
    ``config.run_dir`` from its newest checkpoint that restores (the config must be the run's own; see
    :func:`resume`). Raises :class:`~fcn_jax.training.stopping.TrainingStopped` after a stop request."""
    with StopRequests() as stop, hold_run_folder(config.run_dir):
        return _train(config, resume, progress, stop)


def resume(run_dir: str, overrides: dict | None = None, *, progress: bool = True) -> dict:
    """Continue the run in ``run_dir`` with its saved settings; ``overrides`` may change the learning rate
    (``lr``), anything else must agree with the run's settings."""
    if not Path(run_dir).is_dir():
        raise RunError(f"nothing to resume: {run_dir} does not exist; start without --resume")
    with StopRequests() as stop, hold_run_folder(run_dir):
        return _train(resume_config(run_dir, overrides or {}), True, progress, stop)


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
            how = (f"--torchvision {config.backbone} --arch heatmap" if issubclass(MODELS[config.arch], PaperFCN)
                   else f"--torchvision {config.backbone}{'_bn' if config.batch_norm else ''}")
            raise ConfigError(f"{what} {path}: no such file. Make one from torchvision's ImageNet weights with "
                              f"`fcn-jax convert {how} --output {path}` (needs internet once), or train without it")


def _layers(names: list[str]) -> str:
    """``vgg.backbone.convs.0.kernel, vgg.backbone.convs.0.bias, score_fr.kernel`` -> ``vgg.backbone.convs.0,
    score_fr``: the layers of variable names, in order."""
    return ", ".join(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """The complete checkpoints in the folder, read from the file system (orbax names them by step and
    writes them under temporary names until they are complete)."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _remove_half_written(run_dir: Path) -> None:
    """Temporary files that a killed run left behind (``.best.safetensors.tmp-PID``); the lock says that no
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


def _check_same_data(saved: dict | None, now: dict) -> None:
    for role, name in (("train", "training"), ("val", "validation")):
        before, after = (saved or {}).get(role), now[role]
        if before and before != after:
            what = (f"{before['samples']} -> {after['samples']} samples" if before["samples"] != after["samples"]
                    else "the same number of samples, but other files")
            raise DatasetError(f"the {name} split changed since the run started ({what}): resuming would not "
                               f"continue the same run. Restore the split as it was, or start a new run from this "
                               f"one's weights with --init-weights")


def _recording_states(loader: Loader, states: collections.deque):
    """The loader's batches, appending its state after each to ``states``: batches prefetched to the devices
    run ahead of the steps, so the state to checkpoint with a step is the one recorded with its batch."""
    for batch in loader:
        states.append(loader.state())
        yield batch


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


def _disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) \
                or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _writing(path: Path, run_dir: Path, checkpoints: RunCheckpoints | None = None):
    """A full disk while writing ``path`` (or a checkpoint still being written) becomes one line with the fix
    (the writers never leave a partial file)."""
    try:
        yield
    except Exception as e:
        if not _disk_full(e):
            raise
        if checkpoints is not None:
            with contextlib.suppress(Exception):  # a checkpoint written in the background may still complete
                checkpoints.wait()
        kept = _checkpoint_steps(run_dir)
        resume_from = (f"continue with `fcn-jax train --resume --run-dir {run_dir}` (its last complete checkpoint, "
                       f"step {kept[-1]}, is intact)" if kept else "start the run again")
        raise RunError(f"no space left on the device while writing {path}: free some space, then {resume_from}") \
            from e


def _train(config: TrainConfig, resume: bool, progress: bool, stop: StopRequests) -> dict:
    run_dir = Path(config.run_dir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        _remove_half_written(run_dir)
    existing = _checkpoint_steps(run_dir)
    if resume and not existing:
        raise RunError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    if not resume and existing:
        raise RunError(f"{run_dir} already holds a run (checkpoint at step {existing[-1]}): continue it with "
                       f"--resume or choose another --run-dir")
    if config.batch_size % jax.device_count():
        raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {jax.device_count()} devices")
    if not resume:  # a resumed run's weights come from its checkpoint
        _check_init_files(config)

    datasets = {role: get_dataset(config.dataset, split, data_dir=config.data_dir, seed=config.seed,
                                  synthetic_size=config.synthetic_size, skip_bad=config.skip_bad_samples,
                                  synthetic_samples=config.synthetic_train if role == "train" else config.synthetic_val)
                for role, split in (("train", config.train_split), ("val", config.val_split))}
    if config.dataset == "folder":
        _check_classes_used(datasets["train"], config.ignore_index)
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    feeding = dict(workers=config.workers, prefetch=config.prefetch)
    train_loader = Loader(datasets["train"], config.batch_size, seed=config.seed, normalization=None,  # on device
                          augment=Augment(config.crop, tuple(config.scale), config.hflip), **feeding, **shard)
    val_loader = EvalBatches(datasets["val"], config.batch_size, normalization=config.normalization,
                             multiple=MODELS[config.arch].size_multiple, **feeding,
                             **shard)
    num_classes, class_names = datasets["train"].num_classes, datasets["train"].class_names
    labels = {"class_names": class_names, "palette": datasets["train"].palette,  # stored with the weights
              "normalization": config.normalization}
    if config.class_weights is not None and len(config.class_weights) != num_classes:
        raise ConfigError(f"--class-weights has {len(config.class_weights)} values; the dataset has "
                          f"{num_classes} classes")
    fingerprints = {role: _fingerprint(ds) for role, ds in datasets.items()}

    model = create_model(config.arch, num_classes=num_classes, backbone=config.backbone, batch_norm=config.batch_norm,
                         seed=config.seed, dtype=jnp.dtype(config.dtype))
    if not resume:
        _load_init_weights(model, config)
    total_steps = config.epochs * len(train_loader)
    schedule = make_schedule(config.schedule, config.lr, total_steps=total_steps, steps_per_epoch=len(train_loader),
                             warmup_steps=config.warmup_steps, step_epochs=config.step_epochs, gamma=config.gamma,
                             power=config.power)
    tx = make_optimizer(config.optimizer, schedule, momentum=config.momentum, nesterov=config.nesterov,
                        weight_decay=config.weight_decay, bias_lr_factor=config.bias_lr_factor,
                        decay_biases=config.decay_biases)
    optimizer = nnx.Optimizer(model, tx, wrt=trainable(config.freeze_backbone, config.learn_upsampling))
    mesh = make_mesh()
    replicate_state((model, optimizer), mesh)
    loss_fn = functools.partial(get_loss(config.loss), ignore_index=config.ignore_index,
                                class_weights=config.class_weights)

    # (RunCheckpoints cleans orbax's leftovers; leaving the block waits for the last write and stops the workers)
    with RunCheckpoints(run_dir / "checkpoints", config.keep_checkpoints) as checkpoints, train_loader, val_loader:
        step, best, metrics = 0, {"mean_iou": -1.0, "step": None}, None
        if resume:
            step, data_state, info, skipped = checkpoints.restore_newest(model, optimizer)
            _check_same_data(info.get("data"), fingerprints)
            train_loader.restore(data_state)
            best, metrics = info["best"], info.get("metrics")
            if is_main:
                for failed, why in skipped:
                    note(f"skipped checkpoint {failed}, which does not restore ({why}); it is in "
                          f"{run_dir / 'damaged_checkpoints'} now")
                note(f"resumed from step {step}")
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / runs.CONFIG).write_text(config.to_json())
        reports = MetricsLog(run_dir) if is_main else None
        bar = tqdm(total=total_steps, initial=step, disable=not (is_main and progress), unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15,  # logs, not terminals: a line every 15 s
                   desc=f"{config.arch}-{config.backbone}{'_bn' if config.batch_norm else ''}")
        last_time, last_step = time.perf_counter(), step
        meter = LossMeter(step)

        def diverged(what: str, at_step: int) -> TrainingDiverged:
            bar.close()
            checkpoints.wait()
            kept = checkpoints.latest_step()
            where = f"the last good checkpoint is step {kept} in {run_dir / 'checkpoints'}" if kept is not None \
                else "no checkpoint had been written yet"
            lower = f"{config.lr / 10:g}"
            advice = (f"Lower the learning rate and continue from that checkpoint: "
                      f"fcn-jax train --resume --run-dir {run_dir} --lr {lower}" if kept is not None
                      else f"Check the data, or start again with a lower learning rate (e.g. --lr {lower})")
            return TrainingDiverged(f"{what} at step {at_step} (epoch {train_loader.epoch + 1}); stopped without "
                                    f"saving, {where}. {advice}")

        def save(data_state: dict, metrics_for_best=None):
            # The loss is computed before each update, so check the updated parameters before keeping them.
            if not bool(host_array(all_finite(nnx.state(model, nnx.Param)))):
                raise diverged("the parameters became NaN or infinite", step)
            with _writing(run_dir / "checkpoints" / str(step), run_dir, checkpoints):
                checkpoints.save(step, model, optimizer, data_state,
                                 {"step": step, "best": best, "metrics": metrics, "config": dataclasses.asdict(config),
                                  "data": fingerprints}, metrics=metrics_for_best)

        def stopped(data_state: dict) -> TrainingStopped:
            bar.close()
            if checkpoints.latest_step() != step:
                save(data_state)
            with _writing(run_dir / "checkpoints" / str(step), run_dir, checkpoints):
                checkpoints.wait()
            where = f"epoch {data_state['epoch'] + 1}, batch {data_state['batch']} of {len(train_loader)}"
            again = f"fcn-jax train --resume --run-dir {run_dir}" + (" --distributed" * (jax.process_count() > 1))
            return TrainingStopped(f"stopped at step {step} ({where}) on {stop.reason}: wrote the checkpoint of step "
                                   f"{step} to {run_dir / 'checkpoints'}. Resume with: {again}")

        stop.steps_begin()
        while train_loader.epoch < config.epochs:
            data_states = collections.deque()  # the loader's state after each batch, in step with the batches
            for batch in prefetch_to_devices(_recording_states(train_loader, data_states), mesh,
                                             config.device_prefetch):
                data_state = data_states.popleft()
                meter.add(train_step(model, optimizer, batch["image"], batch["label"], loss_fn,
                                     config.normalization, config.seed))
                step += 1
                bar.update(1)
                end_of_epoch = data_state["batch"] == len(train_loader)
                log_now = step % config.log_every_steps == 0 or step == total_steps
                checkpoint_now = (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                                  and not end_of_epoch)
                stop_now = stop.requested(step) and not end_of_epoch
                if not (log_now or checkpoint_now or stop_now or end_of_epoch):
                    continue  # the host waits for the devices only at these points
                seen = meter.fetch()
                if seen.first_bad_step is not None:
                    raise diverged(f"the loss became {seen.loss if step == seen.first_bad_step else 'NaN'}",
                                   seen.first_bad_step)
                if log_now:
                    now = time.perf_counter()
                    rate = (step - last_step) * config.batch_size / (now - last_time)
                    last_time, last_step = now, step
                    bar.set_postfix(loss=f"{seen.loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                    if reports:
                        epochs = data_state["epoch"] + data_state["batch"] / len(train_loader)
                        reports.write("train", step, {"loss": seen.loss, "lr": float(schedule(step)),
                                                      "images_per_s": rate, "epoch": epochs})
                if checkpoint_now:
                    save(data_state)
                if stop_now:
                    raise stopped(data_state)
            epoch = train_loader.epoch
            if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
                conf = confusion_over(model, val_loader, mesh, num_classes, config.ignore_index)
                metrics = segmentation_metrics(conf, class_names)
                improved = metrics["mean_iou"] > best["mean_iou"]
                if improved:
                    best = {"mean_iou": metrics["mean_iou"], "step": step}
                bar.write(f"epoch {epoch}/{config.epochs}  step {step}  validation mean IoU "
                          f"{metrics['mean_iou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}")
                if reports:
                    reports.write("val", step, {**{k: v for k, v in metrics.items() if k != "per_class_iou"},
                                                **{f"iou/{k}": v for k, v in metrics["per_class_iou"].items()}})
                save(train_loader.state(), {"mean_iou": metrics["mean_iou"]})
                if improved and is_main:
                    with _writing(run_dir / runs.BEST_WEIGHTS, run_dir, checkpoints):
                        save_weights(model, run_dir / runs.BEST_WEIGHTS, **labels)
            else:
                save(train_loader.state())
            if stop.requested(step) and train_loader.epoch < config.epochs:
                raise stopped(train_loader.state())
        bar.close()
        with _writing(run_dir / "checkpoints" / str(step), run_dir, checkpoints):
            checkpoints.wait()
    if is_main:
        _write_results(model, config, datasets, labels, reports, metrics, best, step)
    return metrics


def _write_results(model, config: TrainConfig, datasets: dict, labels: dict, reports: MetricsLog, metrics: dict,
                   best: dict, step: int) -> None:
    """What a finished run leaves besides its checkpoints (process 0): the final weights, the learning curve,
    prediction overlays and the closing table."""
    run_dir = Path(config.run_dir).absolute()
    with _writing(run_dir / runs.FINAL_WEIGHTS, run_dir):
        save_weights(model, run_dir / runs.FINAL_WEIGHTS, **labels)
    plot_learning_curve(reports.records(), run_dir / "learning_curve.png")
    _write_overlays(model, datasets["val"], config, run_dir / "predictions")
    reports.close()
    print(f"\nvalidation after {step} steps (best mean IoU {best['mean_iou']:.4f} at step {best['step']}):")
    print(metrics_table(metrics))
    skipped = [s for d in datasets.values() for s in getattr(d, "skipped", [])]
    if skipped:
        print(f"\nskipped {len(skipped)} bad sample(s) (--skip-bad-samples), e.g. {skipped[0][0]}: {skipped[0][1]}")
    print(f"\nrun directory: {run_dir}")


def _write_overlays(model, dataset, config: TrainConfig, folder: Path) -> None:
    """The first ``config.overlays`` validation images with ground truth and prediction (process 0,
    single-process runs; multi-host runs skip the pictures)."""
    if config.overlays <= 0 or jax.process_count() > 1:
        return
    folder.mkdir(parents=True, exist_ok=True)
    samples = [dataset[i] for i in range(min(config.overlays, len(dataset)))]
    preds = predict(model, [image for image, _ in samples], normalization=config.normalization)
    for i, ((image, label), pred) in enumerate(zip(samples, preds, strict=True)):
        overlay_panel(image, label, pred, dataset.palette, dataset.class_names, config.ignore_index).save(
            folder / f"val_{i:03d}.png")
