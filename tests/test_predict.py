"""fcn_jax.predict and `fcn-jax predict`: any size, batched, the same as one image at a time."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.data import normalize
from fcn_jax.data.synthetic import SyntheticShapes
from tests.helpers import forward

pytestmark = pytest.mark.xdist_group("weights")  # one worker makes the module's weights file


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = fcn_jax.create_model("fcns", num_classes=5, backbone="vgg11", batch_norm=True, seed=4)
    forward(model, jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32))  # BN stats
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    ds = SyntheticShapes("val")
    fcn_jax.save_weights(model, path, class_names=ds.class_names, palette=ds.palette)
    return path


def _images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 255, shape, np.uint8) for shape in [(20, 30, 3), (45, 33, 3), (20, 30, 3), (7, 9, 3)]]


@pytest.mark.slow
def test_predict_api_equals_one_image_at_a_time(weights):
    model = fcn_jax.load_model(weights)
    images = _images()
    masks = fcn_jax.predict(model, images, batch_size=2)
    logits = fcn_jax.predict(model, images[1], logits=True)
    for image, mask in zip(images, masks, strict=True):
        alone = np.asarray(jnp.argmax(forward(model, jnp.asarray(normalize(image[None]))), -1))[0]
        np.testing.assert_array_equal(mask, alone)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    assert logits.shape == (45, 33, 5)
    np.testing.assert_array_equal(logits.argmax(-1), masks[1])
    with pytest.raises(fcn_jax.FcnJaxError, match=r"image 0: expected uint8 RGB"):
        fcn_jax.predict(model, [np.zeros((4, 4), np.uint8)])


@pytest.mark.slow
def test_predict_command_writes_masks_overlays_indices_logits(weights, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    assert main(["predict", str(weights), str(folder), "--output", str(out), "--no-progress"]) == 2
    assert "broken.jpg: not a readable image" in capsys.readouterr().err
    assert main(["predict", str(weights), str(folder / "img*.png"), str(folder / "broken.jpg"), "--output", str(out),
                 "--overlay", "--index-png", "--logits", "--skip-bad-samples", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote predictions of 4 image(s)" in text and "skipped 1 unreadable file(s)" in text
    index = np.asarray(Image.open(out / "img1_index.png"))
    colours = np.asarray(Image.open(out / "img1_mask.png"))
    palette = SyntheticShapes("val").palette
    np.testing.assert_array_equal(colours, palette[index])
    np.testing.assert_array_equal(np.load(out / "img1_logits.npy").argmax(-1), index)
    assert Image.open(out / "img1_overlay.png").width == 2 * 33 * (256 // 45)
    assert main(["predict", str(weights), str(tmp_path / "none*.png"), "--output", str(out)]) == 2


@pytest.mark.slow
def test_inputs_that_share_a_stem_get_outputs_of_their_own(weights, tmp_path, capsys):
    images = _images()
    for i, relative in enumerate(["a/x.png", "b/x.png", "b/x.jpg"]):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / relative)
    out = tmp_path / "out"
    assert main(["predict", str(weights), str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out),
                 "--index-png", "--no-progress"]) == 0
    written = sorted(p.name for p in out.glob("*_index.png"))
    assert written == ["a_x_index.png", "b_x.jpg_index.png", "b_x.png_index.png"]
    for name, image in zip(written, (images[0], images[2], images[1]), strict=True):
        assert Image.open(out / name).size == (image.shape[1], image.shape[0])


def test_an_output_that_is_a_file_is_refused_before_any_work(weights, tmp_path, capsys, monkeypatch):
    import fcn_jax.inference.prediction as prediction

    Image.fromarray(_images()[0]).save(tmp_path / "x.png")
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(prediction, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["predict", str(weights), str(tmp_path / "x.png"), "--output", str(tmp_path / "taken")]) == 2
    assert "--output taken" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


@pytest.mark.slow
def test_an_image_too_large_for_memory_is_refused_with_the_fix(weights, tmp_path, capsys, monkeypatch):
    import fcn_jax.inference.prediction as prediction

    Image.fromarray(np.zeros((400, 600, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(prediction, "available_memory", lambda: 50 * 2**20)  # 50 MiB left on this "machine"
    assert main(["predict", str(weights), str(tmp_path / "big.png"), "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "big.png (600x400) needs about" in err and "--max-side" in err
    assert main(["predict", str(weights), str(tmp_path / "big.png"), "--output", str(tmp_path / "out"),
                 "--max-side", "96", "--index-png", "--no-progress"]) == 0
    assert Image.open(tmp_path / "out" / "big_index.png").size == (600, 400)  # scaled back to the image


@pytest.mark.slow
def test_the_weights_files_normalisation_is_used_unless_one_is_given(tmp_path, capsys):
    from fcn_jax.inference.runs import input_normalization

    model = fcn_jax.load_model(fcn_jax.save_weights(fcn_jax.create_model("fcn32s", num_classes=3, backbone="vgg11"),
                                                    tmp_path / "plain.safetensors"))
    path = fcn_jax.save_weights(model, tmp_path / "m.safetensors", normalization="caffe")
    image = _images()[1]
    Image.fromarray(image).save(tmp_path / "a.png")
    for given, expected in ((None, "caffe"), ("reference", "reference")):
        out = tmp_path / f"out_{given}"
        args = ["predict", str(path), str(tmp_path / "a.png"), "--output", str(out), "--logits", "--no-progress"]
        assert main(args + (["--normalization", given] if given else [])) == 0
        np.testing.assert_array_equal(np.load(out / "a_logits.npy"),
                                      fcn_jax.predict(model, image, normalization=expected, logits=True))
    capsys.readouterr()
    assert input_normalization(None, {"normalization": "reference"}, {"normalization": "caffe"}) == "reference"
    assert input_normalization(None, None, {}) == "imagenet"
