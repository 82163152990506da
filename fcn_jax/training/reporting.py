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


def blend(image: np.ndarray, pred: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """The prediction's colours over the image."""
    return (0.45 * image + 0.55 * colorize(pred, palette, ignore_index)).astype(np.uint8)


def picture(panels: list[tuple[str, np.ndarray]], palette: np.ndarray, class_names) -> Image.Image:
    """Titled RGB panels side by side (small images enlarged), with a legend of class names and colours."""
    h, w = panels[0][1].shape[:2]
    scale = max(1, 256 // max(h, w))
    row = np.concatenate([p for _, p in panels], axis=1)
    strip = Image.fromarray(row).resize((row.shape[1] * scale, h * scale), Image.NEAREST)
    columns = max(1, strip.width // 160)
    legend_h = 18 * -(-len(class_names) // columns) + 24
    canvas = Image.new("RGB", (strip.width, strip.height + legend_h), "white")
    canvas.paste(strip, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (title, _) in enumerate(panels):
        draw.text((k * w * scale + 4, strip.height + 2), title, fill="black")
    for i, name in enumerate(class_names):
        x, y = 4 + 160 * (i % columns), strip.height + 20 + 18 * (i // columns)
        draw.rectangle((x, y, x + 14, y + 12), fill=tuple(int(c) for c in palette[i]), outline="black")
        draw.text((x + 20, y), str(name), fill="black")
    return canvas


def overlay_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: np.ndarray,
                  class_names, ignore_index: int = 255) -> Image.Image:
    """image | ground truth | prediction over the image, with a legend."""
    return picture([("image", image), ("ground truth", colorize(label, palette, ignore_index)),
                    ("prediction", blend(image, pred, palette, ignore_index))], palette, class_names)


def metrics_table(metrics: dict) -> str:
    """The four FCN metrics and the per-class IoU as a text table."""
    lines = [f"{'pixel accuracy':<22}{metrics['pixel_acc']:8.4f}", f"{'mean accuracy':<22}{metrics['mean_acc']:8.4f}",
             f"{'mean IoU':<22}{metrics['mean_iou']:8.4f}", f"{'frequency weighted IoU':<22}{metrics['fw_iou']:8.4f}",
             "", f"{'class':<22}{'IoU':>8}"]
    lines += [f"{name:<22}{iou:8.4f}" for name, iou in metrics["per_class_iou"].items()]
    return "\n".join(lines)
