"""What happens to a training batch between the input pipeline and the compiled step: it is placed on the
devices ahead of time, and normalised there.

Batches travel as uint8 pixels (4x less to copy between processes and to the devices than float32) and are
normalised inside the compiled step by a 256-entry table per channel, computed on the host with
:func:`fcn_jax.data.normalize` itself: a table lookup gives exactly the host's float32 values, where the
same formula compiled by XLA can differ in the last bit.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.data.pipeline import BGR_MODES, normalize
from fcn_jax.errors import ConfigError
from fcn_jax.sharding import shard_batch


def normalization_table(mode: str) -> np.ndarray:
    """float32 ``(256, 3)``: entry ``[v, c]`` is output channel ``c`` for a value ``v`` of that channel's
    source (the BGR modes take it from input channel ``2 - c``)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3))
    return normalize(np.ascontiguousarray(values), mode)[:, 0]


def normalize_on_device(images: jax.Array, mode: str) -> jax.Array:
    """uint8 RGB ``(..., H, W, 3)`` -> float32, bit-identical to :func:`fcn_jax.data.normalize` on the host
    (inside ``jit``; ``mode`` static)."""
    if mode in BGR_MODES:
        images = images[..., ::-1]
    return jnp.asarray(normalization_table(mode))[images.astype(jnp.int32), jnp.arange(3)]


def prefetch_to_devices(batches: Iterable[dict], mesh, depth: int = 2) -> Iterator[dict]:
    """The batches of ``batches`` (this process's share, numpy) as global arrays split over the mesh, with
    the next ``depth`` already on their way to the devices while the caller works on the current one (the
    copies are asynchronous: placing a batch does not wait for it to arrive)."""
    if depth < 1:
        raise ConfigError(f"--device-prefetch must be >= 1, got {depth}")
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(shard_batch(batch, mesh))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
