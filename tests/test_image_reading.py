"""Images are read as they are displayed and masks as they are meant: EXIF orientation applied everywhere,
16-bit greyscale scaled instead of saturated, binary 0/255 masks and duplicate class names stopped with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcn_jax
from fcn_jax.data import get_dataset
from fcn_jax.data.files import read_image
from fcn_jax.errors import DatasetError
from fcn_jax.training.config import resolve_config
from fcn_jax.training.run import train

ROTATE_90_CW = 6  # EXIF orientation: stored image must be turned 90 degrees clockwise to display it


def _phone_photo(path: Path, stored: np.ndarray, orientation: int = ROTATE_90_CW) -> None:
    """A JPEG saved as ``stored`` pixels with an EXIF orientation tag, as phone cameras write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=100)


def _stored(h=64, w=96) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = 250  # left half bright in storage order: the top half once displayed
    return image


def test_exif_orientation_is_applied_when_reading(tmp_path):
    _phone_photo(tmp_path / "photo.jpg", _stored())
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == (96, 64, 3)  # displayed: 64 wide, 96 high
    assert image[:40].mean() > 200 and image[56:].mean() < 50  # the bright half is on top


def _folder(root: Path, classes: str, masks: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    for name, mask in masks.items():
        (root / "masks" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / "train" / f"{name}.png")
        image = (images or {}).get(name)
        if image is None:
            (root / "images" / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((*mask.shape, 3), 90, np.uint8)).save(root / "images" / "train" / f"{name}.png")
        else:
            _phone_photo(root / "images" / "train" / f"{name}.jpg", image)
    return root


def test_a_dataset_pairs_labels_with_displayed_pixels(tmp_path):
    displayed_mask = np.zeros((96, 64), np.uint8)
    displayed_mask[:48] = 1  # drawn on the displayed image: the bright top half is class 1
    root = _folder(tmp_path, "dark\nbright\n", {"p": displayed_mask}, {"p": _stored()})
    ds = get_dataset("folder", "train", data_dir=str(root))
    assert ds.image_sizes() == [(96, 64)]
    image, label = ds[0]
    assert image.shape[:2] == label.shape == (96, 64)
    assert image[label == 1].mean() > 200 and image[label == 0].mean() < 50


def test_a_mask_drawn_on_the_stored_pixels_is_an_error_with_the_fix(tmp_path):
    root = _folder(tmp_path, "dark\nbright\n", {"p": np.zeros((64, 96), np.uint8)}, {"p": _stored()})
    with pytest.raises(DatasetError, match=r"p.png: mask is 96x64 .* EXIF orientation .* 64x96 as displayed"):
        get_dataset("folder", "train", data_dir=str(root))[0]


@pytest.mark.slow
def test_predict_masks_have_the_displayed_size(tmp_path):
    _phone_photo(tmp_path / "in" / "photo.jpg", _stored())
    model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11")
    fcn_jax.save_weights(model, tmp_path / "w.safetensors")
    from fcn_jax.cli import main

    assert main(["predict", str(tmp_path / "w.safetensors"), str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--index-png", "--no-progress"]) == 0
    assert Image.open(tmp_path / "out" / "photo_index.png").size == (64, 96)


def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path):
    grey = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert (image == 255).mean() < 0.01
    np.testing.assert_allclose(image[..., 0], grey / 257, atol=1)


def test_binary_masks_of_0_and_255_stop_training_with_the_fix(tmp_path):
    masks = {f"m{i}": np.where(np.random.default_rng(i).random((32, 32)) > 0.5, 255, 0) for i in range(4)}
    root = _folder(tmp_path / "data", "background\nobject\n", masks)
    config = resolve_config(dataset="folder", data_dir=str(root), val_split="train", batch_size=2, epochs=1,
                            workers=1, overlays=0, run_dir=str(tmp_path / "run"))
    with pytest.raises(DatasetError, match=r"train split's masks hold only class 0 \('background'\) and 255, the "
                                           r"ignore label.*remap"):
        train(config, progress=False)


def test_duplicate_class_names_are_an_error(tmp_path):
    root = _folder(tmp_path, "background\ncar\nroad\ncar\nsky\n", {"a": np.zeros((8, 8))})
    with pytest.raises(DatasetError, match=r"classes.txt names 'car' twice \(lines 2 and 4\)"):
        get_dataset("folder", "train", data_dir=str(root))
