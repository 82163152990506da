"""Dataset readers on tiny fixture trees in each published format, decoded labels checked exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from fcn_jax.data import get_dataset
from fcn_jax.data.cityscapes import LABEL_TO_TRAIN
from fcn_jax.data.normalization import normalize
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.errors import DatasetError
from tests.helpers import jpg as _jpg
from tests.helpers import label as _label
from tests.helpers import make_voc_tree
from tests.helpers import palette_png as _palette_png


@pytest.fixture
def voc_root(tmp_path):
    return make_voc_tree(tmp_path)


def test_voc_palette_pngs_decode_to_class_indices(voc_root):
    root, labels = voc_root
    train = get_dataset("voc", "train", data_dir=str(root))
    assert len(train) == 2 and train.num_classes == 21 and train.class_names[15] == "person"
    np.testing.assert_array_equal(train[1][1], labels["b"])
    assert tuple(train.palette[15]) == (192, 128, 128)  # VOC's colour for person


def test_voc_train_aug_and_seg11valid(voc_root):
    root, labels = voc_root
    aug = get_dataset("voc", "train_aug", data_dir=str(root))
    assert [p[0].stem for p in aug.pairs] == ["a", "b", "d"]  # VOC train + SBD train/val - VOC val
    np.testing.assert_array_equal(aug[1][1], labels["b"])  # VOC's mask where both exist
    np.testing.assert_array_equal(aug[2][1], labels["sbd_d"])  # SBD's .mat otherwise
    valid = get_dataset("voc", "seg11valid", data_dir=str(root))
    assert [p[0].stem for p in valid.pairs] == ["a"]  # VOC2011 val - SBD train
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(aug))[2][1], labels["sbd_d"])  # goes to workers


def test_camvid_colour_masks_map_to_indices_once_and_unknown_colours_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_JAX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "camvid"
    (root / "701_StillsRaw_full").mkdir(parents=True)
    (root / "LabeledApproved_full").mkdir()
    (root / "label_colors.txt").write_text("64 128 64\tAnimal\n192 0 128\tArchway\n0 128 192\tBicyclist\n")
    colours = np.array([[64, 128, 64], [192, 0, 128], [0, 128, 192]], np.uint8)
    want = {}
    for i in range(6):
        name = f"0001TP_{i:06d}"
        _jpg(root / "701_StillsRaw_full" / f"{name}.png", seed=i)
        want[name] = np.random.default_rng(i).integers(0, 3, (20, 30))
        Image.fromarray(colours[want[name]]).save(root / "LabeledApproved_full" / f"{name}_L.png")
    val = get_dataset("camvid", "val", data_dir=str(root))
    train = get_dataset("camvid", "train", data_dir=str(root))
    assert [p[0].stem for p in val.pairs] == ["0001TP_000000", "0001TP_000005"] and len(train) == 4
    assert train.class_names == ("Animal", "Archway", "Bicyclist")
    np.testing.assert_array_equal(train[0][1], want["0001TP_000001"])
    assert len(list((tmp_path / "cache" / "camvid").glob("*/*.png"))) == 1  # cached
    np.testing.assert_array_equal(train[0][1], want["0001TP_000001"])  # from the cache

    bad = root / "LabeledApproved_full" / "0001TP_000002_L.png"
    pixels = colours[want["0001TP_000002"]]
    pixels[3, 4] = (1, 2, 3)
    Image.fromarray(pixels).save(bad)
    with pytest.raises(DatasetError, match=r"0001TP_000002_L.png: colours \[\(1, 2, 3\)\] are not in label_colors.txt"):
        train[1]


def test_camvid11_unlabelled_is_ignored(tmp_path):
    label = np.array([[0, 5, 11], [10, 11, 3]])
    _jpg(tmp_path / "val" / "x.png", 2, 3)
    _palette_png(tmp_path / "valannot" / "x.png", label)
    ds = get_dataset("camvid11", "val", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds[0][1], [[0, 5, 255], [10, 255, 3]])
    assert ds.num_classes == 11
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))[0][1], ds[0][1])  # goes to worker processes


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    ids = np.array([[7, 8, 26, 0], [33, 24, 1, 19]])
    _jpg(tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png", 2, 4)
    gt = tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    gt.parent.mkdir(parents=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(gt)
    ds = get_dataset("cityscapes", "val", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds[0][1], [[0, 1, 13, 255], [18, 11, 255, 6]])
    assert ds.num_classes == 19 and (LABEL_TO_TRAIN != 255).sum() == 19


def _folder(tmp_path, n=3, h=20, w=30):
    (tmp_path / "classes.txt").write_text("bg\nfg\ncat\n")
    for i in range(n):
        _jpg(tmp_path / "images" / "train" / f"im{i}.jpg", h, w, seed=i)
        _palette_png(tmp_path / "masks" / "train" / f"im{i}.png", _label(i, h, w, classes=3))
    return tmp_path


def test_folder_layout(tmp_path):
    ds = get_dataset("folder", "train", data_dir=str(_folder(tmp_path)))
    assert len(ds) == 3 and ds.class_names == ("bg", "fg", "cat")
    np.testing.assert_array_equal(ds[2][1], _label(2, classes=3))


def test_bad_samples_stop_with_the_file_name_or_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path, n=4)
    (root / "images" / "train" / "im1.jpg").write_bytes(b"not an image")
    _palette_png(root / "masks" / "train" / "im2.png", np.zeros((5, 5)))  # wrong size
    _palette_png(root / "masks" / "train" / "im3.png", np.full((20, 30), 7))  # class 7 of 3
    _jpg(root / "images" / "train" / "orphan.jpg")
    with pytest.raises(DatasetError, match=r"orphan.jpg: no mask .* add the masks or pass --skip-bad-samples"):
        get_dataset("folder", "train", data_dir=str(root))
    (root / "images" / "train" / "orphan.jpg").unlink()
    ds = get_dataset("folder", "train", data_dir=str(root))
    with pytest.raises(DatasetError, match=r"im1.jpg: not a readable image"):
        ds[1]
    with pytest.raises(DatasetError, match=r"im2.png: mask is 5x5 but its image im2.jpg is 30x20"):
        ds[2]
    with pytest.raises(DatasetError, match=r"im3.png: label values \[7\] are outside \[0, 3\)"):
        ds[3]
    skipping = get_dataset("folder", "train", data_dir=str(root), skip_bad=True)
    assert len(skipping) == 1 and len(skipping.skipped) == 3


@pytest.mark.parametrize("name,message", [
    ("voc", "no VOCdevkit/VOC2012 folder"), ("camvid", "expected 701_StillsRaw_full/"),
    ("camvid11", "expected val/ and valannot/"), ("cityscapes", "expected leftImg8bit/val/CITY"),
    ("folder", "expected classes.txt, images/val/"),
])
def test_wrong_data_dir_says_what_layout_is_expected(tmp_path, name, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        get_dataset(name, "val", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="needs --data-dir"):
        get_dataset(name, "val")


def test_eval_batches_pad_to_size_buckets_like_the_model(tmp_path):
    root = _folder(tmp_path, n=3, h=20, w=30)
    _jpg(root / "images" / "train" / "im9.jpg", 40, 30, seed=9)
    _palette_png(root / "masks" / "train" / "im9.png", _label(9, 40, 30, classes=3))
    ds = get_dataset("folder", "train", data_dir=str(root))
    batches = list(EvalBatches(ds, 2))
    assert [b["image"].shape for b in batches] == [(2, 32, 32, 3), (2, 32, 32, 3), (2, 64, 32, 3)]
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, -1], [3, -1]]
    first = batches[0]
    np.testing.assert_allclose(first["image"][0, :20, :30], normalize(ds[0][0]))
    assert (first["image"][0, 20:] == 0).all() and (first["label"][0, 20:] == 255).all()
    assert (batches[1]["label"][1] == 255).all()
