"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events (tensorboardX, no
TensorFlow), a learning-curve PNG, prediction overlays and the final summary table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{kind}/{name}", value, step)
        self.tb.flush()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def close(self) -> None:
        self.tb.close()


def plot_learning_curve(records: list[dict], path: Path) -> None:
    """Training loss and validation mean IoU against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["mean_iou"]) for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_yscale("log")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:orange", label="validation mean IoU")
        ax2.set_ylabel("validation mean IoU", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def colorize(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class ids -> RGB; the ignore label is drawn white."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    lut[ignore_index] = 255
    return lut[label.astype(np.uint8)]


def overlay_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: np.ndarray,
                  class_names, ignore_index: int = 255, scale: int = 4) -> Image.Image:
    """image | ground truth | prediction over the image, with a legend of class names and colours."""
    blend = (0.45 * image + 0.55 * colorize(pred, palette, ignore_index)).astype(np.uint8)
    row = np.concatenate([image, colorize(label, palette, ignore_index), blend], axis=1)
    h, w = image.shape[:2]  # one panel
    picture = Image.fromarray(row).resize((3 * w * scale, h * scale), Image.NEAREST)
    legend_h = 18 * len(class_names) + 24
    canvas = Image.new("RGB", (picture.width, picture.height + legend_h), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x, title in zip((0, w * scale, 2 * w * scale), ("image", "ground truth", "prediction")):
        draw.text((x + 4, picture.height + 2), title, fill="black")
    for i, name in enumerate(class_names):
        y = picture.height + 20 + 18 * i
        draw.rectangle((4, y, 18, y + 12), fill=tuple(int(c) for c in palette[i]), outline="black")
        draw.text((24, y), name, fill="black")
    return canvas


def metrics_table(metrics: dict) -> str:
    """The four FCN metrics and the per-class IoU as a text table."""
    lines = [f"{'pixel accuracy':<22}{metrics['pixel_acc']:8.4f}", f"{'mean accuracy':<22}{metrics['mean_acc']:8.4f}",
             f"{'mean IoU':<22}{metrics['mean_iou']:8.4f}", f"{'frequency weighted IoU':<22}{metrics['fw_iou']:8.4f}",
             "", f"{'class':<22}{'IoU':>8}"]
    lines += [f"{name:<22}{iou:8.4f}" for name, iou in metrics["per_class_iou"].items()]
    return "\n".join(lines)
