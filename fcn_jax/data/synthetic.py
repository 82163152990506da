"""A built-in segmentation dataset generated from a seed: no download, the same pixels everywhere.

Each image shows 2-5 filled shapes (disc, square, triangle, ring) over a textured, noisy
background; later shapes occlude earlier ones. Every shape class has its own band of hues, but
backgrounds use all hues, so the network needs shape and context as well as colour. Sample ``i``
of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import colorsys

import numpy as np

from fcn_jax.errors import DatasetError

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring")
_HUE_BANDS = {1: (0.0, 0.12), 2: (0.25, 0.37), 3: (0.5, 0.62), 4: (0.75, 0.87)}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class SyntheticShapes:
    """``dataset[i] -> (image uint8 (H, W, 3) RGB, label uint8 (H, W) in 0..4)``."""

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    ignore_index = 255

    def __init__(self, split: str = "train", *, num_samples: int | None = None, size: tuple[int, int] = (64, 64),
                 seed: int = 0):
        if split not in _SPLIT_IDS:
            raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(_SPLIT_IDS)}")
        self.split, self.size, self.seed = split, tuple(size), seed
        self.num_samples = num_samples if num_samples is not None else (2000 if split == "train" else 200)
        self.palette = np.array([[0, 0, 0], [230, 60, 40], [60, 200, 60], [40, 120, 230], [200, 60, 220]], np.uint8)

    def __len__(self) -> int:
        return self.num_samples

    def image_sizes(self) -> list[tuple[int, int]]:
        return [self.size] * self.num_samples

    def fingerprint(self) -> str:
        """The samples are a function of these."""
        return f"synthetic {self.split} {self.num_samples} {self.size[0]}x{self.size[1]} seed {self.seed}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        h, w = self.size
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        image = _background(rng, yy, xx)
        label = np.zeros((h, w), np.uint8)
        scale = min(h, w)
        for _ in range(rng.integers(2, 6)):
            cls = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.08, 0.2) * scale
            mask = _shape_mask(cls, rng, yy - cy, xx - cx, r)
            hue = rng.uniform(*_HUE_BANDS[cls])
            colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), np.float32)
            shade = 1 + 0.15 * np.sin(yy * rng.uniform(-0.3, 0.3) + xx * rng.uniform(-0.3, 0.3))
            image[mask] = (colour * 255 * shade[..., None])[mask]
            label[mask] = cls
        image += rng.normal(0, 12, image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label


def _background(rng, yy, xx) -> np.ndarray:
    """Random colours blended by a few random plane waves: stripes, blobs and gradients."""
    image = np.zeros((*yy.shape, 3), np.float32)
    for _ in range(3):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        freq = rng.uniform(0.02, 0.25, 2) * rng.choice([-1, 1], 2)
        wave = 0.5 + 0.5 * np.sin(yy * freq[0] + xx * freq[1] + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * colour / 3 * 1.5
    return image


def _shape_mask(cls: int, rng, dy, dx, r) -> np.ndarray:
    if cls == 1:  # disc
        return dy ** 2 + dx ** 2 <= r ** 2
    if cls == 2:  # square, randomly rotated
        a = rng.uniform(0, np.pi / 2)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if cls == 3:  # triangle, randomly rotated
        a = rng.uniform(0, 2 * np.pi)
        inside = np.ones(dy.shape, bool)
        for k in range(3):
            t = a + 2 * np.pi * k / 3
            inside &= dx * np.cos(t) + dy * np.sin(t) <= r * 0.55
        return inside
    d2 = dy ** 2 + dx ** 2  # ring
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
