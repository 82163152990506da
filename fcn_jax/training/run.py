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
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from fcn_jax.data import Loader
from fcn_jax.devices import host_array, prefetch_to_devices
from fcn_jax.errors import RunError, TrainingDiverged
from fcn_jax.inference import runs
from fcn_jax.inference.drawing import overlay_panel, plot_learning_curve
from fcn_jax.inference.evaluation import confusion_over
from fcn_jax.inference.metrics import metrics_table, segmentation_metrics
from fcn_jax.inference.prediction import predict
from fcn_jax.notes import note
from fcn_jax.training.checkpoint import RunCheckpoints
from fcn_jax.training.config import TrainConfig, resume_config
from fcn_jax.training.lock import hold_run_folder
from fcn_jax.training.meter import LossMeter
from fcn_jax.training.reporting import MetricsLog
from fcn_jax.training.setup import Prepared, check_same_data, checkpoint_steps, prepare
from fcn_jax.training.step import train_step
from fcn_jax.training.stopping import StopRequests, TrainingStopped
from fcn_jax.weights.native import save_weights


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


def _recording_states(loader: Loader, states: collections.deque):
    """The loader's batches, appending its state after each to ``states``: batches prefetched to the devices
    run ahead of the steps, so the state to checkpoint with a step is the one recorded with its batch."""
    for batch in loader:
        states.append(loader.state())
        yield batch


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
        kept = checkpoint_steps(run_dir)
        resume_from = (f"continue with `fcn-jax train --resume --run-dir {run_dir}` (its last complete checkpoint, "
                       f"step {kept[-1]}, is intact)" if kept else "start the run again")
        raise RunError(f"no space left on the device while writing {path}: free some space, then {resume_from}") \
            from e


def _train(config: TrainConfig, resume: bool, progress: bool, stop: StopRequests) -> dict:
    run = prepare(config, resume)
    # (RunCheckpoints cleans orbax's leftovers; leaving the block waits for the last write and stops the workers)
    with RunCheckpoints(run.run_dir / "checkpoints", config.keep_checkpoints) as checkpoints, run.train_loader, \
            run.val_loader:
        loop = _Loop(config, run, checkpoints, stop)
        if resume:
            loop.restore()
        loop.start_reports(progress)
        stop.steps_begin()
        while run.train_loader.epoch < config.epochs:
            loop.train_epoch()
            loop.end_epoch()
        loop.bar.close()
        with _writing(run.run_dir / "checkpoints" / str(loop.step), run.run_dir, checkpoints):
            checkpoints.wait()
    if loop.is_main:
        _write_results(run.model, config, run.datasets, run.labels, loop.reports, loop.metrics, loop.best, loop.step)
    return loop.metrics


@dataclasses.dataclass(frozen=True)
class Due:
    """What a step is due for; the host waits for the devices only when it is due for something."""

    log: bool
    checkpoint: bool
    stop: bool
    end_of_epoch: bool

    def __bool__(self) -> bool:
        return self.log or self.checkpoint or self.stop or self.end_of_epoch


def due(config: TrainConfig, step: int, total_steps: int, end_of_epoch: bool, stop_requested: bool) -> Due:
    """What ``step`` (just taken) is due for: a log line every ``log_every_steps`` and at the last step, a
    checkpoint every ``checkpoint_every_steps``, a stop when one was requested (an epoch's end does both itself)."""
    return Due(log=step % config.log_every_steps == 0 or step == total_steps,
               checkpoint=bool(config.checkpoint_every_steps) and step % config.checkpoint_every_steps == 0
               and not end_of_epoch,
               stop=stop_requested and not end_of_epoch, end_of_epoch=end_of_epoch)


class _Loop:
    """A run's changing state (step, best and last metrics, the loss on the devices) and what it does at its
    steps, epoch ends and stops."""

    def __init__(self, config: TrainConfig, run: Prepared, checkpoints: RunCheckpoints, stop: StopRequests):
        self.config, self.run, self.checkpoints, self.stop = config, run, checkpoints, stop
        self.is_main = jax.process_index() == 0
        self.step, self.best, self.metrics = 0, {"mean_iou": -1.0, "step": None}, None

    def restore(self) -> None:
        self.step, data_state, info, skipped = self.checkpoints.restore_newest(self.run.model, self.run.optimizer)
        check_same_data(info.get("data"), self.run.fingerprints)
        self.run.train_loader.restore(data_state)
        self.best, self.metrics = info["best"], info.get("metrics")
        if self.is_main:
            for failed, why in skipped:
                note(f"skipped checkpoint {failed}, which does not restore ({why}); it is in "
                     f"{self.run.run_dir / 'damaged_checkpoints'} now")
            note(f"resumed from step {self.step}")

    def start_reports(self, progress: bool) -> None:
        config, run_dir = self.config, self.run.run_dir
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / runs.CONFIG).write_text(config.to_json())
        self.reports = MetricsLog(run_dir) if self.is_main else None
        bn = "_bn" if config.batch_norm and "vgg" in config.backbone else ""  # ResNets always have it
        self.bar = tqdm(total=self.run.total_steps, initial=self.step, disable=not (self.is_main and progress),
                        unit="step", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 15,  # logs, not terminals: a line every 15 s
                        desc=f"{config.arch}-{config.backbone}{bn}")
        self.last_time, self.last_step = time.perf_counter(), self.step
        self.meter = LossMeter(self.step)

    def train_epoch(self) -> None:
        """The rest of the current epoch, step by step."""
        config, run = self.config, self.run
        data_states = collections.deque()  # the loader's state after each batch, in step with the batches
        for batch in prefetch_to_devices(_recording_states(run.train_loader, data_states), run.mesh,
                                         config.device_prefetch):
            data_state = data_states.popleft()
            self.meter.add(train_step(run.model, run.optimizer, batch["image"], batch["label"], run.loss_fn,
                                      config.normalization, config.seed, run.aux_weight))
            self.step += 1
            self.bar.update(1)
            now = due(config, self.step, run.total_steps, data_state["batch"] == len(run.train_loader),
                      self.stop.requested(self.step))
            if now:
                self.act(now, data_state)

    def act(self, now: Due, data_state: dict) -> None:
        """What a step is due for, after reading the loss from the devices."""
        seen = self.meter.fetch()
        if seen.first_bad_step is not None:
            raise self.diverged(f"the loss became {seen.loss if self.step == seen.first_bad_step else 'NaN'}",
                                seen.first_bad_step)
        if now.log:
            self.log(seen.loss, data_state)
        if now.checkpoint:
            self.save(data_state)
        if now.stop:
            raise self.stopped(data_state)

    def log(self, loss: float, data_state: dict) -> None:
        config, loader = self.config, self.run.train_loader
        now = time.perf_counter()
        rate = (self.step - self.last_step) * config.batch_size / (now - self.last_time)
        self.last_time, self.last_step = now, self.step
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
        if self.reports:
            epochs = data_state["epoch"] + data_state["batch"] / len(loader)
            self.reports.write("train", self.step, {"loss": loss, "lr": float(self.run.schedule(self.step)),
                                                    "images_per_s": rate, "epoch": epochs})

    def end_epoch(self) -> None:
        """Validation (every ``eval_every_epochs`` and at the end) and the epoch's checkpoint; then a stop asked
        for during the epoch."""
        config, run = self.config, self.run
        epoch = run.train_loader.epoch
        if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
            self.validate(epoch)
        else:
            self.save(run.train_loader.state())
        if self.stop.requested(self.step) and run.train_loader.epoch < config.epochs:
            raise self.stopped(run.train_loader.state())

    def validate(self, epoch: int) -> None:
        config, run = self.config, self.run
        conf = confusion_over(run.model, run.val_loader, run.mesh, run.datasets["train"].num_classes,
                              config.ignore_index)
        self.metrics = segmentation_metrics(conf, run.datasets["train"].class_names)
        improved = self.metrics["mean_iou"] > self.best["mean_iou"]
        if improved:
            self.best = {"mean_iou": self.metrics["mean_iou"], "step": self.step}
        self.bar.write(f"epoch {epoch}/{config.epochs}  step {self.step}  validation mean IoU "
                       f"{self.metrics['mean_iou']:.4f}  pixel accuracy {self.metrics['pixel_acc']:.4f}")
        if self.reports:
            self.reports.write("val", self.step, {
                **{k: v for k, v in self.metrics.items() if k != "per_class_iou"},
                **{f"iou/{k}": v for k, v in self.metrics["per_class_iou"].items()}})
        self.save(run.train_loader.state(), {"mean_iou": self.metrics["mean_iou"]})
        if improved and self.is_main:
            with _writing(run.run_dir / runs.BEST_WEIGHTS, run.run_dir, self.checkpoints):
                save_weights(run.model, run.run_dir / runs.BEST_WEIGHTS, **run.labels)

    def save(self, data_state: dict, metrics_for_best: dict | None = None) -> None:
        # The loss is computed before each update, so check the updated parameters before keeping them.
        run = self.run
        if not bool(host_array(all_finite(nnx.state(run.model, nnx.Param)))):
            raise self.diverged("the parameters became NaN or infinite", self.step)
        with _writing(run.run_dir / "checkpoints" / str(self.step), run.run_dir, self.checkpoints):
            self.checkpoints.save(self.step, run.model, run.optimizer, data_state,
                                  {"step": self.step, "best": self.best, "metrics": self.metrics,
                                   "config": dataclasses.asdict(self.config), "data": run.fingerprints},
                                  metrics=metrics_for_best)

    def diverged(self, what: str, at_step: int) -> TrainingDiverged:
        self.bar.close()
        self.checkpoints.wait()
        kept, run_dir = self.checkpoints.latest_step(), self.run.run_dir
        where = f"the last good checkpoint is step {kept} in {run_dir / 'checkpoints'}" if kept is not None \
            else "no checkpoint had been written yet"
        lower = f"{self.config.lr / 10:g}"
        advice = (f"Lower the learning rate and continue from that checkpoint: "
                  f"fcn-jax train --resume --run-dir {run_dir} --lr {lower}" if kept is not None
                  else f"Check the data, or start again with a lower learning rate (e.g. --lr {lower})")
        return TrainingDiverged(f"{what} at step {at_step} (epoch {self.run.train_loader.epoch + 1}); stopped "
                                f"without saving, {where}. {advice}")

    def stopped(self, data_state: dict) -> TrainingStopped:
        self.bar.close()
        run_dir, step = self.run.run_dir, self.step
        if self.checkpoints.latest_step() != step:
            self.save(data_state)
        with _writing(run_dir / "checkpoints" / str(step), run_dir, self.checkpoints):
            self.checkpoints.wait()
        where = f"epoch {data_state['epoch'] + 1}, batch {data_state['batch']} of {len(self.run.train_loader)}"
        again = f"fcn-jax train --resume --run-dir {run_dir}" + (" --distributed" * (jax.process_count() > 1))
        return TrainingStopped(f"stopped at step {step} ({where}) on {self.stop.reason}: wrote the checkpoint of "
                               f"step {step} to {run_dir / 'checkpoints'}. Resume with: {again}")


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
