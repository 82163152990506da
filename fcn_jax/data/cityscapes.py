"""Cityscapes fine annotations, mapped to the 19 training classes (255 = ignore).

Layout under ``--data-dir``:

    leftImg8bit/{train,val,test}/{city}/{name}_leftImg8bit.png
    gtFine/{train,val,test}/{city}/{name}_gtFine_labelIds.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn_jax.data.files import SegmentationFiles, read_index_png
from fcn_jax.errors import DatasetError

WHERE = "https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
                    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
                    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]],
                   np.uint8)
# labelId -> trainId (cityscapesScripts' labels.py); everything else is ignored.
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
              27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_TO_TRAIN = np.full(256, 255, np.uint8)
for _label, _train in _TRAIN_IDS.items():
    LABEL_TO_TRAIN[_label] = _train


def decode_label_ids(path: Path) -> np.ndarray:
    return LABEL_TO_TRAIN[read_index_png(path).clip(0, 255)]


def cityscapes_dataset(root: str | Path, split: str, *, skip_bad: bool = False) -> SegmentationFiles:
    root = Path(root)
    if split not in ("train", "val", "test"):
        raise DatasetError(f"unknown Cityscapes split {split!r}; choose train, val or test")
    images = root / "leftImg8bit" / split
    if not images.is_dir() or not (root / "gtFine" / split).is_dir():
        raise DatasetError(f"{root}: expected leftImg8bit/{split}/CITY/*_leftImg8bit.png and "
                           f"gtFine/{split}/CITY/*_gtFine_labelIds.png. Get the data from {WHERE}")
    pairs = []
    for image in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        pairs.append((image, root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"))
    return SegmentationFiles(pairs, class_names=CLASS_NAMES, palette=PALETTE, decode=decode_label_ids,
                             skip_bad=skip_bad, name=f"Cityscapes {split}")
