"""`fcn-jax evaluate`: size-bucketed batches give exactly the whole-image metrics."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.data import get_dataset, normalize
from fcn_jax.inference.metrics import confusion_matrix, segmentation_metrics
from tests.helpers import forward
from tests.test_datasets import _folder, _jpg, _label, _palette_png


@pytest.fixture
def folder_with_sizes(tmp_path):
    (tmp_path / "data").mkdir()
    root = _folder(tmp_path / "data", n=3, h=20, w=30)
    for i, (h, w) in enumerate([(45, 33), (20, 30), (64, 64)], start=5):
        _jpg(root / "images" / "train" / f"im{i}.jpg", h, w, seed=i)
        _palette_png(root / "masks" / "train" / f"im{i}.png", _label(i, h, w, classes=3))
    weights = tmp_path / "model.safetensors"
    model = fcn_jax.create_model("fcn8s", num_classes=3, backbone="vgg11", batch_norm=True, seed=2)
    forward(model, jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32))  # BN stats
    fcn_jax.save_weights(model, weights)
    return root, weights


@pytest.mark.slow
def test_bucketed_evaluation_equals_whole_image_evaluation(folder_with_sizes, tmp_path, capsys):
    root, weights = folder_with_sizes
    out = tmp_path / "report" / "eval"
    assert main(["evaluate", str(weights), "--dataset", "folder", "--data-dir", str(root), "--split", "train",
                 "--batch-size", "2", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mean IoU" in text and "cat" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["images"] == 6

    model = fcn_jax.load_model(weights)
    data = get_dataset("folder", "train", data_dir=str(root))
    conf = np.zeros((3, 3), np.int64)
    for i in range(len(data)):  # one whole image at a time, no batching or buckets
        image, label = data[i]
        logits = forward(model, jnp.asarray(normalize(image[None])))
        conf += np.asarray(confusion_matrix(logits, jnp.asarray(label[None].astype(np.int32)), 3))
    np.testing.assert_array_equal(report["confusion_matrix"], conf)
    want = segmentation_metrics(conf, list(data.class_names))
    assert report["mean_iou"] == pytest.approx(want["mean_iou"]) and report["pixel_acc"] == pytest.approx(
        want["pixel_acc"])
    assert (tmp_path / "report" / "eval_confusion.png").is_file()


def test_evaluate_explains_mismatches(folder_with_sizes, tmp_path, capsys):
    root, _ = folder_with_sizes
    other = tmp_path / "five.safetensors"
    fcn_jax.save_weights(fcn_jax.create_model("fcn32s", num_classes=5, backbone="vgg11"), other)
    assert main(["evaluate", str(other), "--dataset", "folder", "--data-dir", str(root), "--split", "train",
                 "--no-progress"]) == 2
    assert "the model predicts 5 classes but the dataset has 3" in capsys.readouterr().err
    assert main(["evaluate", str(other), "--no-progress"]) == 2
    assert "pass --dataset" in capsys.readouterr().err


@pytest.mark.exhaustive
def test_train_on_a_folder_dataset_then_evaluate_the_run(folder_with_sizes, tmp_path, capsys):
    root, _ = folder_with_sizes
    (root / "images" / "val").symlink_to(root / "images" / "train")
    (root / "masks" / "val").symlink_to(root / "masks" / "train")
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--crop", "32x32", "--batch-size", "2",
                 "--epochs", "1", "--warmup-steps", "0", "--run-dir", str(run), "--no-progress"]) == 0
    trained = json.loads([line for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--output", str(tmp_path / "e"), "--no-progress"]) == 0
    assert "folder val: 6 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["mean_iou"] == pytest.approx(trained["mean_iou"])  # best = the only validation
    masks = fcn_jax.predict(fcn_jax.load_model(run / "best.safetensors"), [get_dataset(
        "folder", "val", data_dir=str(root))[4][0]])
    assert masks[0].shape == (20, 30)


@pytest.mark.slow
def test_an_output_folder_gets_the_reports_inside(folder_with_sizes, tmp_path, capsys):
    root, weights = folder_with_sizes
    out = tmp_path / "reports"
    out.mkdir()
    for target in (f"{out}/", str(out)):
        assert main(["evaluate", str(weights), "--dataset", "folder", "--data-dir", str(root), "--split", "train",
                     "--output", target, "--no-progress"]) == 0
        assert (out / "metrics.json").is_file() and (out / "confusion.png").is_file()
        assert not (tmp_path / "reports.json").exists()
