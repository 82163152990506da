"""Per-pixel segmentation losses on NHWC logits, matching their PyTorch counterparts.

- ``cross_entropy``: the FCN paper's softmax cross-entropy, ignore label excluded, mean over valid
  pixels (with class weights: torch's weighted mean ``sum w_y nll / sum w_y``).
- ``cross_entropy_sum``: the same terms summed over the batch's valid pixels instead of averaged (the paper's
  Caffe training; its learning rates, e.g. 1e-10, belong to this form).
- ``bce``: the reference's ``BCEWithLogitsLoss`` on one-hot targets, mean over pixels x classes;
  ignored pixels are left out (the reference has none). Class weights scale each class's term.

Both compute in at least float32, whatever the model's compute dtype. A batch with no valid pixel
gives 0, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fcn_jax.choices import LOSSES
from fcn_jax.errors import ConfigError


def _prepare(logits, labels, ignore_index, class_weights):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    weights = None if class_weights is None else jnp.asarray(class_weights, logits.dtype)
    return logits, valid, safe, weights


def _weighted_nll(logits, labels, ignore_index, class_weights) -> tuple[jax.Array, jax.Array]:
    """Per-pixel negative log-likelihood and weight (0 for ignored pixels)."""
    logits, valid, safe, weights = _prepare(logits, labels, ignore_index, class_weights)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
    return nll, valid.astype(logits.dtype) * (1.0 if weights is None else weights[safe])


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255, class_weights=None) -> jax.Array:
    """``logits (N, H, W, C)``, ``labels (N, H, W)`` ints -> scalar loss."""
    nll, w = _weighted_nll(logits, labels, ignore_index, class_weights)
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), jnp.finfo(nll.dtype).tiny)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                      class_weights=None) -> jax.Array:
    """``logits (N, H, W, C)``, ``labels (N, H, W)`` ints -> the summed per-pixel loss."""
    nll, w = _weighted_nll(logits, labels, ignore_index, class_weights)
    return jnp.sum(w * nll)


def bce(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255, class_weights=None) -> jax.Array:
    """``logits (N, H, W, C)``, ``labels (N, H, W)`` ints -> scalar loss."""
    logits, valid, safe, weights = _prepare(logits, labels, ignore_index, class_weights)
    targets = jax.nn.one_hot(safe, logits.shape[-1], dtype=logits.dtype)
    # max(x, 0) - x z + log(1 + exp(-|x|)): torch's numerically stable form
    per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    if weights is not None:
        per = per * weights
    count = jnp.sum(valid) * logits.shape[-1]
    return jnp.sum(per * valid[..., None]) / jnp.maximum(count, 1).astype(logits.dtype)


def get_loss(name: str):
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return {"cross_entropy": cross_entropy, "cross_entropy_sum": cross_entropy_sum, "bce": bce}[name]
