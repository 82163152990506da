"""The compiled training step: forward, loss, backward, optimizer update and BatchNorm statistics in one
program, partitioned over the mesh of :mod:`fcn_jax.devices` (replicated state, batch split over ``data``).
"""

from __future__ import annotations

import jax
from flax import nnx

from fcn_jax.data.normalization import normalize_on_device
from fcn_jax.models.paper import Upsampling


def _train_step(model, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, loss_fn,
                normalization: str | None = None, dropout_seed: int = 0, aux_weight: float = 0.0) -> jax.Array:
    if normalization is not None:
        images = normalize_on_device(images, normalization)
    key = jax.random.fold_in(jax.random.key(dropout_seed), optimizer.step[...])  # the paper's nets' dropout

    def compute_loss(model):
        extra = {"rngs": nnx.Rngs(dropout=key)} if model.takes_dropout_rngs else {}
        if not aux_weight:
            return loss_fn(model(images, **extra), labels)
        out, aux = model(images, aux=True, **extra)
        return loss_fn(out, labels) + aux_weight * loss_fn(aux, labels)

    loss, grads = nnx.value_and_grad(compute_loss, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    return loss


_STATIC = ("loss_fn", "normalization", "dropout_seed", "aux_weight")
_train_step_in_place = nnx.jit(_train_step, static_argnames=_STATIC, donate_argnames=("model", "optimizer"))
_train_step_new_buffers = nnx.jit(_train_step, static_argnames=_STATIC)


def jitted_train_step():
    """The ``nnx.jit`` function behind :func:`train_step` on the default backend (for ``.lower()``).

    On GPU and TPU it donates the model and optimizer state, so parameters are updated in place. On
    CPU it does not: XLA's CPU runtime runs independent operations concurrently, cannot prove that every
    read of a parameter (e.g. the transposed kernel of an input gradient) precedes its in-place update,
    and so copies every donated parameter first, which costs more than writing new buffers (default
    training run, FCNs-VGG11-BN on 16 x 64x64: 253 -> 237 ms per step on a 2-core CPU).
    """
    return _train_step_new_buffers if jax.default_backend() == "cpu" else _train_step_in_place


def train_step(model, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, loss_fn,
               normalization: str | None = None, dropout_seed: int = 0, aux_weight: float = 0.0) -> jax.Array:
    """One SGD step in train mode: forward, loss, backward, optimizer update and BatchNorm running
    statistics, all in one compiled program (see :func:`jitted_train_step`). Returns the loss (before
    the update), on the devices. ``images``: float network input, or uint8 RGB with ``normalization``
    (``"imagenet"`` or ``"reference"``: normalised inside the program, see :mod:`fcn_jax.data.normalization`).
    Models with dropout (the paper's) draw their masks from ``dropout_seed`` and the optimizer's step count.
    ``aux_weight`` > 0 (models built with an aux head): the loss is ``loss_fn(out) + aux_weight * loss_fn(aux)``."""
    return jitted_train_step()(model, optimizer, images, labels, loss_fn, normalization, dropout_seed, aux_weight)


def trainable(freeze_backbone: bool, learn_upsampling: bool = False):
    """The parameters the optimizer updates (and decays): all but the backbone's with ``freeze_backbone``, and
    never the paper nets' bilinear upsampling kernels (:class:`~fcn_jax.models.paper.Upsampling`) unless
    ``learn_upsampling``."""
    parts = [nnx.Param]
    if not learn_upsampling:
        parts.append(nnx.Not(Upsampling))
    if freeze_backbone:
        parts.append(nnx.Not(nnx.PathContains("backbone")))
    return nnx.All(*parts)

