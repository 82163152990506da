"""The converter: exact round trips and a readable error for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import WeightsError
from fcn_jax.pytorch.parity import random_reference


@pytest.fixture(scope="module")
def ref(torch):
    """A vgg11_bn FCN8s reference with 5 classes and randomised BatchNorm."""
    return random_reference("fcn8s", 5, "vgg11", True, seed=7)


def _model(**kw):
    args = {"arch": "fcn8s", "num_classes": 5, "backbone": "vgg11", "batch_norm": True, **kw}
    return fcn_jax.create_model(args.pop("arch"), **args)


def _load_error(model, source) -> str:
    with pytest.raises(WeightsError) as info:
        fcn_jax.load_torch_state_dict(model, source)
    return str(info.value)


@pytest.mark.slow
def test_torch_to_flax_to_torch_is_bit_exact(ref):
    model = _model()
    fcn_jax.load_torch_state_dict(model, ref.state_dict())
    back = fcn_jax.to_torch_state_dict(model)
    sd = ref.state_dict()
    assert list(back) == list(sd)  # same keys, in torch's order
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    assert back["bn1.num_batches_tracked"].dtype == np.int64 and back["bn1.num_batches_tracked"] > 0


@pytest.mark.slow
def test_flax_to_torch_to_flax_is_bit_exact_and_torch_accepts_it_strictly(torch):
    from fcn_jax.pytorch.reference import build_torch_model

    model = _model(seed=3)
    model(np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32))  # move BN stats
    twin = build_torch_model("fcn8s", 5, "vgg11", True)
    twin.load_state_dict(fcn_jax.to_torch_state_dict(model, as_torch=True), strict=True)
    again = _model(seed=4)
    fcn_jax.load_torch_state_dict(again, twin)  # from an nn.Module
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again)), strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


@pytest.mark.slow
def test_backbone_to_torchvision_layout(torch):
    import torchvision

    backbone = fcn_jax.VGGBackbone("vgg13", batch_norm=True, rngs=nnx.Rngs(0))
    sd = fcn_jax.to_torch_state_dict(backbone, as_torch=True)
    assert all(k.startswith("features.") for k in sd)
    tv = torchvision.models.vgg13_bn(weights=None)
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)


def test_whole_fcn_state_dict_loads_into_a_backbone(ref, caplog):
    backbone = fcn_jax.VGGBackbone("vgg11", batch_norm=True, rngs=nnx.Rngs(0))
    with caplog.at_level("INFO", logger="fcn_jax"):
        report = fcn_jax.load_torch_state_dict(backbone, ref.state_dict())
    assert "decoder was ignored" in caplog.text
    assert any(k.startswith("deconv1") for k in report.ignored)
    np.testing.assert_array_equal(backbone.bns[0].var[...], ref.pretrained_net.features[1].running_var.numpy())


@pytest.mark.slow
def test_torchvision_state_dict_into_whole_fcn_says_use_the_backbone(torch):
    import torchvision

    msg = _load_error(_model(), torchvision.models.vgg11_bn(weights=None).state_dict())
    assert "load it into the backbone with fcn_jax.load_torch_state_dict(model.backbone" in msg


def test_missing_unexpected_and_misshaped_keys_are_all_listed(ref):
    sd = dict(ref.state_dict())
    del sd["deconv3.weight"]
    sd["extra.weight"] = sd["deconv1.bias"]
    sd["bn2.running_var"] = sd["bn2.running_var"][:10]
    model = _model()
    before = np.asarray(model.classifier.kernel[...]).copy()
    msg = _load_error(model, sd)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "missing:    deconv3.weight (expected shape (256, 128, 3, 3))" in msg
    assert "unexpected: extra.weight (shape (512,))" in msg
    assert "mis-shaped: bn2.running_var: expected (256,), got (10,)" in msg
    np.testing.assert_array_equal(model.classifier.kernel[...], before)  # nothing written


def test_a_shapes_only_model_left_with_an_empty_variable_is_an_error(ref, monkeypatch):
    """convert builds whole networks shapes only (no random initialisation): a layout table that missed a layer
    must not let a model with an empty variable through to be saved."""
    from fcn_jax.weights import tutorial_layout

    table = tutorial_layout.layer_table
    monkeypatch.setattr(tutorial_layout, "layer_table", lambda model: table(model)[:-1])  # no classifier
    model = nnx.eval_shape(_model)
    with pytest.raises(WeightsError, match=r"gives no value for: classifier\.bias, classifier\.kernel"):
        fcn_jax.load_torch_state_dict(model, ref.state_dict(), strict=False)


def test_non_strict_ignores_unexpected_keys(ref):
    sd = {**ref.state_dict(), "extra.weight": ref.state_dict()["deconv1.bias"]}
    report = fcn_jax.load_torch_state_dict(_model(), sd, strict=False)
    assert report.ignored == ["extra.weight"]


@pytest.mark.parametrize("model_kw,hint", [
    ({"batch_norm": False}, " has BatchNorm statistics in its backbone (a vgg*_bn model): build the model with "
                            "batch_norm=True"),
    ({"backbone": "vgg16"}, "'s backbone has the conv layers of vgg11: build the model with backbone='vgg11'"),
    ({"num_classes": 21}, "'s classifier has 5 classes: build the model with num_classes=5"),
])
def test_common_mistakes_get_a_hint(ref, model_kw, hint):
    assert f"hint: the state_dict{hint}" in _load_error(_model(**model_kw), ref.state_dict())


def test_plain_state_dict_into_batchnorm_model_gets_a_hint(torch):
    msg = _load_error(_model(), random_reference("fcn8s", 5, "vgg11", False).state_dict())
    assert "no BatchNorm layers in its backbone (a plain vgg model): build the model with batch_norm=False" in msg


def test_reads_files_unwraps_checkpoints_and_strips_module_prefix(ref, torch, tmp_path):
    from safetensors.torch import save_file

    sd = ref.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "torch.safetensors")
    for path in ("ckpt.pth", "torch.safetensors"):
        model = _model()
        fcn_jax.load_torch_state_dict(model, tmp_path / path)
        np.testing.assert_array_equal(model.bn5.mean[...], sd["bn5.running_mean"].numpy())


def test_bfloat16_state_dict_loads(ref):
    sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    model = _model()
    fcn_jax.load_torch_state_dict(model, sd)
    np.testing.assert_array_equal(model.deconv1.bias[...], sd["deconv1.bias"].float().numpy())


def test_infer_config(ref, torch):
    import torchvision

    assert fcn_jax.infer_config(fcn_jax.read_torch_state_dict(ref)) == {
        "layout": "fcn", "family": "tutorial", "backbone": "vgg11", "batch_norm": True, "num_classes": 5}
    assert fcn_jax.infer_config(fcn_jax.read_torch_state_dict(torchvision.models.vgg19(weights=None))) == {
        "layout": "vgg", "backbone_only": True, "backbone": "vgg19", "batch_norm": False}


@pytest.mark.slow
def test_bad_files_get_clear_errors(torch, tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    fcn_jax.save_weights(_model(), tmp_path / "ours.safetensors")
    cases = {
        "missing.pth": "no such weights file",
        "garbage.pth": "is not a PyTorch checkpoint or is corrupt; download or save it again",
        "module.pth": "holds Python objects beyond tensors (a whole pickled model?)",
        "garbage.safetensors": "the file is truncated or not a safetensors file",
        "meta.pth": "state_dict entry 'epoch' is a int, not a tensor",
        "ours.safetensors": "is an fcn-jax weights file (Flax layout), not a PyTorch state_dict",
    }
    for name, message in cases.items():
        assert message in _load_error(_model(), tmp_path / name), name


@pytest.mark.slow
def test_truncated_zip_checkpoint(ref, torch, tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(ref.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    assert "corrupt" in _load_error(_model(), path)
