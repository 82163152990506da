"""The synthetic dataset and the loader: determinism, sharding, resumable state, augmentation, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fcn_jax.data import Augment, Loader, SyntheticShapes, get_dataset, normalize
from fcn_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from fcn_jax.errors import ConfigError, DatasetError


def _ds(n=40, size=32):
    return SyntheticShapes("train", num_samples=n, size=(size, size), seed=3)


def test_synthetic_is_deterministic_and_has_every_class():
    a, b = _ds(), _ds()
    for i in (0, 7, 39):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
    assert not np.array_equal(a[0][0], a[1][0])
    assert not np.array_equal(a[0][0], SyntheticShapes("val", num_samples=40, size=(32, 32), seed=3)[0][0])
    labels = np.stack([a[i][1] for i in range(40)])
    assert set(np.unique(labels)) == set(range(5))
    image, label = a[0]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and label.shape == (32, 32)
    with pytest.raises(IndexError):
        a[40]


def test_loader_order_depends_only_on_seed_and_epoch():
    first = [b["label"] for b in Loader(_ds(), 8, seed=1, workers=1)]
    again = [b["label"] for b in Loader(_ds(), 8, seed=1, workers=2)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True)) and len(first) == 5
    other_seed = [b["label"] for b in Loader(_ds(), 8, seed=2)]
    assert not all(np.array_equal(x, y) for x, y in zip(first, other_seed, strict=True))


def test_resumed_loader_continues_exactly():
    ref = Loader(_ds(), 8, seed=1, augment=Augment(crop=(24, 24), scale=(0.8, 1.3)))
    want = [b["image"] for _ in range(2) for b in ref]  # two epochs
    loader = Loader(_ds(), 8, seed=1, augment=Augment(crop=(24, 24), scale=(0.8, 1.3)))
    got = [b["image"] for b in itertools.islice(loader, 3)]
    state = loader.state()
    assert state == {"epoch": 0, "batch": 3}
    resumed = Loader(_ds(), 8, seed=1, augment=Augment(crop=(24, 24), scale=(0.8, 1.3)))
    resumed.restore(state)
    got += [b["image"] for b in resumed] + [b["image"] for b in resumed]
    assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))


def test_processes_share_each_global_batch():
    whole = [b["label"] for b in Loader(_ds(), 8, seed=4)]
    parts = [[b["label"] for b in Loader(_ds(), 8, seed=4, process_index=p, process_count=4)] for p in range(4)]
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([parts[p][i] for p in range(4)]), batch)
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        Loader(_ds(), 8, process_count=3)


def test_last_partial_batch_is_padded_with_ignored_pixels():
    batches = list(Loader(_ds(n=10), 4, shuffle=False, drop_last=False))
    assert len(batches) == 3 and batches[-1]["label"].shape[0] == 4
    assert (batches[-1]["label"][2:] == 255).all() and (batches[-1]["label"][:2] != 255).any()


def test_augment_crop_pads_with_ignore_and_flips():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    label = np.arange(24, dtype=np.uint8).reshape(4, 6) % 5
    img, lab = Augment(crop=(8, 8), hflip=False)(image, label, np.random.default_rng(0), 255)
    assert img.shape == (8, 8, 3) and (lab[4:] == 255).all() and (lab[:, 6:] == 255).all()
    flips = {Augment(hflip=True)(image, label, np.random.default_rng(s), 255)[1][0, 0] for s in range(20)}
    assert flips == {label[0, 0], label[0, -1]}


def test_normalisations():
    pixel = np.array([[[255, 128, 0]]], np.uint8)
    np.testing.assert_allclose(normalize(pixel, "imagenet")[0, 0],
                               (np.array([1, 128 / 255, 0]) - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(normalize(pixel, "reference")[0, 0],
                               np.array([0, 128 / 255, 1]) - np.array([103.939, 116.779, 123.68]) / 255, rtol=1e-6)
    with pytest.raises(ConfigError, match="unknown normalisation"):
        normalize(pixel, "yuv")


def test_label_out_of_range_is_a_clear_error():
    class Bad(SyntheticShapes):
        def __getitem__(self, i):
            image, label = super().__getitem__(i)
            label[0, 0] = 9
            return image, label

    with pytest.raises(DatasetError, match=r"label values \[9\] are outside \[0, 5\) and not the ignore label 255"):
        next(iter(Loader(Bad("train", num_samples=8, size=(16, 16)), 4, workers=0)))


def test_unknown_dataset_says_what_is_available():
    with pytest.raises(DatasetError,
                       match="unknown dataset 'imagenet'; choose one of synthetic, voc, camvid, camvid11, "
                                         "cityscapes, coco, folder"):
        get_dataset("imagenet", "train")
