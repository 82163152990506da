"""Images/s of the training input pipeline (fcn_jax.data.Loader with worker processes), nothing else.

    python benchmarks/input_pipeline.py --workers 2 --batch-size 16 --crop 320x320 --scale 0.5,2 --batches 40
    python benchmarks/input_pipeline.py --data-dir DIR --dataset folder --workers 8

Without ``--data-dir`` it first writes a VOC-like folder dataset of its own (JPEGs around 500x375 with shapes
on a textured background, index PNG masks; kept in ``--cache`` for the next run). ``--sample gil`` and
``--sample wait`` replace the reading by ``--sample-ms`` of pure-Python work (which holds the GIL) or of
waiting (like network storage), to see how the workers scale with each. The first batch (starting the
workers) is not timed. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcn_jax.data import Augment, Loader, get_dataset
from fcn_jax.training.config import parse_size


def write_voc_like(root: Path, samples: int, seed: int = 0) -> Path:
    """``samples`` JPEG images (about 500x375, varied) with index PNG masks of 21 classes, in the folder
    dataset's layout; nothing is rewritten if the folder is already complete."""
    images, masks = root / "images" / "train", root / "masks" / "train"
    if (root / "classes.txt").is_file() and len(list(masks.glob("*.png"))) >= samples:
        return root
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(samples):
        w, h = int(rng.integers(440, 501)), int(rng.integers(330, 376))
        texture = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(texture).resize((w, h), Image.BILINEAR)
        mask = Image.new("L", (w, h), 0)
        draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            box = (x0, y0, x0 + int(rng.integers(40, w - x0)), y0 + int(rng.integers(40, h - y0)))
            cls = int(rng.integers(1, 21))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            mask_draw.ellipse(box, fill=cls)
        image.save(images / f"{i:05d}.jpg", quality=90)
        mask.save(masks / f"{i:05d}.png")
    (root / "classes.txt").write_text("\n".join(["background", *(f"class{c}" for c in range(1, 21))]) + "\n")
    return root


class _Synthetic:
    """Samples that cost ``ms`` of pure-Python work (``gil``) or of waiting (``wait``); small images."""

    num_classes, class_names, ignore_index = 2, ("a", "b"), 255
    palette = np.zeros((2, 3), np.uint8)

    def __init__(self, kind: str, ms: float, samples: int):
        self.kind, self.ms, self.samples = kind, ms, samples

    def __len__(self):
        return self.samples

    def __getitem__(self, i):
        end = time.perf_counter() + self.ms / 1000
        if self.kind == "wait":
            time.sleep(self.ms / 1000)
        else:
            x = 0
            while time.perf_counter() < end:
                x += sum(range(100))
        return np.full((64, 64, 3), i % 256, np.uint8), np.zeros((64, 64), np.uint8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="a dataset folder (default: write a VOC-like one to --cache)")
    p.add_argument("--dataset", default="folder", help="the dataset's layout, for --data-dir (default: folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fcn-jax-voc-like"),
                   help="where the generated dataset is kept")
    p.add_argument("--samples", type=int, default=200, help="samples of the generated dataset")
    p.add_argument("--sample", choices=("voc", "gil", "wait"), default="voc",
                   help="voc: read the dataset; gil / wait: --sample-ms of Python work / of waiting per sample")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: the main process)")
    p.add_argument("--prefetch", type=int, default=2, help="batches in flight")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=parse_size, default=(320, 320), metavar="HxW")
    p.add_argument("--scale", default="0.5,2.0", help="random scale range MIN,MAX")
    p.add_argument("--batches", type=int, default=30, help="batches timed (after one untimed)")
    args = p.parse_args(argv)

    if args.sample == "voc":
        root = args.data_dir or str(write_voc_like(Path(args.cache), args.samples))
        dataset = get_dataset(args.dataset if args.data_dir else "folder", args.split, data_dir=root)
        augment = Augment(args.crop, tuple(float(v) for v in args.scale.split(",")), hflip=True)
    else:
        dataset, augment = _Synthetic(args.sample, args.sample_ms, max(args.samples, 4096)), None
    loader = Loader(dataset, args.batch_size, seed=0, augment=augment, normalization=None, workers=args.workers,
                    prefetch=args.prefetch)
    with loader:
        batches = iter(loader)
        started = time.perf_counter()
        next(batches)
        first = time.perf_counter() - started
        count, started = 0, time.perf_counter()
        while count < args.batches:
            try:
                next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            count += 1
        seconds = time.perf_counter() - started
    rate = count * args.batch_size / seconds
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.sample} samples, {args.workers} workers, batch {args.batch_size}: {rate:.1f} images/s "
          f"({count} batches in {seconds:.2f} s; first batch {first:.2f} s)")
    print(json.dumps({"images_per_s": round(rate, 1), "workers": args.workers, "batch_size": args.batch_size,
                      "sample": args.sample, "sample_ms": args.sample_ms if args.sample != "voc" else None,
                      "crop": list(args.crop), "scale": args.scale, "prefetch": args.prefetch, "batches": count,
                      "first_batch_s": round(first, 2), "cores": cores, "machine": platform.processor() or
                      platform.machine()}))


if __name__ == "__main__":
    main()
