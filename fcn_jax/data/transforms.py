"""Resizing an image and its mask together, as torchvision's segmentation references do.

Images are resized with PIL's bilinear filter, which widens its support when it shrinks (antialiasing, as
torchvision's ``F.resize(..., antialias=True)`` on PIL images); masks with nearest neighbour, so every label
stays a label. "Shorter side to N" keeps the aspect ratio the way torchvision computes it: the longer side
becomes ``int(N * longer / shorter)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(H, W)`` with the shorter side ``shorter`` pixels and the aspect ratio kept (torchvision's rounding)."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` uint8 ``(H, W, 3)`` bilinear (antialiased) and ``label`` ``(H, W)`` nearest, to ``size`` (H, W)."""
    height, width, label_dtype = *size, label.dtype
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((width, height), Image.NEAREST))
    return image, label.astype(label_dtype)


class ResizedShorter:
    """``dataset`` with every sample resized so that its shorter side is ``shorter`` pixels (torchvision's
    evaluation transform for its segmentation weights: metrics are then taken at that resolution). Everything
    else (classes, palette, ignore label, skipped samples) is the wrapped dataset's."""

    def __init__(self, dataset, shorter: int):
        self.dataset, self.shorter = dataset, shorter

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (while unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.dataset[index]
        return resize_pair(image, label, shorter_side_size(*label.shape[:2], self.shorter))

    def image_sizes(self) -> list[tuple[int, int]]:
        return [shorter_side_size(h, w, self.shorter) for h, w in self.dataset.image_sizes()]

    def fingerprint(self) -> str | None:
        inner = self.dataset.fingerprint() if hasattr(self.dataset, "fingerprint") else None
        return inner and f"{inner}, shorter side {self.shorter}"
