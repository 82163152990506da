"""Input normalisation, in one place: uint8 RGB pixels -> the float32 input a network's weights expect.

:func:`normalize` runs on the host (numpy). Training sends uint8 batches (4x less to copy between processes
and to the devices) and normalises inside the compiled step with :func:`normalize_on_device`: a 256-entry
table per channel, computed on the host with :func:`normalize` itself, so that a table lookup gives exactly
the host's float32 values where the same formula compiled by XLA can differ in the last bit. Exported graphs
(``--with-preprocessing``) use the same table.
"""

from __future__ import annotations

import numpy as np

from fcn_jax.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE_BGR_MEAN = (103.939, 116.779, 123.68)  # the reference's BGR means, in 0..255
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # the paper's Caffe models' BGR means, in 0..255
BGR_MODES = ("reference", "caffe")  # the modes that reverse the channels


def normalize(images: np.ndarray, mode: str = "imagenet") -> np.ndarray:
    """uint8 RGB ``(..., H, W, 3)`` -> float32 network input.

    ``imagenet``: RGB / 255, minus mean, divided by std (what torchvision's VGG weights expect).
    ``reference``: the reference's BGR order, / 255, minus its BGR means / 255, no std division.
    ``caffe``: BGR order, 0..255, minus the BGR means of the paper's Caffe models (their published weights)."""
    if mode == "caffe":
        return images[..., ::-1].astype(np.float32) - np.array(CAFFE_BGR_MEAN, np.float32)
    x = images.astype(np.float32) / 255.0
    if mode == "imagenet":
        return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    if mode == "reference":
        return x[..., ::-1] - np.array(REFERENCE_BGR_MEAN, np.float32) / 255.0
    raise ConfigError(f"unknown normalisation {mode!r}; choose imagenet, reference or caffe")


def normalization_table(mode: str) -> np.ndarray:
    """float32 ``(256, 3)``: entry ``[v, c]`` is output channel ``c`` for a value ``v`` of that channel's
    source (the BGR modes take it from input channel ``2 - c``)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3))
    return normalize(np.ascontiguousarray(values), mode)[:, 0]


def normalize_on_device(images, mode: str):
    """uint8 RGB ``(..., H, W, 3)`` -> float32, bit-identical to :func:`fcn_jax.data.normalize` on the host
    (inside ``jit``; ``mode`` static)."""
    import jax.numpy as jnp  # here, not at the top: data workers start without JAX

    if mode in BGR_MODES:
        images = images[..., ::-1]
    return jnp.asarray(normalization_table(mode))[images.astype(jnp.int32), jnp.arange(3)]
