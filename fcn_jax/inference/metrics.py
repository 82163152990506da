"""Segmentation metrics of the FCN paper, from one confusion matrix over a whole evaluation set.

``n[i, j]`` counts pixels of true class i predicted as j (pixels with the ignore label excluded),
``t_i = sum_j n[i, j]``. Then (Long et al., section 5):

- pixel accuracy ``sum_i n_ii / sum_i t_i``
- mean accuracy ``mean_i n_ii / t_i``
- mean IU ``mean_i n_ii / (t_i + sum_j n_ji - n_ii)``
- frequency weighted IU ``sum_i t_i * IU_i / sum_k t_k``

A class that appears in neither the targets nor the predictions has an undefined IU (NaN) and is
left out of the means (and a class absent from the targets is left out of the mean accuracy).
The matrix is accumulated on device, batch by batch, and reduced once: never averaged per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(logits_or_pred: jax.Array, labels: jax.Array, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
    """``(C, C)`` int32 counts for one batch; ``logits_or_pred`` is ``(..., C)`` logits or ``(...)`` class ids."""
    pred = jnp.argmax(logits_or_pred, -1) if logits_or_pred.ndim == labels.ndim + 1 else logits_or_pred
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + pred, 0)
    counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes ** 2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, class_names=None) -> dict:
    """Pixel accuracy, mean accuracy, mean IoU, frequency-weighted IoU and per-class IoU (NaN where
    undefined) from an accumulated confusion matrix."""
    n = np.asarray(conf, np.float64)
    diag, t, predicted = np.diag(n), n.sum(1), n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = diag / t
        iou = diag / (t + predicted - diag)
        total = t.sum()
        defined = ~np.isnan(iou)
        metrics = {
            "pixel_acc": float(diag.sum() / total) if total else float("nan"),
            "mean_acc": float(np.nanmean(acc)) if (t > 0).any() else float("nan"),
            "mean_iou": float(np.nanmean(iou)) if defined.any() else float("nan"),
            "fw_iou": float((t[defined] * iou[defined]).sum() / total) if total else float("nan"),
        }
    names = class_names or [str(i) for i in range(len(n))]
    metrics["per_class_iou"] = {name: float(v) for name, v in zip(names, iou, strict=True)}
    return metrics


def metrics_table(metrics: dict) -> str:
    """The four FCN metrics and the per-class IoU as a text table."""
    lines = [f"{'pixel accuracy':<22}{metrics['pixel_acc']:8.4f}", f"{'mean accuracy':<22}{metrics['mean_acc']:8.4f}",
             f"{'mean IoU':<22}{metrics['mean_iou']:8.4f}", f"{'frequency weighted IoU':<22}{metrics['fw_iou']:8.4f}",
             "", f"{'class':<22}{'IoU':>8}"]
    lines += [f"{name:<22}{iou:8.4f}" for name, iou in metrics["per_class_iou"].items()]
    return "\n".join(lines)
