"""Where arrays live: one device mesh for 1 device, N devices or many hosts.

A 1-D mesh with axis ``data`` over every device of every process. Parameters, BatchNorm statistics and
optimizer state are replicated (``P()``); each batch is split over ``data`` (``P("data")``). ``jax.jit``
(through ``nnx.jit``) partitions the programs; BatchNorm's means over the batch axis become means over
the *global* batch (PyTorch's SyncBatchNorm) with no code change. ``jax.pmap`` is not used: it is in
maintenance mode and wraps ``jit(shard_map)`` anyway, and it would make per-device BatchNorm the default.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fcn_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """The first ``num_devices`` (default: all devices of all processes) on the ``data`` axis.
    ``Auto`` axis types let XLA propagate the shardings (jax.make_mesh defaults to Explicit, under
    which e.g. the confusion matrix's scatter would need annotations)."""
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def device_batch_size(requested: int = 0) -> int:
    """The smallest multiple of the device count that holds ``requested`` images (0: one per device)."""
    devices = jax.device_count()
    return max(devices, -(-(requested or devices) // devices) * devices)


def replicate(tree, mesh):
    """Place every array of ``tree`` (identical on all processes) on all devices."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def replicate_state(objects, mesh) -> None:
    """Replicate the state of NNX objects (model, optimizer) in place."""
    nnx.update(objects, replicate(nnx.state(objects), mesh))


def shard_batch(batch: dict, mesh) -> dict:
    """This process's part of the global batch -> global arrays split over ``data``."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _local(x):
    """A replicated array's copy on this process: on multi-host runs the global array is not fully addressable,
    but each process holds a complete copy."""
    return x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x


def host_array(x) -> np.ndarray:
    """A replicated (or single-device) array as numpy, on any number of hosts."""
    return np.asarray(_local(x))


def host_tree(tree):
    """Every replicated array of ``tree`` on the host, in one device-to-host transfer."""
    return jax.device_get(jax.tree.map(_local, tree))


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
