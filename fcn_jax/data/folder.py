"""A generic layout: a folder of images and a folder of index masks with matching stems.

Under ``--data-dir``:

    classes.txt                       one class name per line, in index order
    images/{train,val,...}/NAME.jpg   (or .png, .jpeg, .bmp, .tif)
    masks/{train,val,...}/NAME.png    class indices (palette or greyscale PNG), 255 = ignore
"""

from __future__ import annotations

from pathlib import Path

from fcn_jax.data.files import SegmentationFiles
from fcn_jax.data.palettes import voc_palette
from fcn_jax.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def folder_dataset(root: str | Path, split: str, *, skip_bad: bool = False) -> SegmentationFiles:
    root = Path(root)
    names_file, images, masks = root / "classes.txt", root / "images" / split, root / "masks" / split
    if not names_file.is_file() or not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root}: expected classes.txt, images/{split}/ and masks/{split}/ (index PNGs named like "
                           f"the images)")
    names = _class_names(names_file)
    pairs, orphans = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks / f"{image.stem}.png"
        (pairs if mask.is_file() else orphans).append((image, mask))
    if orphans and not skip_bad:
        raise DatasetError(f"{orphans[0][0]}: no mask {orphans[0][1]} ({len(orphans)} image(s) without a mask); add "
                           f"the masks or pass --skip-bad-samples")
    dataset = SegmentationFiles(pairs, class_names=names, palette=voc_palette(len(names)), skip_bad=skip_bad,
                                name=f"{root.name} {split}")
    dataset.skipped += [(str(image), "no mask") for image, _ in orphans]
    return dataset


def _class_names(path: Path) -> list[str]:
    """One name per non-empty line; a name given twice would make two classes that cannot be told apart."""
    lines = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            name = line.strip()
            if name in lines:
                raise DatasetError(f"{path} names {name!r} twice (lines {lines[name]} and {number}); every class "
                                   f"needs a name of its own")
            lines[name] = number
    return list(lines)
