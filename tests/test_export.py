"""`fcn-jax export` / `fcn_jax.export`: every architecture family to ONNX and StableHLO, checked in the
file's own runtime against the JAX model; the preprocessing graphs; one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.data import normalize
from fcn_jax.deploy.exporting import TOLERANCE, default_verify_sizes, export, verify
from fcn_jax.errors import ConfigError, MissingExtraError
from fcn_jax.models import MODELS
from tests.helpers import NARROW, forward

pytest.importorskip("onnxruntime")


def _model(arch, backbone="vgg11", batch_norm=False, num_classes=3):
    extra = {"fc_width": NARROW} if arch.endswith("_paper") else {"batch_norm": batch_norm}
    model = MODELS[arch](num_classes, backbone=backbone, rngs=nnx.Rngs(0), **extra)
    # biases, BatchNorm statistics and the paper's score layers start at 0 or 1: move them so that a layout
    # mistake in any of them shows
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and var[...].dtype == jnp.float32:
            value = var[...]
            if value.ndim == 1 or (str(path[0]).startswith("score") and value.ndim == 4):
                noise = jax.random.uniform(jax.random.key(value.ndim + len(path)), value.shape,
                                           minval=0.1, maxval=0.5)
                var.set_value(value + (noise if value.ndim == 1 else 0.1 * (noise - 0.3)))
    model.eval()
    return model


def _assert_verified(model, fmt, **options):
    data = export(model, fmt, **options)
    checks = verify(model, data, fmt, shapes=default_verify_sizes(model, fmt, options.get("size")), **{
        k: v for k, v in options.items() if k != "size"})
    assert len(checks) == 2 and all(c.ok for c in checks), [c.describe() for c in checks]
    return data, checks


@pytest.mark.slow  # fcn8s: every layer kind of the tutorial's heads; fcn8s_atonce_paper: the paper's (fcn8s_paper's
# skips and crops, and the scaled pool3/pool4 inputs)
@pytest.mark.parametrize("arch,batch_norm", [
    ("fcn8s", True), ("fcn8s_atonce_paper", False),
    *(pytest.param(arch, bn, marks=pytest.mark.exhaustive) for arch, bn in (
        ("fcn32s", False), ("fcn16s", True), ("fcns", False), ("fcn32s_paper", False), ("fcn16s_paper", False),
        ("fcn8s_paper", False)))])
def test_onnx_equals_jax_at_two_sizes(arch, batch_norm):
    _, checks = _assert_verified(_model(arch, batch_norm=batch_norm), "onnx")
    assert {c.shape[1:3] for c in checks} == {(64, 96), (37, 45)}  # dynamic height and width, any size
    assert max(c.relative for c in checks) <= TOLERANCE


@pytest.mark.exhaustive  # the depth only lengthens the backbone's list of layers; CI: vgg11 above
@pytest.mark.parametrize("backbone,batch_norm", [("vgg13", True), ("vgg16", False), ("vgg19", True)])
def test_onnx_every_depth(backbone, batch_norm):
    _assert_verified(_model("fcn8s", backbone, batch_norm), "onnx")
    _assert_verified(_model("fcn16s_paper", backbone), "onnx")


@pytest.mark.exhaustive
def test_the_heatmap_exports_to_both_formats():
    model = fcn_jax.create_model("heatmap", num_classes=5, backbone="vgg11", fc_width=NARROW)  # 4096: 5.5 GB
    model.eval()
    for fmt in ("onnx", "stablehlo"):
        _assert_verified(model, fmt)


@pytest.mark.slow  # the program is traced, so any arch shows the symbolic shapes; fcn32s is the cheapest to compile
@pytest.mark.parametrize("arch,batch_norm", [("fcn32s", False), *(pytest.param(a, bn, marks=pytest.mark.exhaustive)
                                                                  for a, bn in (("fcn8s", True),
                                                                                ("fcn8s_atonce_paper", False)))])
def test_stablehlo_reloads_without_fcn_jax(arch, batch_norm, tmp_path):
    model = _model(arch, batch_norm=batch_norm)
    data, _ = _assert_verified(model, "stablehlo")
    (tmp_path / "m.jaxexport").write_bytes(data)
    x = np.random.default_rng(0).standard_normal((3, 32, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, jax; sys.modules['fcn_jax'] = None; "  # importing fcn_jax would now fail
            "e = jax.export.deserialize(bytearray(open('m.jaxexport', 'rb').read())); "
            "np.save('y.npy', np.asarray(e.call(np.load('x.npy')))); print(e.in_avals)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "float32[b,32*h,32*w,3]" in done.stdout  # batch, height and width symbolic
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(forward(model, jnp.asarray(x)))
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.exhaustive  # one of each family in the fast tier: test_stablehlo_reloads_without_fcn_jax
@pytest.mark.parametrize("arch,batch_norm", [("fcn32s", True), ("fcn16s", False), ("fcns", True),
                                             ("fcn32s_paper", False), ("fcn16s_paper", False), ("fcn8s_paper", False)])
def test_stablehlo_every_other_architecture(arch, batch_norm):
    _assert_verified(_model(arch, batch_norm=batch_norm), "stablehlo")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", pytest.param("stablehlo", marks=pytest.mark.exhaustive)])
def test_preprocessing_takes_uint8_rgb_and_returns_the_class_ids_of_the_model(fmt):
    model = _model("fcn8s", batch_norm=True, num_classes=4)
    data, checks = _assert_verified(model, fmt, with_preprocessing=True, normalization="caffe", scores=True)
    assert all(c.mismatched == 0 and c.relative <= TOLERANCE for c in checks)
    pixels = np.random.default_rng(5).integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
    if fmt == "onnx":
        import onnxruntime

        classes, scores = onnxruntime.InferenceSession(data).run(None, {"images": pixels})  # scores NHWC too
    else:
        classes, scores = jax.export.deserialize(bytearray(data)).call(pixels)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(forward(model, jnp.asarray(normalize(pixels, "caffe"))))
    assert classes.shape == (2, 64, 32) and np.issubdtype(classes.dtype, np.integer)
    assert (np.asarray(classes) == logits.argmax(-1)).mean() > 0.999 and len(np.unique(classes)) > 1
    np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.exhaustive  # CI: test_stablehlo_reloads_without_fcn_jax (batch, height and width symbolic)
def test_stablehlo_at_a_fixed_size_takes_any_batch():
    model = _model("fcn16s_paper")
    data, checks = _assert_verified(model, "stablehlo", size=(37, 45))
    assert [c.shape for c in checks] == [(1, 37, 45, 3), (2, 37, 45, 3)]
    assert "float32[b,37,45,3]" in str(jax.export.deserialize(bytearray(data)).in_avals)


@pytest.mark.slow
def test_export_command_writes_verifies_and_reports(tmp_path, capsys):
    fcn_jax.save_weights(_model("fcn8s", batch_norm=True), tmp_path / "m.safetensors", normalization="reference")
    out = tmp_path / "seg.onnx"  # the name in docs/deploy.md
    assert main(["export", str(tmp_path / "m.safetensors"), "--format", "onnx", "--with-preprocessing",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "normalisation reference" in printed  # taken from the weights file
    assert printed.count("verified in onnxruntime") == 2 and "OVER TOLERANCE" not in printed
    # the docs' example segments an image with the file, in a process with onnxruntime, numpy and Pillow only
    readme = (Path(__file__).parent.parent / "docs" / "deploy.md").read_text()
    example = readme.split("Segmenting one image with the exported ONNX")[1].split("```python")[1].split("```")[0]
    street = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(street).save(tmp_path / "street.jpg")
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fcn_jax'] = None\n" + example],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "street_classes.png").size == (70, 50)
    assert sum(eval(done.stdout.strip().splitlines()[-1]).values()) == 50 * 70


@pytest.mark.slow
def test_an_export_that_differs_fails_with_exit_1(tmp_path, capsys, monkeypatch):
    from fcn_jax.deploy import onnx_graph as onnx_export

    fcn_jax.save_weights(_model("fcns"), tmp_path / "m.safetensors")
    monkeypatch.setattr(onnx_export._Graph, "relu", lambda self, x: x)  # a graph that forgot its ReLUs
    assert main(["export", str(tmp_path / "m.safetensors"), "--format", "onnx", "--output",
                 str(tmp_path / "m.onnx")]) == 1
    captured = capsys.readouterr()
    assert "OVER TOLERANCE" in captured.out and "differs from the JAX model" in captured.err


@pytest.mark.parametrize("options,message", [
    ({"format": "tflite"}, "unknown export format 'tflite'; choose one of onnx, stablehlo"),
    ({"format": "onnx", "size": (64, 64)}, "ONNX exports take any height and width"),
    ({"format": "onnx", "scores": True}, "--scores adds softmax scores to a --with-preprocessing export"),
    ({"format": "stablehlo", "normalization": "bgr"}, "unknown normalization 'bgr'"),
])
def test_bad_export_options_are_one_clear_error(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        export(_model("fcn32s"), **options)


@pytest.mark.slow
def test_bad_export_inputs_at_the_command_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    fcn_jax.save_weights(fcn_jax.create_model("heatmap", num_classes=2, backbone="vgg11", fc_width=NARROW),
                         tmp_path / "h.safetensors")
    assert main(["export", str(tmp_path / "h.safetensors"), "--format", "stablehlo", "--size", "100x100",
                 "--output", str(tmp_path / "h.jaxexport")]) == 2
    assert "--size 100x100 is too small: heatmap takes at least 224x224" in capsys.readouterr().err
    fcn_jax.save_weights(fcn_jax.create_model("fcn8s", backbone="vgg11").backbone, tmp_path / "b.safetensors")
    assert main(["export", str(tmp_path / "b.safetensors"), "--format", "stablehlo", "--output",
                 str(tmp_path / "b.jaxexport")]) == 2
    assert "holds a bare VGG backbone" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"needs onnxruntime, .* pip install 'fcn-jax\[onnx\]'"):
        export(_model("fcn32s"), "onnx")
    assert main(["export", str(tmp_path / "h.safetensors"), "--format", "onnx", "--output",
                 str(tmp_path / "h.onnx")]) == 2
    assert "pip install 'fcn-jax[onnx]'" in capsys.readouterr().err
