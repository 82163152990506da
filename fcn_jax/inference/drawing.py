"""Pictures: class colours, masks over images, legends, the learning curve and the confusion matrix.

Images are uint8 RGB ``(H, W, 3)``; masks are class indices ``(H, W)``, the ignore label drawn white.
Matplotlib is imported only by the plotting functions (with the non-interactive Agg backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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


def heatmap_picture(image: np.ndarray, maps: np.ndarray, names: list[str], top: int) -> Image.Image:
    """The image, then one panel per class among the ``top`` with the highest probability anywhere: its map,
    upsampled to the image, in red over a dimmed copy, titled with the class name and its peak probability."""
    best = np.argsort(-maps.reshape(-1, maps.shape[-1]).max(0))[:top]
    h, w = image.shape[:2]
    panels = [("image", image)]
    for c in best:
        heat = np.asarray(Image.fromarray((255 * maps[..., c]).astype(np.uint8)).resize((w, h), Image.BILINEAR))
        tinted = 0.5 * image.astype(np.float32)
        tinted[..., 0] += 0.5 * heat
        panels.append((f"{names[c]} ({maps[..., c].max():.2f})", np.clip(tinted, 0, 255).astype(np.uint8)))
    canvas = Image.new("RGB", (w * len(panels), h + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (title, panel) in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (k * w, 20))
        draw.text((k * w + 4, 4), title, fill="black")
    return canvas


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(records: list[dict], path: Path) -> None:
    """Training loss and validation mean IoU against the step (``metrics.jsonl`` records)."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["mean_iou"]) for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_yscale("log")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation mean IoU")
        ax2.set_ylabel("validation mean IoU", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(conf: np.ndarray, class_names, path: Path) -> None:
    """Row-normalised confusion matrix (true class per row) as a heat-map PNG."""
    plt = _pyplot()
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
