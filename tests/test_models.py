"""Model construction, shapes, modes, dtypes and the summary; no PyTorch needed."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import registry
from fcn_jax.errors import ConfigError, InputError
from fcn_jax.models import feature_ranges, torch_feature_indices
from tests.helpers import forward

TUTORIAL_ARCHS = registry.archs(family="tutorial")

SPEC_RANGES = {  # the reference's hard-coded table, valid without batch norm only
    "vgg11": ((0, 3), (3, 6), (6, 11), (11, 16), (16, 21)),
    "vgg13": ((0, 5), (5, 10), (10, 15), (15, 20), (20, 25)),
    "vgg16": ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31)),
    "vgg19": ((0, 5), (5, 10), (10, 19), (19, 28), (28, 37)),
}


@pytest.fixture(scope="module")
def small_model():
    return fcn_jax.create_model("fcn8s", num_classes=3, backbone="vgg11", batch_norm=True, seed=0)


@pytest.mark.parametrize("name", fcn_jax.BACKBONES)
def test_feature_ranges_match_the_spec_and_torchvision_bn_layout(name):
    assert feature_ranges(name, False) == SPEC_RANGES[name]
    # With BN each conv takes three indices; every range must end right after a pool, which in
    # torchvision's vgg*_bn is the layer following conv, BN, ReLU.
    bn = feature_ranges(name, True)
    n_convs = [sum(1 for v in seg if v != "M") for seg in _stages(name)]
    assert [e - s for s, e in bn] == [3 * n + 1 for n in n_convs]
    assert bn[-1][1] == 3 * len(torch_feature_indices(name, True)) + 5


def _stages(name):
    stages, cur = [], []
    for v in fcn_jax.models.CFGS[name]:
        cur.append(v)
        if v == "M":
            stages.append(cur)
            cur = []
    return stages


@pytest.mark.slow
@pytest.mark.parametrize("arch", TUTORIAL_ARCHS)  # the paper's: tests/test_paper_models.py
@pytest.mark.parametrize("h,w", [(1, 1), (45, 70), pytest.param(32, 64, marks=pytest.mark.exhaustive)])
def test_logits_have_input_size_and_num_classes(arch, h, w):
    model = fcn_jax.create_model(arch, num_classes=4, backbone="vgg11")
    model.eval()
    assert model(jnp.zeros((2, h, w, 3))).shape == (2, h, w, 4)


@pytest.mark.slow
def test_backbone_returns_five_pooled_features(small_model):
    feats = small_model.backbone(jnp.zeros((1, 64, 96, 3)))
    assert {k: v.shape for k, v in feats.items()} == {
        "x1": (1, 32, 48, 64), "x2": (1, 16, 24, 128), "x3": (1, 8, 12, 256),
        "x4": (1, 4, 6, 512), "x5": (1, 2, 3, 512)}


@pytest.mark.slow
def test_padding_rule_is_zero_pad_bottom_right_then_crop(small_model):
    small_model.eval()
    x = jax.random.normal(jax.random.key(0), (1, 40, 50, 3))
    padded = jnp.pad(x, ((0, 0), (0, 24), (0, 14), (0, 0)))
    np.testing.assert_allclose(small_model(x), small_model(padded)[:, :40, :50], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_train_mode_updates_running_stats_and_eval_mode_does_not():
    model = fcn_jax.create_model("fcns", num_classes=2, backbone="vgg11", batch_norm=True)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    model(x)  # modules start in train mode, as in PyTorch
    assert int(model.bn1.num_batches_tracked[...]) == 1
    assert int(model.backbone.bns[0].num_batches_tracked[...]) == 1
    model.eval()
    var = np.asarray(model.bn1.var[...]).copy()
    eval_a, eval_b = model(x), model(x * 2)
    np.testing.assert_array_equal(model.bn1.var[...], var)
    assert not np.allclose(eval_a, eval_b)


@pytest.mark.slow
def test_bfloat16_mixed_precision_keeps_float32_params_and_stats():
    model = fcn_jax.create_model("fcn16s", num_classes=3, backbone="vgg11", batch_norm=True, dtype=jnp.bfloat16)
    ref = fcn_jax.create_model("fcn16s", num_classes=3, backbone="vgg11", batch_norm=True)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    out = forward(model, x)
    assert out.dtype == jnp.bfloat16
    assert model.classifier.kernel[...].dtype == jnp.float32 and model.bn1.var[...].dtype == jnp.float32
    want = forward(ref, x)
    assert np.abs(np.asarray(out, np.float32) - want).max() <= 0.05 * np.abs(want).max()


@pytest.mark.exhaustive
def test_float64_needs_x64_and_works_with_it():
    with pytest.raises(ConfigError, match="jax_enable_x64"):
        fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11", dtype=jnp.float64)
    with jax.enable_x64(True):
        model = fcn_jax.create_model("fcn32s", num_classes=2, backbone="vgg11", dtype=jnp.float64,
                                     param_dtype=jnp.float64)
        out = model(jnp.zeros((2, 32, 32, 3), jnp.float64))
        assert out.dtype == jnp.float64 and model.bn1.var[...].dtype == jnp.float64


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,message", [
    ({"arch": "fcn4s"}, "unknown arch 'fcn4s'; choose one of fcn32s, fcn16s, fcn8s, fcns"),
    ({"backbone": "resnet50"}, "unknown backbone 'resnet50'"),
    ({"backbone": "vgg16_bn"}, "batch_norm=True"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
])
def test_bad_model_arguments_name_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        fcn_jax.create_model(**{"arch": "fcn8s", **kwargs})


@pytest.mark.parametrize("shape,dtype,message", [
    ((2, 3, 32, 32), jnp.float32, "looks NCHW"),
    ((32, 32, 3), jnp.float32, "Add a batch axis"),
    ((1, 32, 32, 3), jnp.uint8, "expected float images"),
])
def test_wrong_images_get_a_clear_error(small_model, shape, dtype, message):
    with pytest.raises(InputError, match=message):
        small_model(jnp.zeros(shape, dtype))


def test_summary_counts_match_torchvision_vgg16():
    model = nnx.eval_shape(lambda: fcn_jax.create_model("fcn8s", num_classes=21, backbone="vgg16"))
    text = fcn_jax.summary(model)
    lines = {line.split()[0]: line.split()[-1] for line in text.splitlines() if line.strip()}
    assert lines["backbone"] == "14,714,688"  # torchvision vgg16.features
    decoder = sum(cin * cout * 9 + cout + 2 * cout for cin, cout in
                  zip((512, 512, 256, 128, 64), (512, 256, 128, 64, 32), strict=True))
    assert lines["decoder"] == f"{decoder:,}"
    assert lines["classifier"] == f"{32 * 21 + 21:,}"
    assert lines["total"] == f"{14_714_688 + decoder + 32 * 21 + 21:,}"
    assert "backbone.convs.12.kernel" in text and "(3, 3, 512, 512)" in text


@pytest.mark.slow
def test_core_import_does_not_import_torch():
    code = ("import sys, fcn_jax; fcn_jax.create_model('fcn8s', backbone='vgg11'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
