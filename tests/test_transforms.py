"""torchvision's segmentation transforms: the evaluation preset of its FCN-ResNet weights, and the training
recipe's random resize of the shorter side, crop with padding and flip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcn_jax.data import Augment, ResizedShorter, SyntheticShapes, normalize
from fcn_jax.data.transforms import resize_pair, shorter_side_size
from fcn_jax.errors import ConfigError

SIZES = [(375, 500), (500, 333), (97, 131), (520, 521), (33, 200)]  # (H, W): shrunk, grown, square-ish, extreme


class _Samples(list):
    """A dataset of ``(image, label)`` pairs held in memory."""

    num_classes, class_names, ignore_index, palette = 21, tuple(map(str, range(21))), 255, None

    def image_sizes(self):
        return [label.shape for _, label in self]


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), np.uint8), rng.integers(0, 21, (h, w)).astype(np.uint8)


def test_the_evaluation_transform_is_torchvisions_semantic_segmentation_preset():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    preset = torchvision.models.segmentation.FCN_ResNet50_Weights.DEFAULT.transforms()  # resize 520, no download
    for seed, (h, w) in enumerate(SIZES):
        image, label = _image(h, w, seed)
        ours = ResizedShorter(_Samples([(image, label)]), 520)
        got_image, got_label = ours[0]
        want = preset(Image.fromarray(image)).permute(1, 2, 0).numpy()
        assert got_image.shape == want.shape and ours.image_sizes() == [want.shape[:2]]
        np.testing.assert_allclose(normalize(got_image), want, rtol=0, atol=1e-5)
        want_label = np.asarray(F.resize(Image.fromarray(label), [520], interpolation=InterpolationMode.NEAREST))
        np.testing.assert_array_equal(got_label, want_label)


def test_the_shorter_side_follows_torchvisions_rounding():
    pytest.importorskip("torchvision")
    from torchvision.transforms.functional import _compute_resized_output_size  # what F.resize(img, [N]) uses

    for h, w in [*SIZES, (7, 3), (1, 1), (2, 999)]:
        for shorter in (1, 260, 333, 1040):
            assert shorter_side_size(h, w, shorter) == tuple(_compute_resized_output_size((h, w), [shorter])), (h, w)


def test_the_training_resize_draws_the_shorter_side_then_crops_with_padding_and_flips():
    augment = Augment(crop=(48, 48), shorter=(20, 60), hflip=True)
    image, label = _image(30, 45)
    shorter_sides, flips = set(), 0
    for seed in range(60):
        shorter = int(np.random.default_rng(seed).integers(20, 61))  # the augment's first draw
        got_image, got_label = augment(image, label, np.random.default_rng(seed), ignore_index=255)
        assert got_image.shape == (48, 48, 3) and got_label.shape == (48, 48)
        resized_image, resized_label = resize_pair(image, label, shorter_side_size(30, 45, shorter))
        h, w = resized_label.shape
        pad = ((0, max(48 - h, 0)), (0, max(48 - w, 0)))  # at the bottom and right: zeros and the ignore label
        padded_image = np.pad(resized_image, (*pad, (0, 0)))
        padded_label = np.pad(resized_label, pad, constant_values=255)
        windows = [(y, x) for y in range(padded_label.shape[0] - 47) for x in range(padded_label.shape[1] - 47)]
        found = [(flip, y, x) for flip in (False, True) for y, x in windows
                 if (padded_image[y:y + 48, x:x + 48] == (got_image[:, ::-1] if flip else got_image)).all()
                 and (padded_label[y:y + 48, x:x + 48] == (got_label[:, ::-1] if flip else got_label)).all()]
        assert found, seed  # the crop is a window of the resized, padded pair, flipped or not
        shorter_sides.add(shorter)
        flips += found[0][0]
    assert min(shorter_sides) < 30 < max(shorter_sides) and 10 < flips < 50


def test_resize_options_are_checked():
    with pytest.raises(ConfigError, match="not both"):
        Augment(scale=(0.5, 2.0), shorter=(260, 1040))
    with pytest.raises(ConfigError, match="0 < MIN <= MAX"):
        Augment(shorter=(100, 50))
    synthetic = SyntheticShapes("val", num_samples=3, size=(32, 48))
    wrapped = ResizedShorter(synthetic, 16)
    assert wrapped.num_classes == synthetic.num_classes and len(wrapped) == 3
    assert wrapped.image_sizes() == [(16, 24)] * 3
    assert wrapped[0][0].shape == (16, 24, 3)
