"""Datasets and the input pipeline."""

from __future__ import annotations

from pathlib import Path

from fcn_jax.data.camvid import camvid11_dataset, camvid_dataset
from fcn_jax.data.cityscapes import cityscapes_dataset
from fcn_jax.data.coco import coco_dataset
from fcn_jax.data.files import SegmentationFiles
from fcn_jax.data.folder import folder_dataset
from fcn_jax.data.normalization import normalize
from fcn_jax.data.pipeline import Augment, Loader
from fcn_jax.data.synthetic import SyntheticShapes
from fcn_jax.data.transforms import ResizedShorter
from fcn_jax.data.voc import voc_dataset
from fcn_jax.errors import DatasetError

READERS = {"voc": voc_dataset, "camvid": camvid_dataset, "camvid11": camvid11_dataset,
           "cityscapes": cityscapes_dataset, "coco": coco_dataset, "folder": folder_dataset}
DATASETS = ("synthetic", *READERS)


def get_dataset(name: str, split: str, *, data_dir: str | None = None, synthetic_size: int = 64,
                synthetic_samples: int | None = None, seed: int = 0, skip_bad: bool = False,
                resize_shorter: int | None = None):
    """The ``split`` of dataset ``name``; see :mod:`fcn_jax.data.pipeline` for the interface.
    Nothing is downloaded: real datasets are read from ``data_dir`` in their published layouts.
    ``resize_shorter``: every sample resized so that its shorter side has that many pixels (torchvision's
    evaluation transform, :class:`~fcn_jax.data.transforms.ResizedShorter`); None: as stored."""
    dataset = _dataset(name, split, data_dir, synthetic_size, synthetic_samples, seed, skip_bad)
    return dataset if resize_shorter is None else ResizedShorter(dataset, resize_shorter)


def _dataset(name, split, data_dir, synthetic_size, synthetic_samples, seed, skip_bad):
    if name == "synthetic":
        return SyntheticShapes(split, num_samples=synthetic_samples, size=(synthetic_size, synthetic_size),
                               seed=seed)
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DatasetError(f"--dataset {name} needs --data-dir (the folder the dataset was unpacked into)")
    if not Path(data_dir).is_dir():
        raise DatasetError(f"--data-dir {data_dir}: no such folder")
    return READERS[name](data_dir, split, skip_bad=skip_bad)


__all__ = [
    "DATASETS",
    "Augment",
    "DatasetError",
    "Loader",
    "ResizedShorter",
    "SegmentationFiles",
    "SyntheticShapes",
    "get_dataset",
    "normalize",
]
