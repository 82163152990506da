"""Datasets and the input pipeline."""

from __future__ import annotations

from fcn_jax.data.pipeline import Augment, Loader, normalize
from fcn_jax.data.synthetic import SyntheticShapes

DATASETS = ("synthetic",)


def get_dataset(name: str, split: str, *, data_dir: str | None = None, synthetic_size: int = 64,
                synthetic_samples: int | None = None, seed: int = 0):
    """The ``split`` of dataset ``name``; see :mod:`fcn_jax.data.pipeline` for the interface."""
    if name == "synthetic":
        return SyntheticShapes(split, num_samples=synthetic_samples, size=(synthetic_size, synthetic_size),
                               seed=seed)
    raise ValueError(f"dataset {name!r} is not available in this version of fcn-jax (available: "
                     f"{', '.join(DATASETS)}); readers for VOC, CamVid and Cityscapes are planned")


__all__ = ["Augment", "DATASETS", "Loader", "SyntheticShapes", "get_dataset", "normalize"]
