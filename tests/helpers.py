"""Test helpers over fcn_jax.pytorch.parity: the twins the library itself builds and its one relative error."""

from __future__ import annotations

import numpy as np


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x, dtype=np.float64).transpose(0, 3, 1, 2)


def assert_close(out, ref, rtol, what=""):
    """max |out - ref| <= rtol * max |ref| (the fidelity tests' criterion)."""
    from fcn_jax.pytorch.parity import relative_error

    d = relative_error(out, ref, name=what)
    assert d.relative <= rtol, f"{what}: max abs error {d.max_abs:.3e} > {rtol:g} x max |ref| {d.max_ref:.3e}"


# fc6/fc7 of the paper's nets in most tests: 4096 wide as published (fc6 alone: 103M weights), but neither the
# heads nor the exported graphs depend on the width; the full width is checked by the published layout, the
# heatmap and the trunk tests.
NARROW = 64


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
