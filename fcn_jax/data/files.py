"""Image / mask file pairs as a segmentation dataset, with errors that name the file and the fix."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from fcn_jax.data.pipeline import check_label
from fcn_jax.errors import DatasetError
from fcn_jax.notes import note


@contextlib.contextmanager
def open_image(path: Path, what: str = "image", fix: str | None = None) -> Iterator[Image.Image]:
    """The PIL image at ``path``; a missing or unreadable file (``what``: "image" or "mask") becomes a
    DatasetError that names it and the fix (by default a dataset's: replace, remove from the split or skip)."""
    if fix is None:
        fix = ("replace the file, remove it from the split, or" if what == "image" else "replace the file or") \
            + " pass --skip-bad-samples"
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise DatasetError(f"{path}: {'mask ' if what == 'mask' else ''}file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: not a readable {what} ({e}); {fix}") from None


EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the stored image by 90 degrees for display


def _orientation(im: Image.Image) -> int:
    return im.getexif().get(EXIF_ORIENTATION, 1)


def read_image(path: Path, fix: str | None = None) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` as the image is displayed: its EXIF orientation applied (phone photos store
    pixels turned and say so in a tag). Grey and palette images are converted, alpha is dropped, and 16-bit
    greyscale is scaled to 8 bits (a plain conversion would saturate it)."""
    with open_image(path, fix=fix) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # I;16 and friends: 16-bit greyscale
            grey = np.round(np.asarray(im, np.float64) / 257).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        return np.asarray(im.convert("RGB"))


def displayed_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of the image as displayed (its EXIF orientation applied), from the file's header only."""
    with open_image(path) as im:
        w, h = im.size
        return (w, h) if _orientation(im) in SWAPS_SIDES else (h, w)


def read_index_png(path: Path) -> np.ndarray:
    """A mask PNG of class indices (palette or greyscale), as uint8 ``(H, W)``."""
    with open_image(path, "mask") as im:
        if im.mode not in ("P", "L", "I;16", "I"):
            raise DatasetError(f"{path}: expected a mask of class indices (palette or greyscale PNG), got an "
                               f"{im.mode} image; colour-coded masks need their colour table")
        return np.asarray(im).astype(np.int64)


class SegmentationFiles:
    """``dataset[i] -> (image uint8 (H, W, 3), label uint8 (H, W))`` read from ``pairs`` of
    (image path, mask path); ``decode`` turns a mask file into class indices (default: an index PNG).

    Every sample is checked: readable files, mask size equal to the image's, labels in
    ``[0, num_classes)`` or ``ignore_index``. With ``skip_bad`` all samples are checked up front and
    the bad ones left out (``skipped`` lists them); otherwise the first bad one stops with its name.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], *, class_names: Sequence[str], palette: np.ndarray,
                 ignore_index: int = 255, decode: Callable[[Path], np.ndarray] = read_index_png,
                 skip_bad: bool = False, name: str = "dataset"):
        if not pairs:
            raise DatasetError(f"{name}: the split has no samples")
        self.pairs, self.class_names, self.palette = list(pairs), tuple(class_names), np.asarray(palette, np.uint8)
        self.num_classes, self.ignore_index, self.decode, self.name = len(class_names), ignore_index, decode, name
        self.skipped: list[tuple[str, str]] = []
        if skip_bad:
            good = []
            for pair in self.pairs:
                try:
                    self._load(pair)
                    good.append(pair)
                except DatasetError as e:
                    self.skipped.append((str(pair[0]), str(e)))
            self.pairs = good
            if self.skipped:
                note("%s: skipped %d bad sample(s) of %d", name, len(self.skipped), len(good) + len(self.skipped))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._load(self.pairs[index])

    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image as displayed, read from the file headers only."""
        return [displayed_size(image_path) for image_path, _ in self.pairs]

    def fingerprint(self) -> str:
        """A digest of the split's file names, image and mask, in order: it changes when samples are added,
        removed or renamed."""
        names = "\n".join(f"{image.name}\t{mask.name}" for image, mask in self.pairs)
        return hashlib.sha1(names.encode()).hexdigest()

    def label_values(self) -> set[int]:
        """Every label value that occurs in the split's masks (reads each mask once, not the images)."""
        values: set[int] = set()
        for _, mask_path in tqdm(self.pairs, desc=f"{self.name}: checking masks", unit="mask", leave=False,
                                 disable=len(self.pairs) < 500):
            values.update(np.unique(self.decode(mask_path)).tolist())
        return values

    def _load(self, pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = pair
        image, label = read_image(image_path), self.decode(mask_path)
        if label.shape != image.shape[:2]:
            (mh, mw), (ih, iw) = label.shape, image.shape[:2]
            if (mh, mw) == (iw, ih):
                with open_image(image_path) as im:
                    rotated = _orientation(im) in SWAPS_SIDES
                if rotated:
                    raise DatasetError(
                        f"{mask_path}: mask is {mw}x{mh} (width x height), the size of {image_path.name} as stored, "
                        f"but the image's EXIF orientation turns it to {iw}x{ih} as displayed, and labels are drawn "
                        f"on what is displayed. Turn the mask to match, or store the image upright (e.g. "
                        f"`mogrify -auto-orient {image_path.name}`)")
            raise DatasetError(f"{mask_path}: mask is {mw}x{mh} but its image {image_path.name} is {iw}x{ih} "
                               f"(width x height); they must match")
        check_label(label, self.num_classes, self.ignore_index, str(mask_path))
        return image, label.astype(np.uint8)
