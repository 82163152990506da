"""The compiled training and evaluation steps, and how their inputs are placed on devices.

One program for 1 device, N devices or many hosts: a 1-D mesh with axis ``data`` over every device
of every process; parameters, BatchNorm statistics and optimizer state are replicated
(``P()``), each batch is split over ``data`` (``P("data")``). ``jax.jit`` (through ``nnx.jit``)
partitions the step; BatchNorm's means over the batch axis become means over the *global* batch
(PyTorch's SyncBatchNorm) with no code change. ``jax.pmap`` is not used: it is in maintenance mode
and wraps ``jit(shard_map)`` anyway, and it would make per-device BatchNorm the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fcn_jax.metrics import confusion_matrix

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


def _train_step(model, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, loss_fn) -> jax.Array:
    def compute_loss(model):
        return loss_fn(model(images), labels)

    loss, grads = nnx.value_and_grad(compute_loss, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    return loss


_train_step_in_place = nnx.jit(_train_step, static_argnames=("loss_fn",), donate_argnames=("model", "optimizer"))
_train_step_new_buffers = nnx.jit(_train_step, static_argnames=("loss_fn",))


def jitted_train_step():
    """The ``nnx.jit`` function behind :func:`train_step` on the default backend (for ``.lower()``).

    On GPU and TPU it donates the model and optimizer state, so parameters are updated in place. On
    CPU it does not: XLA's CPU runtime runs independent operations concurrently, cannot prove that every
    read of a parameter (e.g. the transposed kernel of an input gradient) precedes its in-place update,
    and so copies every donated parameter first, which costs more than writing new buffers (default
    training run, FCNs-VGG11-BN on 16 x 64x64: 253 -> 237 ms per step on a 2-core CPU).
    """
    return _train_step_new_buffers if jax.default_backend() == "cpu" else _train_step_in_place


def train_step(model, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, loss_fn) -> jax.Array:
    """One SGD step in train mode: forward, loss, backward, optimizer update and BatchNorm running
    statistics, all in one compiled program (see :func:`jitted_train_step`). Returns the loss (before
    the update)."""
    return jitted_train_step()(model, optimizer, images, labels, loss_fn)


@nnx.jit(static_argnames=("num_classes", "ignore_index"))
def eval_step(model, images: jax.Array, labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """The confusion matrix of one batch (the model should be in eval mode)."""
    return confusion_matrix(model(images), labels, num_classes, ignore_index)


def trainable(freeze_backbone: bool):
    """The parameters the optimizer updates: all, or all but the backbone's."""
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone"))) if freeze_backbone else nnx.Param


def evaluate(model, loader, mesh, num_classes: int, ignore_index: int, progress=None) -> np.ndarray:
    """The confusion matrix over one pass of ``loader`` (e.g. ``EvalBatches``), accumulated on device."""
    model.eval()
    conf = jnp.zeros((num_classes, num_classes), jnp.int32)
    for batch in loader:
        batch = shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        conf = conf + eval_step(model, batch["image"], batch["label"], num_classes, ignore_index)
        if progress is not None:
            progress.update(1)
    model.train()
    return np.asarray(conf.addressable_data(0))  # replicated: every process holds the whole matrix
