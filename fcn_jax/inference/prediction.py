"""Prediction: images of any size -> class-index masks (``fcn_jax.predict``), and ``fcn-jax predict``,
which writes colour-coded masks, overlays, index PNGs and logits for files, folders and globs."""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from tqdm.auto import tqdm

from fcn_jax.atomic_files import refuse_overwriting
from fcn_jax.data.files import read_image
from fcn_jax.data.folder import IMAGE_SUFFIXES
from fcn_jax.data.palettes import voc_palette
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.data.workers import SampleWorkers, default_workers
from fcn_jax.devices import DATA_AXIS, device_batch_size, make_mesh, replicate_state, shard_batch
from fcn_jax.errors import ConfigError, DatasetError, InputError
from fcn_jax.inference.drawing import blend, colorize, picture
from fcn_jax.inference.runs import input_normalization, resolve_weights
from fcn_jax.models import compiled_forward
from fcn_jax.models.modes import in_mode
from fcn_jax.weights.native import load_model, read_weights_config


def _read_image_or_error(path: Path) -> tuple[np.ndarray | None, str | None]:
    """A worker task of ``run_predict``: the image, or why it cannot be read."""
    try:
        return read_image(path), None
    except DatasetError as e:
        return None, str(e)


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


def available_memory() -> int | None:
    """Bytes the model's device can still give: an accelerator's free memory, or on CPU the host's available
    memory (and the room left under a cgroup limit, as in containers); None where it cannot be told."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None
    room = []
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as info:
        room.append(1024 * int(next(line for line in info if line.startswith("MemAvailable")).split()[1]))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return min(room) if room else None


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` with its longer side brought down to ``max_side`` (bilinear), or as it is."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.BILINEAR))


def _compile_buckets(model, batches: EvalBatches, mesh) -> dict:
    """One compiled forward pass per size bucket (what jit would compile on the way), keyed by batch shape."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    shapes = {(batches.global_batch_size, bh, bw, 3) for (bh, bw), _ in batches.batches}
    return {shape: compiled_forward.lower(model, jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
                                  jax.ShapeDtypeStruct((shape[0], 2), jnp.int32, sharding=sharding)).compile()
            for shape in sorted(shapes)}


def _check_memory(programs: dict, batches: EvalBatches, images: list[np.ndarray], names: Sequence[str]) -> None:
    """Refuse, before any work, a bucket whose program needs more memory than the device has left: XLA's
    own count of its working memory, outputs (beyond the model state it returns) and the input batch."""
    room = available_memory()
    if room is None:
        return
    for (bh, bw), indices in batches.batches:
        shape = (batches.global_batch_size, bh, bw, 3)
        use = programs[shape].memory_analysis()
        need = (use.temp_size_in_bytes + max(use.output_size_in_bytes - use.argument_size_in_bytes, 0)
                + int(np.prod(shape)) * 4)
        if need > room:
            i = max(indices, key=lambda k: images[k].shape[0] * images[k].shape[1])
            h, w = images[i].shape[:2]
            fits = max(32, int(max(h, w) * (0.9 * room / need) ** 0.5) // 32 * 32)
            raise InputError(f"{names[i]} ({w}x{h}) needs about {need / 2**30:.1f} GiB to predict at this size, but "
                             f"{room / 2**30:.1f} GiB is available: pass --max-side {fits} (max_side={fits} in Python) "
                             f"to predict it smaller and scale the mask back, or use a machine with more memory")


def predict(model, images, *, normalization: str = "imagenet", batch_size: int = 0, logits: bool = False,
            max_side: int | None = None, names: Sequence[str] | None = None,
            progress: bool = False) -> list[np.ndarray]:
    """Class-index masks ``(H, W)`` uint8 (or float32 logits ``(H, W, C)`` with ``logits=True``) for
    ``images``: one uint8 RGB ``(H, W, 3)`` array or a sequence of them, of any sizes. Batched by size
    bucket over all local devices, in eval mode; the model's state is replicated over the devices and its
    mode left as it was.

    ``max_side``: images with a longer side are predicted at that size and their results scaled back to
    the image (nearest for masks, bilinear for logits). A size bucket that needs more memory than the device
    has left is refused before any work, with the ``max_side`` that fits; ``names`` label the images in it."""
    if jax.process_count() > 1:
        raise ConfigError("predict runs on one host; use evaluate for multi-host runs")
    if not getattr(model, "segmenter", False):  # a Segmenter that gives per-pixel logits
        raise ConfigError(f"predict segments images; a {type(model).__name__} model is not a segmenter (the heatmap "
                          f"model gives ImageNet class maps: call it on the images)")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"--max-side must be >= 1, got {max_side}")
    single = isinstance(images, np.ndarray) and images.ndim == 3
    images = [images] if single else list(images)
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise InputError(f"image {i}: expected uint8 RGB (H, W, 3), got {im.dtype} {im.shape}")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    batch_size = device_batch_size(batch_size)
    mesh = make_mesh()
    replicate_state(model, mesh)
    out: list[np.ndarray | None] = [None] * len(images)
    inputs = [_fit(image, max_side) for image in images]
    batches = EvalBatches(_Images(inputs), batch_size, normalization=normalization, multiple=model.size_multiple)
    with in_mode(model, train=False):
        programs = _compile_buckets(model, batches, mesh)
        _check_memory(programs, batches, inputs, names)
        for batch in tqdm(batches, unit="batch", desc="predict", disable=not progress):
            placed = shard_batch({"image": batch["image"], "size": batch["size"]}, mesh)
            result = programs[batch["image"].shape](model, placed["image"], placed["size"])
            result = np.asarray(result if logits else jnp.argmax(result, -1).astype(jnp.uint8))
            for row, i in enumerate(batch["index"]):
                if i >= 0:
                    h, w = inputs[i].shape[:2]
                    out[i] = _scale_back(result[row, :h, :w], images[i].shape[:2])
    return out[0] if single else out


def _scale_back(result: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask (nearest) or logits (bilinear) of a reduced image brought back to the image's ``size``."""
    if result.shape[:2] == tuple(size):
        return result
    if result.ndim == 2:
        return np.asarray(Image.fromarray(result).resize(size[::-1], Image.NEAREST))
    return np.asarray(jax.image.resize(result, (*size, result.shape[-1]), "linear"))


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


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct name for each input's outputs: its stem where that is unique, else its parent folders and
    stem (``a/x.png`` -> ``a_x``), with the extension where that is what tells two apart (``b_x.png``)."""
    levels = [(0, False)] + [(k, ext) for k in range(1, max(len(p.parts) for p in paths)) for ext in (False, True)]

    def name(p: Path, level: int) -> str:
        depth, ext = levels[min(level, len(levels) - 1)]
        return "_".join([*p.parts[len(p.parts) - 1 - depth:-1], p.name if ext else p.stem])

    level = [0] * len(paths)
    while True:
        names = [name(p.resolve(), lv) for p, lv in zip(paths, level, strict=True)]
        taken = {n for n in names if names.count(n) > 1}
        if not taken:
            return names
        level = [lv + (n in taken) for n, lv in zip(names, level, strict=True)]


def run_predict(weights: str, inputs: Sequence[str], output: str, *, overlay: bool = False, index_png: bool = False,
                save_logits: bool = False, normalization: str | None = None, batch_size: int = 0,
                max_side: int | None = None, skip_bad: bool = False, workers: int | None = None,
                progress: bool = True) -> list[Path]:
    """Predict every input image; writes ``OUTPUT/NAME_mask.png`` (colours of the weights' dataset) and
    optionally ``NAME_overlay.png`` (with a legend), ``NAME_index.png`` and ``NAME_logits.npy``, NAME being
    :func:`output_names`'. The output folder and the inputs are checked before the model is loaded."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a folder for the predictions (it is created if missing)")
    paths = expand_inputs(inputs)
    path, run = resolve_weights(weights)
    suffixes = ["_mask.png", *["_overlay.png"] * overlay, *["_index.png"] * index_png, *["_logits.npy"] * save_logits]
    refuse_overwriting([("an output", out / f"{stem}{suffix}") for stem in output_names(paths) for suffix in suffixes],
                       [("the weights", path), *[("the input", p) for p in paths]])
    out.mkdir(parents=True, exist_ok=True)
    meta = read_weights_config(path)  # header only; load_model reads the tensors
    normalization = input_normalization(normalization, run, meta)
    model = load_model(path)
    names = meta.get("class_names") or [f"class {i}" for i in range(model.num_classes)]
    palette = np.array(meta.get("palette") or voc_palette(model.num_classes), np.uint8)
    images, kept, skipped = [], [], []
    with SampleWorkers(_read_image_or_error, default_workers() if workers is None else workers) as readers:
        for p, read in [(p, readers.submit(p)) for p in paths]:  # all at once: predict holds every image anyway
            image, error = read.result()
            if error is not None and not skip_bad:
                raise DatasetError(error)
            if error is not None:
                skipped.append(error)
            else:
                images.append(image)
                kept.append(p)
    results = predict(model, images, normalization=normalization, batch_size=batch_size, logits=save_logits,
                      max_side=max_side, names=[str(p) for p in kept], progress=progress)
    for stem, image, result in zip(output_names(kept), images, results, strict=True):
        pred = result.argmax(-1).astype(np.uint8) if save_logits else result
        Image.fromarray(colorize(pred, palette)).save(out / f"{stem}_mask.png")
        if overlay:
            picture([("image", image), ("prediction", blend(image, pred, palette))], palette, names).save(
                out / f"{stem}_overlay.png")
        if index_png:
            Image.fromarray(pred, mode="L").save(out / f"{stem}_index.png")
        if save_logits:
            np.save(out / f"{stem}_logits.npy", result)
    print(f"wrote predictions of {len(kept)} image(s) to {out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    return kept
