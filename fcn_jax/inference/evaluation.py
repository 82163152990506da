"""Evaluation: weights + a dataset split -> the FCN paper's metrics over the whole split.

Whole images at their own sizes (no centre crops, which inflate scores), batched by size bucket
(see :class:`fcn_jax.data.pipeline.EvalBatches`), sharded over every device; one confusion matrix
accumulated on device. Training validates through :func:`confusion_over` too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from fcn_jax.atomic_files import refuse_overwriting
from fcn_jax.data import get_dataset
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.devices import device_batch_size, host_array, make_mesh, replicate_state, shard_batch
from fcn_jax.errors import ConfigError
from fcn_jax.inference import runs
from fcn_jax.inference.drawing import plot_confusion
from fcn_jax.inference.metrics import confusion_matrix, metrics_table, segmentation_metrics
from fcn_jax.inference.runs import input_normalization, resolve_weights
from fcn_jax.models import forward
from fcn_jax.models.modes import in_mode
from fcn_jax.weights.native import load_model, read_weights_config


@nnx.jit(static_argnames=("num_classes", "ignore_index"))
def eval_step(model, images: jax.Array, labels: jax.Array, num_classes: int, ignore_index: int,
              sizes: jax.Array | None = None) -> jax.Array:
    """The confusion matrix of one batch, in the model's current mode (``sizes``: see
    :func:`fcn_jax.models.forward`)."""
    return confusion_matrix(forward(model, images, sizes), labels, num_classes, ignore_index)


def confusion_over(model, batches, mesh, num_classes: int, ignore_index: int, progress=None) -> np.ndarray:
    """The confusion matrix of ``model`` in eval mode over one pass of ``batches`` (e.g. ``EvalBatches``),
    accumulated on device. The model is left in the mode it had."""
    conf = jnp.zeros((num_classes, num_classes), jnp.int32)
    with in_mode(model, train=False):
        for batch in batches:
            batch = shard_batch({k: batch[k] for k in ("image", "label", "size")}, mesh)
            conf = conf + eval_step(model, batch["image"], batch["label"], num_classes, ignore_index, batch["size"])
            if progress is not None:
                progress.update(1)
    return host_array(conf)  # replicated: every process holds the whole matrix


def evaluate_model(model, dataset, *, batch_size: int = 0, normalization: str = "imagenet", workers: int | None = 0,
                   progress: bool = True) -> tuple[dict, np.ndarray]:
    """``(metrics, confusion matrix)`` of ``model`` (in eval mode) over all of ``dataset``. ``batch_size`` 0:
    one image per device; ``workers``: processes that read the samples (see :class:`fcn_jax.data.Loader`; 0:
    this one). The model's state is replicated over the devices and its mode left as it was."""
    if not getattr(model, "segmenter", False):  # a Segmenter that gives per-pixel logits
        raise ConfigError(f"evaluate measures segmentation; a {type(model).__name__} model is not a segmenter")
    if model.num_classes != dataset.num_classes:
        raise ConfigError(f"the model predicts {model.num_classes} classes but the dataset has {dataset.num_classes}")
    batch_size = device_batch_size(batch_size)
    mesh = make_mesh()
    replicate_state(model, mesh)
    batches = EvalBatches(dataset, batch_size, normalization=normalization, multiple=model.size_multiple,
                          process_index=jax.process_index(), process_count=jax.process_count(), workers=workers)
    bar = tqdm(total=len(batches), unit="batch", desc="evaluate", disable=not progress or jax.process_index())
    with batches, bar:
        conf = confusion_over(model, batches, mesh, dataset.num_classes, dataset.ignore_index, progress=bar)
    return segmentation_metrics(conf, list(dataset.class_names)), conf


def run_evaluate(weights: str, *, dataset: str | None = None, data_dir: str | None = None, split: str | None = None,
                 batch_size: int = 0, normalization: str | None = None, output: str | None = None,
                 skip_bad: bool = False, workers: int | None = None, resize_shorter: int | None = None,
                 progress: bool = True) -> dict:
    """Evaluate, print the table, and write ``OUTPUT.json`` and ``OUTPUT_confusion.png``. Settings
    left out come from the run's config when ``weights`` is a run directory. ``resize_shorter``: see
    :func:`fcn_jax.data.get_dataset`."""
    reports = _report_paths(output) if output else None
    path, run = resolve_weights(weights)
    if reports:
        inputs = [("the weights", path), *[("the run's settings", Path(weights) / runs.CONFIG)] * bool(run)]
        refuse_overwriting(zip(("--output", "--output's picture"), reports, strict=True), inputs)
    run = run or {}
    dataset = dataset or run.get("dataset")
    if dataset is None:
        raise ConfigError("pass --dataset (and --data-dir): the weights file does not say what it was trained on")
    split = split or run.get("val_split", "val")
    normalization = input_normalization(normalization, run, read_weights_config(path))
    if dataset == run.get("dataset"):
        data_dir = data_dir or run.get("data_dir")
        resize_shorter = resize_shorter or run.get("val_resize_shorter")
    if resize_shorter is not None and resize_shorter < 1:
        raise ConfigError(f"--resize-shorter must be >= 1 pixel, got {resize_shorter}")
    kwargs = {}
    if dataset == "synthetic" and run:
        kwargs = dict(synthetic_size=run["synthetic_size"], synthetic_samples=run["synthetic_val"], seed=run["seed"])
    data = get_dataset(dataset, split, data_dir=data_dir, skip_bad=skip_bad, resize_shorter=resize_shorter, **kwargs)
    model = load_model(path)
    metrics, conf = evaluate_model(model, data, batch_size=batch_size, normalization=normalization, workers=workers,
                                   progress=progress)
    if jax.process_index() == 0:
        resized = f", resized to a shorter side of {resize_shorter}" if resize_shorter else ""
        print(f"{dataset} {split}: {len(data)} images{resized}, weights {path}")
        print(metrics_table(metrics))
        skipped = getattr(data, "skipped", [])
        if skipped:
            print(f"skipped {len(skipped)} bad sample(s), e.g. {skipped[0][0]}: {skipped[0][1]}")
        if reports:
            json_path, picture = reports
            json_path.parent.mkdir(parents=True, exist_ok=True)
            report = {"weights": str(path), "dataset": dataset, "split": split, "resize_shorter": resize_shorter,
                      "images": len(data),
                      "skipped": len(skipped), **metrics, "confusion_matrix": conf.tolist()}
            json_path.write_text(json.dumps(report, indent=2))
            plot_confusion(conf, data.class_names, picture)
            print(f"wrote {json_path} and {picture}")
    return metrics


def _report_paths(output: str) -> tuple[Path, Path]:
    """``--output``: a folder (existing, or written with a trailing slash) gets ``metrics.json`` and
    ``confusion.png`` inside; anything else is a prefix for ``PREFIX.json`` and ``PREFIX_confusion.png``."""
    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir():
        return out / "metrics.json", out / "confusion.png"
    return out.with_suffix(".json"), out.with_name(out.stem + "_confusion.png")
