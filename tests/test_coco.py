"""COCO with VOC's labels: a COCO-format fixture made here (polygons, crowd RLE, compressed RLE, overlaps,
categories outside VOC, an image with nothing) against masks computed independently in the test."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from fcn_jax.data import coco, get_dataset
from fcn_jax.errors import DatasetError
from tests.helpers import jpg

pytest.importorskip("pycocotools")

PERSON, CAR, BICYCLE, DOG, BOTTLE, TRAFFIC_LIGHT = 1, 3, 2, 18, 44, 10  # COCO category ids
VOC = {"person": 15, "car": 7, "bicycle": 2, "dog": 12, "bottle": 5}  # their VOC classes


def _rect(x0, y0, x1, y1):
    """A polygon whose pixels are exactly [y0, y1) x [x0, x1) (pycocotools' rasterisation of whole corners)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.T.ravel()
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0, *counts]


def _fixture(root):
    """Four images per split and the labels expected for them, worked out pixel by pixel here."""
    from pycocotools import mask as coco_masks

    images, annotations, expected = [], [], {}

    def add(image_id, h, w, objects, label):
        name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for category, segmentation, area, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": segmentation, "area": area, "iscrowd": crowd, "bbox": [0, 0, 1, 1]})
        expected[name] = label

    # 1: a person and a car overlapping (the overlap is ignored), a traffic light (not a VOC class) on top
    h, w = 30, 40
    label = np.zeros((h, w), np.uint8)
    label[5:20, 2:12] = VOC["person"]
    label[10:25, 8:30] = VOC["car"]
    label[10:20, 8:12] = 255
    add(7, h, w, [(PERSON, [_rect(2, 5, 12, 20)], 1500.0, 0), (CAR, [_rect(8, 10, 30, 25)], 330.0, 0),
                  (TRAFFIC_LIGHT, [_rect(0, 0, 40, 30)], 1200.0, 0)], label)
    # 2: a crowd of bicycles (uncompressed RLE) and a dog in two parts
    h, w = 25, 20
    crowd = np.zeros((h, w), np.uint8)
    crowd[12:, 3:17] = 1
    label = crowd * np.uint8(VOC["bicycle"])
    label[2:8, 1:5] = VOC["dog"]
    label[2:6, 10:19] = VOC["dog"]
    add(3, h, w, [(BICYCLE, {"counts": _runs(crowd), "size": [h, w]}, 1001.0, 1),
                  (DOG, [_rect(1, 2, 5, 8), _rect(10, 2, 19, 6)], 60.0, 0)], label)
    # 3: nothing at all
    add(11, 16, 16, [], np.zeros((16, 16), np.uint8))
    # 4: a bottle as a compressed RLE, too small for training
    h, w = 18, 22
    bottle = np.zeros((h, w), np.uint8)
    bottle[4:9, 6:9] = 1
    rle = coco_masks.encode(np.asfortranarray(bottle))
    add(5, h, w, [(BOTTLE, {"counts": rle["counts"].decode(), "size": [h, w]}, 15.0, 0)], bottle * np.uint8(5))

    for split in ("train2017", "val2017"):
        for image in images:
            jpg(root / split / image["file_name"], h=image["height"], w=image["width"], seed=image["id"])
        path = root / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3, 10, 18, 44)]}))
    return expected


@pytest.fixture
def coco_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "coco", _fixture(tmp_path / "coco")


def test_masks_are_torchvisions_voc_labels(coco_root):
    root, expected = coco_root
    val = get_dataset("coco", "val2017", data_dir=str(root))
    assert val.num_classes == 21 and val.class_names[15] == "person" and val.ignore_index == 255
    names = [image.name for image, _ in val.pairs]
    assert names == sorted(expected)  # every validation image, in image id order, the empty one too
    for i, name in enumerate(names):
        image, label = val[i]
        np.testing.assert_array_equal(label, expected[name], err_msg=name)
        assert image.shape == (*expected[name].shape, 3)


def test_training_keeps_images_with_over_1000_pixels_of_voc_objects(coco_root):
    root, expected = coco_root
    train = get_dataset("coco", "train", data_dir=str(root))  # "train" is train2017
    # 7: 1500 + 330 (the traffic light does not count); 3: 1061; 11 has nothing; 5 has 15
    assert [image.name for image, _ in train.pairs] == ["000000000003.jpg", "000000000007.jpg"]
    np.testing.assert_array_equal(train[1][1], expected["000000000007.jpg"])


def test_masks_are_built_once_by_workers_then_read_from_the_cache(coco_root, monkeypatch):
    root, expected = coco_root
    monkeypatch.setattr(coco, "IN_PROCESS_BELOW", 0)  # the fixture is small: build it in a worker process anyway
    first = coco.coco_dataset(root, "val", workers=1)
    np.testing.assert_array_equal(first[0][1], expected["000000000003.jpg"])

    def not_again(*args):
        raise AssertionError("the annotation file was read again")

    monkeypatch.setattr(coco, "_read_annotations", not_again)
    again = get_dataset("coco", "val2017", data_dir=str(root))
    assert again.pairs == first.pairs
    annotations = root / "annotations" / "instances_val2017.json"
    os.utime(annotations, ns=(1, 1))  # a new annotation file: new masks
    with pytest.raises(AssertionError, match="read again"):
        get_dataset("coco", "val2017", data_dir=str(root))


def test_missing_pycocotools_bad_files_and_layouts_say_what_to_do(coco_root, monkeypatch, tmp_path):
    root, _ = coco_root
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(DatasetError, match=r"pip install 'fcn-jax\[coco\]'"):
        get_dataset("coco", "val2017", data_dir=str(root))
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"expected annotations/instances_val2017.json and val2017/\*.jpg"):
        get_dataset("coco", "val2017", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="unknown COCO split 'test2017'"):
        get_dataset("coco", "test2017", data_dir=str(root))
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"instances_train2017\.json: not a readable COCO instances file"):
        get_dataset("coco", "train2017", data_dir=str(root))


@pytest.mark.slow
def test_evaluate_scores_at_the_resized_resolution(coco_root, tmp_path, capsys):
    import fcn_jax
    from fcn_jax.cli import main
    from fcn_jax.data.transforms import resize_pair, shorter_side_size

    root, expected = coco_root
    weights = tmp_path / "fcn.safetensors"
    fcn_jax.save_weights(fcn_jax.create_model("fcn32s", num_classes=21, batch_norm=False), weights)
    assert main(["evaluate", str(weights), "--dataset", "coco", "--data-dir", str(root), "--split", "val2017",
                 "--resize-shorter", "24", "--output", str(tmp_path / "report"), "--no-progress"]) == 0
    assert "coco val2017: 4 images, resized to a shorter side of 24" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    labels = [resize_pair(np.zeros((*label.shape, 3), np.uint8), label, shorter_side_size(*label.shape, 24))[1]
              for label in expected.values()]
    assert report["resize_shorter"] == 24
    assert np.sum(report["confusion_matrix"]) == sum(int((label != 255).sum()) for label in labels)
