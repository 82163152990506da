"""fcn-jax's safetensors format: exact round trips, config metadata, atomic writes, clear errors."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import WeightsError


def _trained_model(**kw):
    model = fcn_jax.create_model("fcns", num_classes=4, backbone="vgg11", batch_norm=True, seed=1, **kw)
    model(np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32))  # BN stats off defaults
    return model


def _assert_same_state(a, b):
    fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, va), (_, vb) in zip(fa, fb, strict=True):
        assert va[...].dtype == vb[...].dtype, path
        np.testing.assert_array_equal(va[...], vb[...], err_msg=str(path))


@pytest.mark.slow
def test_save_and_load_model_round_trip_exactly(tmp_path):
    model = _trained_model()
    fcn_jax.save_weights(model, tmp_path / "m.safetensors")
    loaded = fcn_jax.load_model(tmp_path / "m.safetensors")
    assert type(loaded).__name__ == "FCNs" and loaded.num_classes == 4
    assert loaded.backbone.name == "vgg11" and loaded.backbone.batch_norm
    assert loaded.bn1.use_running_average  # ready for inference
    _assert_same_state(model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


@pytest.mark.slow
def test_bfloat16_params_round_trip(tmp_path):
    model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11", param_dtype=jnp.bfloat16,
                                 dtype=jnp.bfloat16)
    fcn_jax.save_weights(model, tmp_path / "bf16.safetensors")
    again = nnx.eval_shape(lambda: fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11",
                                                        param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
    fcn_jax.load_weights(again, tmp_path / "bf16.safetensors")  # every variable, or an error
    _assert_same_state(model, again)


@pytest.mark.slow
def test_backbone_files_and_backbone_of_a_whole_fcn(tmp_path):
    model = _trained_model()
    fcn_jax.save_weights(model, tmp_path / "fcn.safetensors")
    fcn_jax.save_weights(model.backbone, tmp_path / "vgg.safetensors")
    bare = fcn_jax.load_model(tmp_path / "vgg.safetensors")
    assert isinstance(bare, fcn_jax.VGGBackbone)
    _assert_same_state(model.backbone, bare)
    fresh = fcn_jax.create_model("fcn8s", num_classes=9, backbone="vgg11", batch_norm=True, seed=3)
    fcn_jax.load_weights(fresh.backbone, tmp_path / "fcn.safetensors")  # backbone of a whole FCN
    _assert_same_state(model.backbone, fresh.backbone)
    with pytest.raises(WeightsError, match=r"holds a bare vgg11 backbone: load it with .*model\.backbone"):
        fcn_jax.load_weights(fresh, tmp_path / "vgg.safetensors")


@pytest.mark.slow
def test_mismatched_model_lists_keys_with_hints(tmp_path):
    fcn_jax.save_weights(_trained_model(), tmp_path / "m.safetensors")
    other = fcn_jax.create_model("fcns", num_classes=7, backbone="vgg11", batch_norm=False)
    with pytest.raises(WeightsError) as info:
        fcn_jax.load_weights(other, tmp_path / "m.safetensors")
    msg = str(info.value)
    assert "hint: the file was saved from a model with batch_norm=True, this model has False" in msg
    assert "hint: the file was saved from a model with num_classes=4, this model has 7" in msg
    assert "mis-shaped: classifier.kernel: expected (1, 1, 32, 7), got (1, 1, 32, 4)" in msg
    assert "unexpected: backbone.bns.0.mean (shape (64,))" in msg


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "m.safetensors"
    model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11")
    fcn_jax.save_weights(model, path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(fcn_jax.OutputError, match=r"cannot write .*m\.safetensors: disk full"):
        fcn_jax.save_weights(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_weight_files(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "bad.safetensors").write_bytes(b"\x01" * 64)
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "foreign.safetensors"))
    cases = {"none.safetensors": "no such weights file",
             "bad.safetensors": "the file is truncated or not a safetensors file",
             "foreign.safetensors": "is not an fcn-jax weights file"}
    for name, message in cases.items():
        with pytest.raises(WeightsError, match=message):
            fcn_jax.load_model(tmp_path / name)
    with pytest.raises(WeightsError, match=r"saved as \.safetensors"):
        fcn_jax.save_weights(fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11"), tmp_path / "m.pth")


def test_weights_that_are_not_float_or_not_finite_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11")
    path = tmp_path / "m.safetensors"
    fcn_jax.save_weights(model, path)
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["classifier.kernel"] = tensors["classifier.kernel"].astype(np.int8)
    save_file(tensors, tmp_path / "int8.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match=r"int8.safetensors: classifier.kernel is int8"):
        fcn_jax.load_model(tmp_path / "int8.safetensors")
    tensors = load_file(path)
    tensors["deconv2.kernel"][0, 0, 0, 0] = np.nan
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match=r"nan.safetensors: deconv2.kernel holds NaN or infinite values"):
        fcn_jax.load_model(tmp_path / "nan.safetensors")


def test_metadata_that_is_not_json_names_the_file(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11")
    fcn_jax.save_weights(model, tmp_path / "m.safetensors", class_names=["a", "b"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "numpy") as f:
        meta = f.metadata()
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors",
              metadata={**meta, "class_names": "[a, b"})
    with pytest.raises(WeightsError, match=r"bad.safetensors: its metadata 'class_names' is not JSON"):
        fcn_jax.load_model(tmp_path / "bad.safetensors")
