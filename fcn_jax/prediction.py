"""Prediction: images of any size -> class-index masks (``fcn_jax.predict``), and ``fcn-jax predict``,
which writes colour-coded masks, overlays, index PNGs and logits for files, folders and globs."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from fcn_jax.data.files import read_image
from fcn_jax.data.folder import IMAGE_SUFFIXES
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.drawing import blend, colorize, picture, voc_palette
from fcn_jax.errors import ConfigError, DatasetError, InputError
from fcn_jax.modes import in_mode
from fcn_jax.runs import resolve_weights
from fcn_jax.sharding import device_batch_size, make_mesh, replicate_state, shard_batch
from fcn_jax.weights import load_model, read_weights_config


class _Images:
    """A list of images seen as a dataset without labels (for EvalBatches)."""

    ignore_index = 255

    def __init__(self, images: Sequence[np.ndarray]):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], np.zeros(self.images[i].shape[:2], np.uint8)

    def image_sizes(self):
        return [im.shape[:2] for im in self.images]


@nnx.jit
def _logits(model, images):
    return model(images)


def predict(model, images, *, normalization: str = "imagenet", batch_size: int = 0, logits: bool = False,
            progress: bool = False) -> list[np.ndarray]:
    """Class-index masks ``(H, W)`` uint8 (or float32 logits ``(H, W, C)`` with ``logits=True``) for
    ``images``: one uint8 RGB ``(H, W, 3)`` array or a sequence of them, of any sizes. Batched by size
    bucket over all local devices, in eval mode; the model's state is replicated over the devices and its
    mode left as it was."""
    if jax.process_count() > 1:
        raise ConfigError("predict runs on one host; use evaluate for multi-host runs")
    single = isinstance(images, np.ndarray) and images.ndim == 3
    images = [images] if single else list(images)
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise InputError(f"image {i}: expected uint8 RGB (H, W, 3), got {im.dtype} {im.shape}")
    batch_size = device_batch_size(batch_size)
    mesh = make_mesh()
    replicate_state(model, mesh)
    out: list[np.ndarray | None] = [None] * len(images)
    batches = EvalBatches(_Images(images), batch_size, normalization=normalization)
    with in_mode(model, train=False):
        for batch in tqdm(batches, unit="batch", desc="predict", disable=not progress):
            result = _logits(model, shard_batch({"image": batch["image"]}, mesh)["image"])
            result = np.asarray(result if logits else jnp.argmax(result, -1).astype(jnp.uint8))
            for row, i in enumerate(batch["index"]):
                if i >= 0:
                    h, w = images[i].shape[:2]
                    out[i] = result[row, :h, :w]
    return out[0] if single else out


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths."""
    paths = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise ConfigError(f"{item}: no file matches")
            paths += [p for p in matches if p.is_file()]
        elif Path(item).is_dir():
            paths += sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise ConfigError(f"{item}: no such file or folder")
    if not paths:
        raise ConfigError(f"no images found in {', '.join(inputs)}")
    return paths


def run_predict(weights: str, inputs: Sequence[str], output: str, *, overlay: bool = False, index_png: bool = False,
                save_logits: bool = False, normalization: str = "imagenet", batch_size: int = 0,
                skip_bad: bool = False, progress: bool = True) -> list[Path]:
    """Predict every input image; writes ``OUTPUT/NAME_mask.png`` (colours of the weights' dataset)
    and optionally ``NAME_overlay.png`` (with a legend), ``NAME_index.png`` and ``NAME_logits.npy``."""
    path, run = resolve_weights(weights)
    if run is not None:
        normalization = run.get("normalization", normalization)
    meta = read_weights_config(path)  # header only; load_model reads the tensors
    model = load_model(path)
    names = meta.get("class_names") or [f"class {i}" for i in range(model.num_classes)]
    palette = np.array(meta.get("palette") or voc_palette(model.num_classes), np.uint8)
    images, kept, skipped = [], [], []
    for p in expand_inputs(inputs):
        try:
            images.append(read_image(p))
            kept.append(p)
        except DatasetError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    results = predict(model, images, normalization=normalization, batch_size=batch_size, logits=save_logits,
                      progress=progress)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for p, image, result in zip(kept, images, results, strict=True):
        pred = result.argmax(-1).astype(np.uint8) if save_logits else result
        Image.fromarray(colorize(pred, palette)).save(out / f"{p.stem}_mask.png")
        if overlay:
            picture([("image", image), ("prediction", blend(image, pred, palette))], palette, names).save(
                out / f"{p.stem}_overlay.png")
        if index_png:
            Image.fromarray(pred, mode="L").save(out / f"{p.stem}_index.png")
        if save_logits:
            np.save(out / f"{p.stem}_logits.npy", result)
    print(f"wrote predictions of {len(kept)} image(s) to {out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return kept
