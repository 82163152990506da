"""PASCAL VOC 2012 segmentation, SBD, and the usual ``train_aug`` / ``seg11valid`` splits.

Layout under ``--data-dir`` (either or both):

    VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val,trainval}.txt}
    benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}

Splits: ``train``, ``val``, ``trainval`` (VOC); ``train_aug`` = VOC train + SBD train + SBD val minus
VOC val (VOC's masks where both exist); ``seg11valid``, the FCN paper's validation set = VOC2011 val
minus SBD train (needs ``VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn_jax.data.files import SegmentationFiles, read_index_png
from fcn_jax.data.palettes import voc_palette
from fcn_jax.errors import DatasetError

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
SPLITS = ("train", "val", "trainval", "train_aug", "seg11valid")
WHERE = ("PASCAL VOC 2012: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar); "
         "SBD: http://home.bharathh.info/pubs/codes/SBD/download.html (benchmark.tgz)")


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class mask ``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file."""
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation, np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found") from None
    except Exception as e:  # scipy raises several types for truncated or foreign files
        raise DatasetError(f"{path}: not an SBD GTcls .mat file ({e}); replace it or pass --skip-bad-samples") from None


def decode_mask(path: Path) -> np.ndarray:
    """A VOC palette PNG or an SBD ``.mat`` (a module-level function: the dataset goes to worker processes)."""
    return read_sbd_mat(path) if path.suffix == ".mat" else read_index_png(path)


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file {path} not found; expected the layout\n  {__doc__.split('Layout')[1].strip()}\n"
                           f"Get the data from {WHERE}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_dataset(root: str | Path, split: str, *, skip_bad: bool = False) -> SegmentationFiles:
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    sbd = root / "benchmark_RELEASE" / "dataset"
    if not voc.is_dir():
        raise DatasetError(f"{root}: no VOCdevkit/VOC2012 folder. Expected --data-dir to hold VOCdevkit/VOC2012 "
                           f"(and benchmark_RELEASE for train_aug). Get the data from {WHERE}")
    seg = voc / "ImageSets" / "Segmentation"

    def voc_pair(i):
        return voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png"

    if split in ("train", "val", "trainval"):
        pairs = [voc_pair(i) for i in _ids(seg / f"{split}.txt")]
    elif split == "train_aug":
        if not sbd.is_dir():
            raise DatasetError(f"{root}: train_aug needs SBD in benchmark_RELEASE/dataset. Get it from {WHERE}")
        val = set(_ids(seg / "val.txt"))
        ids = dict.fromkeys(_ids(seg / "train.txt") + _ids(sbd / "train.txt") + _ids(sbd / "val.txt"))
        pairs = [voc_pair(i) if voc_pair(i)[1].is_file() else (sbd / "img" / f"{i}.jpg", sbd / "cls" / f"{i}.mat")
                 for i in ids if i not in val]
    else:  # seg11valid
        sbd_train = set(_ids(sbd / "train.txt"))
        voc2011_val = root / "VOCdevkit" / "VOC2011" / "ImageSets" / "Segmentation" / "val.txt"
        pairs = [voc_pair(i) for i in _ids(voc2011_val) if i not in sbd_train]
    return SegmentationFiles(pairs, class_names=CLASS_NAMES, palette=voc_palette(len(CLASS_NAMES)), decode=decode_mask,
                             skip_bad=skip_bad, name=f"VOC {split}")
