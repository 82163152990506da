"""Test helpers: the PyTorch reference with randomised BatchNorm, its JAX twin, and comparisons."""

from __future__ import annotations

import numpy as np

import fcn_jax


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x, dtype=np.float64).transpose(0, 3, 1, 2)


def assert_close(out, ref, rtol, what=""):
    """max |out - ref| <= rtol * max |ref| (the fidelity tests' criterion)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    err, scale = np.abs(out - ref).max(), np.abs(ref).max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x max |ref| {scale:.3e}"


def torch_fcn(arch, num_classes=5, backbone="vgg11", batch_norm=False, seed=0, double=False):
    """The reference FCN with random weights and BatchNorm parameters/statistics moved off defaults."""
    import torch

    from fcn_jax.reference import build_torch_model, randomize_batchnorm_

    torch.manual_seed(seed)
    model = randomize_batchnorm_(build_torch_model(arch, num_classes, backbone, batch_norm), seed)
    return model.double() if double else model


def jax_twin(torch_model, arch, num_classes=5, backbone="vgg11", batch_norm=False, dtype=None):
    """Our model with the torch model's weights (through the converter under test)."""
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    model = fcn_jax.create_model(arch, num_classes=num_classes, backbone=backbone, batch_norm=batch_norm,
                                 dtype=dtype, param_dtype=dtype)
    fcn_jax.load_torch_state_dict(model, torch_model.state_dict())
    return model
