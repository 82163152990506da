"""Metrics against a plain numpy implementation of the FCN paper's formulas."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.inference.metrics import confusion_matrix, segmentation_metrics


def _paper_metrics(labels, preds, num_classes, ignore=255):
    """Section 5 of Long et al., pixel by pixel with Python loops over classes."""
    keep = labels != ignore
    labels, preds = labels[keep], preds[keep]
    n = np.zeros((num_classes, num_classes))
    for i, j in zip(labels, preds, strict=True):
        n[i, j] += 1
    t = n.sum(1)
    ious, accs, fw = [], [], 0.0
    for i in range(num_classes):
        union = t[i] + n[:, i].sum() - n[i, i]
        if union > 0:
            ious.append(n[i, i] / union)
            fw += t[i] * n[i, i] / union
        if t[i] > 0:
            accs.append(n[i, i] / t[i])
    return n, {"pixel_acc": np.trace(n) / t.sum(), "mean_acc": np.mean(accs), "mean_iou": np.mean(ious),
               "fw_iou": fw / t.sum()}


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_the_papers_formulas(seed):
    rng = np.random.default_rng(seed)
    c = 6
    labels = rng.integers(0, c, (3, 17, 23))
    labels[labels == 4] = 1  # class 4 absent from the targets...
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, c, labels.shape))
    preds[preds == 5] = 2  # ...class 5 absent from the predictions
    labels[:, :3] = 255  # ignored pixels
    conf = np.zeros((c, c), np.int64)
    for b in range(3):  # accumulated batch by batch, as evaluation does
        conf += np.asarray(confusion_matrix(jnp.asarray(preds[b:b + 1]), jnp.asarray(labels[b:b + 1]), c))
    n, want = _paper_metrics(labels.ravel(), preds.ravel(), c)
    np.testing.assert_array_equal(conf, n)
    got = segmentation_metrics(conf)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


def test_class_absent_everywhere_has_nan_iou_and_is_left_out():
    conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = segmentation_metrics(conf, ["a", "b", "c"])
    assert np.isnan(m["per_class_iou"]["c"])
    assert m["mean_iou"] == pytest.approx(np.mean([5 / 8, 3 / 6]))
    assert m["mean_acc"] == pytest.approx(np.mean([5 / 6, 3 / 5]))


def test_confusion_matrix_from_logits_skips_out_of_range_and_ignored():
    logits = jnp.asarray(np.eye(3)[[0, 1, 2, 2]][None])  # (1, 4, 3): predicts 0, 1, 2, 2
    labels = jnp.asarray([[0, 255, 2, 1]])
    conf = np.asarray(confusion_matrix(logits, labels, 3))
    assert conf.sum() == 3 and conf[0, 0] == 1 and conf[2, 2] == 1 and conf[1, 2] == 1
