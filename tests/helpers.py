"""Test helpers over fcn_jax.pytorch.parity: the twins the library itself builds and its one relative error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fcn_jax.models import compiled_forward as forward  # noqa: F401 (the tests' compiled model(images))


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x, dtype=np.float64).transpose(0, 3, 1, 2)


def assert_close(out, ref, rtol, what=""):
    """max |out - ref| <= rtol * max |ref| (the fidelity tests' criterion)."""
    from fcn_jax.pytorch.parity import relative_error

    d = relative_error(out, ref, name=what)
    assert d.relative <= rtol, f"{what}: max abs error {d.max_abs:.3e} > {rtol:g} x max |ref| {d.max_ref:.3e}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a run folder's checkpoints, in order."""
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_weights(a: Path, b: Path) -> None:
    """Two fcn-jax weights files hold the same tensors, bit for bit."""
    from safetensors.numpy import load_file

    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# fc6/fc7 of the paper's nets in most tests: 4096 wide as published (fc6 alone: 103M weights), but neither the
# heads nor the exported graphs depend on the width; the full width is checked by the published layout, the
# heatmap and the trunk tests.
NARROW = 64


def cpu_env(devices: int = 1) -> dict:
    """The environment of an fcn-jax subprocess on ``devices`` CPU devices: this repository importable, the flags
    the test run has kept in XLA_FLAGS (device counts are read when JAX starts, so each count needs a process).
    One device is JAX's default on CPU: no flag then, so that the subprocess's compilation-cache keys (which
    include XLA_FLAGS) are the test process's own, and it loads the programs the tests compiled before it."""
    import os

    root = Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "")
    if devices != 1:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def torch_fcn(arch, num_classes=5, backbone="vgg11", batch_norm=False, seed=0, double=False):
    """The reference FCN with random weights and BatchNorm parameters/statistics moved off defaults."""
    from fcn_jax.pytorch.parity import random_reference

    return random_reference(arch, num_classes, backbone, batch_norm, seed, double=double)


def jax_twin(torch_model, arch, dtype=None):
    """Our model with the torch model's weights (through the converter under test)."""
    import jax.numpy as jnp

    from fcn_jax.pytorch import parity

    return parity.jax_twin(torch_model, arch, dtype=dtype or jnp.float32)


class TinyDataset:
    """Picklable samples for worker-process tests: sample ``i`` is filled with ``i``; ``fail_at`` raises a
    ValueError there, ``exit_at`` kills the process that loads it."""

    num_classes, class_names, ignore_index = 3, ("a", "b", "c"), 255
    palette = np.zeros((3, 3), np.uint8)

    def __init__(self, n=24, size=8, fail_at=None, exit_at=None):
        self.n, self.size, self.fail_at, self.exit_at = n, size, fail_at, exit_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise ValueError(f"cannot decode sample {i}")
        if i == self.exit_at:
            import os

            os._exit(3)
        image = np.full((self.size, self.size, 3), i % 256, np.uint8)
        return image, np.full((self.size, self.size), i % 3, np.uint8)

    def image_sizes(self):
        return [(self.size, self.size)] * self.n


def jpg(path: Path, h=20, w=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(path)


def palette_png(path: Path, mask: np.ndarray):
    from fcn_jax.data.palettes import voc_palette

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette().ravel().tolist())
    im.save(path)


def label(seed, h=20, w=30, classes=21):
    mask = np.random.default_rng(seed).integers(0, classes, (h, w))
    mask[0] = 255  # a void border row
    return mask


def make_voc_tree(tmp_path):
    """A tiny VOC2012 + SBD + VOC2011 tree (20x30 images): ``(root, labels by name)``."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    labels = {}
    for i, name in enumerate(["a", "b", "c"]):
        jpg(voc / "JPEGImages" / f"{name}.jpg", seed=i)
        labels[name] = label(i)
        palette_png(voc / "SegmentationClass" / f"{name}.png", labels[name])
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("a\nb\n")
    (seg / "val.txt").write_text("c\n")
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    from scipy.io import savemat

    for i, name in enumerate(["b", "d"], start=10):
        jpg(sbd / "img" / f"{name}.jpg", seed=i)
        labels[f"sbd_{name}"] = np.random.default_rng(i).integers(0, 21, (20, 30))
        (sbd / "cls").mkdir(parents=True, exist_ok=True)
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": labels[f"sbd_{name}"].astype(np.uint8),
                                                        "CategoriesPresent": np.array([1])}})
    (sbd / "train.txt").write_text("d\nc\n")
    (sbd / "val.txt").write_text("b\n")
    v11 = tmp_path / "VOCdevkit" / "VOC2011" / "ImageSets" / "Segmentation"
    v11.mkdir(parents=True)
    (v11 / "val.txt").write_text("a\nc\nd\n")
    return tmp_path, labels
