"""COCO 2017 with PASCAL VOC's 21 labels: what torchvision's FCN-ResNet weights were trained and scored on.

Layout under ``--data-dir`` (the official one):

    annotations/instances_{train,val}2017.json
    {train,val}2017/*.jpg

Splits: ``train2017`` (or ``train``) and ``val2017`` (or ``val``). A mask is built as torchvision's
segmentation references build it: the annotations of VOC's 20 categories (:data:`VOC_CATEGORY_IDS`, COCO
ids in VOC's class order) are decoded with pycocotools from their polygons or RLE (crowd regions included),
each pixel takes the class of the instance covering it, and a pixel covered by more than one instance becomes
the ignore label 255. The training split keeps only images whose VOC annotations cover more than 1000
pixels by COCO's own ``area`` field (torchvision's rule); validation keeps all 5000 images.

The masks are computed once, with a progress bar, and kept as index PNGs under ``$FCN_JAX_CACHE`` (default
``~/.cache/fcn_jax``) in a folder keyed by the annotation file (its path, size and time), so later runs read
PNGs and never parse the annotation file again. Building them needs ``pycocotools`` (``pip install
'fcn-jax[coco]'``); reading them does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fcn_jax.atomic_files import atomic_target
from fcn_jax.caches import cache_root
from fcn_jax.data.files import SegmentationFiles
from fcn_jax.data.palettes import voc_palette
from fcn_jax.data.voc import CLASS_NAMES
from fcn_jax.data.workers import SampleWorkers, default_workers
from fcn_jax.errors import DatasetError

WHERE = "COCO 2017: https://cocodataset.org/#download (train2017.zip, val2017.zip, annotations_trainval2017.zip)"
VOC_CATEGORY_IDS = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)  # 0: background
SPLITS = {"train2017": "train2017", "train": "train2017", "val2017": "val2017", "val": "val2017"}
MIN_TRAIN_AREA = 1000  # pixels of VOC objects a training image needs (torchvision's rule)
MASKS_VERSION = 1  # part of the cache key: raise it when the way a mask is built changes
IN_PROCESS_BELOW = 200  # masks to build: fewer are built in this process (starting workers costs seconds)

_CLASS_OF = {category: index for index, category in enumerate(VOC_CATEGORY_IDS) if index}


def voc_label(annotations: list[tuple[int, object]], height: int, width: int) -> np.ndarray:
    """uint8 ``(height, width)`` class indices from ``(VOC class, COCO segmentation)`` pairs: polygons, an
    uncompressed RLE (crowd regions) or a compressed one; 255 where instances overlap, 0 where there is none."""
    from pycocotools import mask as coco_masks

    label = np.zeros((height, width), np.uint8)
    covered = np.zeros((height, width), np.int32)
    for cls, segmentation in annotations:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
            rle = dict(segmentation, counts=segmentation["counts"].encode())  # compressed RLE: decoded as it is
        else:
            rle = coco_masks.frPyObjects(segmentation, height, width)
        mask = coco_masks.decode(rle)
        mask = mask.any(axis=2) if mask.ndim == 3 else mask.astype(bool)
        label = np.maximum(label, mask * np.uint8(cls))
        covered += mask
    label[covered > 1] = 255
    return label


class _MaskWriter:
    """Worker task: a list of ``(mask file name, height, width, annotations)`` -> their mask PNGs written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, images: list[tuple[str, int, int, list]]) -> int:
        for name, height, width, instances in images:
            try:
                label = voc_label(instances, height, width)
            except Exception as e:  # pycocotools raises bare Exceptions for malformed segmentations
                raise DatasetError(f"COCO image {name}: an annotation does not decode ({e}); the annotation file "
                                   f"is damaged, download it again") from None
            with atomic_target(self.folder / name) as tmp:
                Image.fromarray(label).save(tmp, format="PNG")
        return len(images)


def _read_annotations(path: Path, split: str) -> dict:
    """``{image file name: (height, width, [(VOC class, segmentation, area), ...])}``, in image id order."""
    try:
        with open(path) as f:
            data = json.load(f)
        images = {image["id"]: image for image in data["images"]}
        found = {images[i]["file_name"]: (images[i]["height"], images[i]["width"], []) for i in sorted(images)}
        for a in data["annotations"]:
            if a["category_id"] in _CLASS_OF:
                found[images[a["image_id"]]["file_name"]][2].append(
                    (_CLASS_OF[a["category_id"]], a["segmentation"], a["area"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a readable COCO instances file ({type(e).__name__}: {e}); download "
                           f"annotations_trainval2017.zip again. {WHERE}") from None
    if split == "train2017":
        found = {name: v for name, v in found.items() if sum(area for _, _, area in v[2]) > MIN_TRAIN_AREA}
    return found


def _cache_folder(annotation_file: Path, split: str) -> Path:
    stat = annotation_file.stat()
    key = f"{annotation_file.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}\n{MASKS_VERSION}"
    return cache_root() / "coco" / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _build_masks(annotation_file: Path, split: str, folder: Path, workers: int | None) -> list[str]:
    """The image file names of the split, their masks written under ``folder`` (those not there yet)."""
    found = _read_annotations(annotation_file, split)
    done = set(os.listdir(folder)) if folder.is_dir() else set()
    todo = [(_mask_name(name), h, w, [(cls, seg) for cls, seg, _ in annotations])
            for name, (h, w, annotations) in found.items() if _mask_name(name) not in done]
    if todo:
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            raise DatasetError("building COCO's masks needs pycocotools: pip install 'fcn-jax[coco]' "
                               "(or pip install pycocotools)") from None
        workers = 0 if len(todo) < IN_PROCESS_BELOW else (default_workers() if workers is None else workers)
        chunks = [todo[i:i + 64] for i in range(0, len(todo), 64)]
        with SampleWorkers(_MaskWriter(folder), workers) as pool, \
                tqdm(total=len(todo), desc=f"COCO {split}: building masks (once)", unit="mask") as bar:
            for written in pool.in_order(iter(chunks), max(2, 2 * workers)):
                bar.update(written)
    return list(found)


def _mask_name(image_name: str) -> str:
    return f"{Path(image_name).stem}.png"


def coco_dataset(root: str | Path, split: str, *, skip_bad: bool = False, workers: int | None = None
                 ) -> SegmentationFiles:
    """The ``split`` of COCO under ``root`` with VOC's labels (module doc); ``workers``: processes that build
    the masks the first time (default: one per spare core)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown COCO split {split!r}; choose one of {', '.join(SPLITS)}")
    split, root = SPLITS[split], Path(root)
    annotation_file, images = root / "annotations" / f"instances_{split}.json", root / split
    if not annotation_file.is_file() or not images.is_dir():
        raise DatasetError(f"{root}: expected annotations/instances_{split}.json and {split}/*.jpg (the official "
                           f"layout). Get the data from {WHERE}")
    folder = _cache_folder(annotation_file, split)
    index = folder / "index.json"
    names = json.loads(index.read_text()) if index.is_file() else None
    if names is None or not {_mask_name(n) for n in names} <= set(os.listdir(folder)):
        names = _build_masks(annotation_file, split, folder, workers)
        with atomic_target(index) as tmp:
            tmp.write_text(json.dumps(names))
    pairs = [(images / name, folder / _mask_name(name)) for name in names]
    return SegmentationFiles(pairs, class_names=CLASS_NAMES, palette=voc_palette(len(CLASS_NAMES)),
                             skip_bad=skip_bad, name=f"COCO {split} (VOC labels)")
