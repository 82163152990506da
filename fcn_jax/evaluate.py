"""``fcn-jax evaluate``: weights + a dataset split -> the FCN paper's metrics over the whole split.

Whole images at their own sizes (no centre crops, which inflate scores), batched by size bucket
(see :class:`fcn_jax.data.pipeline.EvalBatches`), sharded over every device; one confusion matrix
accumulated on device.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from fcn_jax.data import get_dataset
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.errors import FcnJaxError
from fcn_jax.metrics import segmentation_metrics
from fcn_jax.training.config import TrainConfig
from fcn_jax.training.reporting import metrics_table
from fcn_jax.training.step import device_batch_size, evaluate, make_mesh, replicate_state
from fcn_jax.weights import load_model


def resolve_weights(weights: str | Path) -> tuple[Path, TrainConfig | None]:
    """A weights file, or a training run directory (its best weights and its config)."""
    path = Path(weights)
    if path.is_dir():
        for name in ("best.safetensors", "final.safetensors"):
            if (path / name).is_file():
                config = path / "config.json"
                return path / name, TrainConfig.from_json(config.read_text()) if config.is_file() else None
        raise FcnJaxError(f"{path} holds no best.safetensors or final.safetensors (is it a finished training run?)")
    return path, None


def evaluate_model(model, dataset, *, batch_size: int = 0, normalization: str = "imagenet",
                   progress: bool = True) -> tuple[dict, np.ndarray]:
    """``(metrics, confusion matrix)`` of ``model`` over all of ``dataset``. ``batch_size`` 0: one
    image per device."""
    if model.num_classes != dataset.num_classes:
        raise FcnJaxError(f"the model predicts {model.num_classes} classes but the dataset has {dataset.num_classes}")
    batch_size = device_batch_size(batch_size)
    mesh = make_mesh()
    replicate_state(model, mesh)
    batches = EvalBatches(dataset, batch_size, normalization=normalization, process_index=jax.process_index(),
                          process_count=jax.process_count())
    with tqdm(total=len(batches), unit="batch", desc="evaluate", disable=not progress or jax.process_index()) as bar:
        conf = evaluate(model, batches, mesh, dataset.num_classes, dataset.ignore_index, progress=bar)
    model.eval()
    return segmentation_metrics(conf, list(dataset.class_names)), conf


def plot_confusion(conf: np.ndarray, class_names, path: Path) -> None:
    """Row-normalised confusion matrix (true class per row) as a heat-map PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(5, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if rows[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class's pixels")
    ax.set_title("confusion matrix (rows normalised)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_evaluate(weights: str, *, dataset: str | None = None, data_dir: str | None = None, split: str | None = None,
                 batch_size: int = 0, normalization: str | None = None, output: str | None = None,
                 skip_bad: bool = False, progress: bool = True) -> dict:
    """Evaluate, print the table, and write ``OUTPUT.json`` and ``OUTPUT_confusion.png``. Settings
    left out come from the run's config when ``weights`` is a run directory."""
    path, config = resolve_weights(weights)
    dataset = dataset or (config.dataset if config else None)
    if dataset is None:
        raise FcnJaxError("pass --dataset (and --data-dir): the weights file does not say what it was trained on")
    split = split or (config.val_split if config else "val")
    normalization = normalization or (config.normalization if config else "imagenet")
    if config and dataset == config.dataset:
        data_dir = data_dir or config.data_dir
    kwargs = {}
    if dataset == "synthetic" and config:
        kwargs = dict(synthetic_size=config.synthetic_size, synthetic_samples=config.synthetic_val, seed=config.seed)
    data = get_dataset(dataset, split, data_dir=data_dir, skip_bad=skip_bad, **kwargs)
    model = load_model(path)
    metrics, conf = evaluate_model(model, data, batch_size=batch_size, normalization=normalization, progress=progress)
    if jax.process_index() == 0:
        print(f"{dataset} {split}: {len(data)} images, weights {path}")
        print(metrics_table(metrics))
        skipped = getattr(data, "skipped", [])
        if skipped:
            print(f"skipped {len(skipped)} bad sample(s), e.g. {skipped[0][0]}: {skipped[0][1]}")
        if output:
            out = Path(output)
            out.parent.mkdir(parents=True, exist_ok=True)
            report = {"weights": str(path), "dataset": dataset, "split": split, "images": len(data),
                      "skipped": len(skipped), **metrics, "confusion_matrix": conf.tolist()}
            out.with_suffix(".json").write_text(json.dumps(report, indent=2))
            plot_confusion(conf, data.class_names, out.with_name(out.stem + "_confusion.png"))
            print(f"wrote {out.with_suffix('.json')} and {out.with_name(out.stem + '_confusion.png')}")
    return metrics
