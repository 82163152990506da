"""Deterministic, resumable, per-process-sharded batches for segmentation.

Order: epoch ``e`` visits the samples in ``permutation(seed, e)``; global batch ``b`` is the slice
``[b*B, (b+1)*B)`` of it, and process ``p`` of ``P`` takes the ``p``-th ``B/P`` of that batch.
Augmentation draws from ``rng(seed, epoch, sample)``. So every batch depends only on
``(seed, epoch, b)``: the iterator's state is those two integers, saved with each checkpoint, and a
resumed run sees exactly the batches an uninterrupted one would, on any number of processes.

A dataset is any object with ``__len__``, ``__getitem__(i) -> (image uint8 (H, W, 3) RGB, label
(H, W) ints)``, ``num_classes``, ``class_names``, ``ignore_index`` and ``palette``. Every sample is checked
against that contract where it is read (:func:`check_sample`), the same in the main process and in workers:
float images are refused rather than guessed at (a [0, 1] float image taken as 0..255 would train on
near-constant inputs); convert them with ``(image * 255).round().astype(np.uint8)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

from fcn_jax.data.normalization import normalize
from fcn_jax.data.transforms import resize_pair, shorter_side_size
from fcn_jax.data.workers import SampleWorkers, default_workers, in_worker, worker_failure
from fcn_jax.errors import ConfigError, DatasetError, FcnJaxError


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random resizing, then a random crop to ``crop`` (padding at the bottom and right with zeros / the
    ignore label where the image is smaller), then a horizontal flip with probability 1/2.

    The resizing is either ``shorter=(MIN, MAX)``, torchvision's: the shorter side to a whole number of pixels
    drawn uniformly from [MIN, MAX], or ``scale=(MIN, MAX)``: both sides times a factor drawn from [MIN, MAX].
    Images bilinear (antialiased when shrinking), labels nearest (:mod:`fcn_jax.data.transforms`)."""

    crop: tuple[int, int] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    shorter: tuple[int, int] | None = None

    def __post_init__(self):
        if self.shorter is not None and tuple(self.scale) != (1.0, 1.0):
            raise ConfigError("resize by the shorter side or by a scale factor, not both (--resize-shorter, --scale)")
        if self.shorter is not None and not 0 < self.shorter[0] <= self.shorter[1]:
            raise ConfigError(f"the shorter side's range needs 0 < MIN <= MAX, got {self.shorter}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, ignore_index: int):
        h, w = label.shape
        if self.shorter is not None:
            image, label = resize_pair(image, label, shorter_side_size(h, w, int(rng.integers(self.shorter[0],
                                                                                          self.shorter[1] + 1))))
        elif self.scale != (1.0, 1.0):
            s = rng.uniform(*self.scale)
            image, label = resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))
        if self.crop is not None:
            ch, cw = self.crop
            h, w = label.shape
            if h < ch or w < cw:
                pad = ((0, max(ch - h, 0)), (0, max(cw - w, 0)))
                image = np.pad(image, (*pad, (0, 0)))
                label = np.pad(label, pad, constant_values=ignore_index)
                h, w = label.shape
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.hflip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return image, label


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    """A clear error for a label outside ``[0, num_classes)`` that is not the ignore label."""
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any() or (label < 0).any():
        values = sorted(set(np.unique(label[bad | (label < 0)]).tolist()))[:10]
        raise DatasetError(f"{where}: label values {values} are outside [0, {num_classes}) and not the ignore label "
                         f"{ignore_index}; check the mask files or the dataset's num_classes")


def check_sample(image, label, where: str) -> None:
    """A DatasetError naming the sample when ``(image, label)`` breaks the dataset contract (module doc)."""
    def problem() -> str | None:
        for name, value in (("image", image), ("label", label)):
            if not isinstance(value, np.ndarray):
                return f"{name} is a {type(value).__name__}; expected a numpy array"
        if image.dtype != np.uint8:
            return (f"image is {image.dtype}; expected uint8 RGB (H, W, 3), 0..255 (float images in [0, 1]: "
                    f"(image * 255).round().astype(np.uint8))")
        if image.ndim != 3 or image.shape[-1] != 3:
            return (f"image has shape {image.shape}; expected (H, W, 3) (grey images: "
                    f"np.repeat(image[..., None], 3, -1))")
        if label.dtype.kind not in "iu":
            return f"label is {label.dtype}; expected integers (class indices)"
        if label.shape != image.shape[:2]:
            return f"label has shape {label.shape}; expected {image.shape[:2]}, the image's height and width"
        return None

    found = problem()
    if found:
        raise DatasetError(f"{where}: {found}. Datasets return (image uint8 (H, W, 3) RGB, label integer (H, W))")


class _ReadByWorkers:
    """What Loader and EvalBatches share: their ``workers`` (:class:`~fcn_jax.data.workers.SampleWorkers`),
    stopped by :meth:`close` or by leaving a ``with`` block."""

    workers: SampleWorkers

    def close(self) -> None:
        self.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TrainBatch:
    """The worker task of :class:`Loader`: a list of ``(index, epoch)`` -> one batch of augmented, checked
    samples (``index`` None: a padding copy of sample 0 whose label is all ignored); labels keep the
    dataset's dtype until the main process (less to send)."""

    def __init__(self, dataset, seed: int, augment: Augment | None, normalization: str | None):
        self.dataset, self.seed, self.augment, self.normalization = dataset, seed, augment, normalization

    def __call__(self, items: list[tuple[int | None, int]]) -> dict:
        samples = [_named_failures(self._sample, index, epoch) for index, epoch in items]
        images = [image for image, _ in samples]
        try:
            image_batch = np.stack(images)
        except ValueError as e:
            raise DatasetError(f"samples of one batch differ in size ({', '.join(str(x.shape) for x in images)}); "
                               f"use a crop size or batch size 1") from e
        return {"image": image_batch, "label": np.stack([label for _, label in samples])}

    def _sample(self, index: int | None, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        ignore = self.dataset.ignore_index
        image, label = self.dataset[index if index is not None else 0]
        check_sample(image, label, f"sample {index or 0}")
        if self.augment is not None:
            image, label = self.augment(image, label, np.random.default_rng([self.seed, epoch, index or 0]), ignore)
        if index is None:
            label = np.full_like(label, ignore)
        check_label(label, self.dataset.num_classes, ignore, f"sample {index}")
        return (normalize(image, self.normalization) if self.normalization else image), label


def _named_failures(load, index, *args):
    """``load(index, *args)``; in a worker, a bug in the dataset becomes one line naming the sample (in the main
    process it keeps its traceback)."""
    try:
        return load(index, *args)
    except FcnJaxError:
        raise
    except Exception as e:
        if in_worker():
            raise worker_failure(f"sample {index}", e) from None
        raise


class Loader(_ReadByWorkers):
    """Batches ``{"image": (b, H, W, 3), "label": int32 (b, H, W)}`` of this process's share: ``image`` float32
    normalised as ``normalization`` says, or the uint8 RGB pixels with ``normalization=None`` (4x less to move;
    the training step normalises on the devices, to the same bits).

    ``global_batch_size`` must divide by ``process_count``. ``shuffle=False`` keeps dataset order
    (evaluation); ``drop_last`` drops the incomplete final batch (training); otherwise the last batch
    is padded with copies whose labels are all ``ignore_index``, so metrics are unaffected.

    Batches are loaded by ``workers`` processes (:mod:`fcn_jax.data.workers`; ``None``: one per spare core,
    ``0``: in this process), a batch per task, with ``max(prefetch, workers)`` batches in flight.
    The batches are the same for any number of workers. The dataset (and ``augment``) must be picklable for
    ``workers > 0``. :meth:`close` stops the workers; so does leaving a ``with`` block.
    """

    def __init__(self, dataset, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 augment: Augment | None = None, normalization: str | None = "imagenet", drop_last: bool = True,
                 process_index: int = 0, process_count: int = 1, workers: int | None = None, prefetch: int = 2):
        if global_batch_size % process_count:
            raise ConfigError(f"global batch size {global_batch_size} does not divide over {process_count} processes")
        if drop_last and len(dataset) < global_batch_size:
            raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch of {global_batch_size}")
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1 batch, got {prefetch}")
        if normalization is not None:
            normalize(np.zeros((1, 1, 3), np.uint8), normalization)  # an unknown name fails here, not in a worker
        self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.epoch, self.batch = 0, 0
        workers = default_workers() if workers is None else workers
        self.workers = SampleWorkers(_TrainBatch(dataset, seed, augment, normalization), workers)
        self.in_flight = max(prefetch, workers)  # batches

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.global_batch_size if self.drop_last else -(-n // self.global_batch_size)

    def state(self) -> dict:
        """Where the next batch comes from; :meth:`restore` it to resume exactly there."""
        return {"epoch": self.epoch, "batch": self.batch}

    def restore(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; then the state moves to the next epoch. The state counts a batch as
        consumed once it has been handed out."""
        order, epoch, first = self.order(self.epoch), self.epoch, self.batch
        tasks = ([(i, epoch) for i in self._local_indices(order, b)] for b in range(first, len(self)))
        with contextlib.closing(self.workers.in_order(tasks, self.in_flight)) as batches:
            for batch in batches:
                batch["label"] = batch["label"].astype(np.int32)
                self.batch += 1
                yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def _local_indices(self, order: np.ndarray, batch: int) -> list[int | None]:
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        idx = order[start:start + self.local_batch_size].tolist()
        return idx + [None] * (self.local_batch_size - len(idx))  # None: padding of a final batch


class EvalBatches(_ReadByWorkers):
    """Whole images for evaluation, batched by size bucket: each image is padded at the bottom/right
    to the next multiple of ``multiple`` (zeros; the ignore label in the mask), which is exactly the
    padding the FCN applies itself, so the logits of the real pixels are those of the whole image
    while XLA compiles one program per bucket. Batches hold ``global_batch_size`` images of one
    bucket (the last of a bucket padded with fully ignored copies); this process gets its share.
    Iterating yields ``{"image", "label", "index", "size"}`` (``index`` -1 for padding; ``size`` each image's own
    height and width, for networks that mask the padding out themselves) in a fixed order."""

    def __init__(self, dataset, global_batch_size: int, *, normalization: str = "imagenet", multiple: int = 32,
                 process_index: int = 0, process_count: int = 1, sizes: list[tuple[int, int]] | None = None,
                 workers: int | None = 0, prefetch: int = 2):
        """``sizes``: the (H, W) of every sample, by default ``dataset.image_sizes()``. ``workers`` and
        ``prefetch`` as for :class:`Loader` (default: read in this process)."""
        if global_batch_size % process_count:
            raise ConfigError(f"global batch size {global_batch_size} does not divide over {process_count} processes")
        self.dataset, self.multiple = dataset, multiple
        self.global_batch_size, self.local = global_batch_size, global_batch_size // process_count
        self.process_index = process_index
        sizes = sizes or dataset.image_sizes()
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            buckets.setdefault((-(-h // multiple) * multiple, -(-w // multiple) * multiple), []).append(i)
        self.batches = [(size, idx[s:s + global_batch_size]) for size, idx in sorted(buckets.items())
                        for s in range(0, len(idx), global_batch_size)]
        workers = default_workers() if workers is None else workers
        self.workers = SampleWorkers(_EvalBatch(dataset, normalization, self.local), workers)
        self.in_flight = max(prefetch, workers)  # batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        tasks = ((size, self._mine(indices)) for size, indices in self.batches)
        with contextlib.closing(self.workers.in_order(tasks, self.in_flight)) as batches:
            yield from batches

    def _mine(self, indices: list[int]) -> list[int]:
        """This process's rows of a global batch; -1 pads the last batch of a bucket."""
        mine = indices[self.process_index * self.local:(self.process_index + 1) * self.local]
        return mine + [-1] * (self.local - len(mine))


class _EvalBatch:
    """The worker task of :class:`EvalBatches`: ``((H, W), indices)`` -> the padded batch of those samples."""

    def __init__(self, dataset, normalization: str, rows: int):
        self.dataset, self.normalization, self.rows = dataset, normalization, rows

    def __call__(self, task: tuple[tuple[int, int], list[int]]) -> dict:
        (height, width), indices = task
        images = np.zeros((self.rows, height, width, 3), np.float32)  # zeros *after* normalising, as the FCN pads
        labels = np.full((self.rows, height, width), self.dataset.ignore_index, np.int32)
        sizes = np.zeros((self.rows, 2), np.int32)  # each image's own size (0 for padding rows)
        for row, i in enumerate(indices):
            if i >= 0:
                image, label = _named_failures(self.dataset.__getitem__, i)
                check_sample(image, label, f"sample {i}")
                images[row, :image.shape[0], :image.shape[1]] = normalize(image, self.normalization)
                labels[row, :label.shape[0], :label.shape[1]] = label
                sizes[row] = image.shape[:2]
        return {"image": images, "label": labels, "index": np.array(indices, np.int32), "size": sizes}
