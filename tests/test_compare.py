"""`fcn-jax compare`: the report, its JSON, its exit code, and that it catches a real difference."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.pytorch import compare as compare_module
from fcn_jax.pytorch import parity, speed
from fcn_jax.pytorch.parity import random_reference

TINY = ["--arch", "fcn16s", "--backbone", "vgg11", "--batch-norm", "--num-classes", "3", "--size", "32x64",
        "--repeats", "1", "--warmup", "0", "--no-progress"]
ROWS = [f"{s} {n}" for s in ("eval", "train") for n in ("x1", "x2", "x3", "x4", "x5", "logits")] + [
    "train loss", "step gradients", "step bn stats", "step parameters"]


@pytest.mark.slow
def test_compare_reports_fidelity_and_speed(torch, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = main(["compare", *TINY, "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for row in ROWS:
        assert f"  {row} " in text, row
    assert "train step (ms)" in text and "JAX/PyTorch" in text and "environment: JAX" in text
    report = json.loads(out.read_text())
    assert report["ok"] and [f"{c['section']} {c['name']}" for c in report["checks"]] == ROWS
    # float32 runs also measure both frameworks against PyTorch in float64
    assert all(c["jax_vs_float64"] is not None and c["torch_vs_float64"] is not None for c in report["checks"])
    assert all(c["relative"] <= 1e-2 for c in report["checks"])
    for framework in ("jax", "torch"):
        t = report["timings"][framework]
        assert t["forward_ms"] > 0 and t["step_ms"] > 0 and len(t["step_all_ms"]) == 1
        assert t["step_page_faults"] >= 0 and t["step_system_ms"] >= 0 and t["forward_page_faults"] >= 0
    assert "train step page faults" in text and "train step system CPU (ms)" in text
    assert report["timings"]["jax"]["compile_step_s"] > 0 and report["flops"]["step"] > report["flops"]["forward"] > 0
    assert report["jax_over_torch"]["step"] > 0
    assert report["environment"]["torch_threads"] >= 1 and report["environment"]["jax_devices"]


def test_speed_table_points_at_the_allocator_when_steps_page_fault():
    def timing(faults):
        return speed.Timing(forward_ms=10.0, step_ms=30.0, forward_all_ms=[10.0], step_all_ms=[30.0],
                                     step_page_faults=faults, step_system_ms=5.0)

    flops = {"forward": 1e9, "step": 3e9}
    quiet = speed.format_speed({"jax": timing(100), "torch": timing(200)}, flops, 2, 1)
    assert not any("GLIBC_TUNABLES" in line for line in quiet)
    assert any(line.split()[:4] == ["train", "step", "page", "faults"] and line.split()[4:] == ["100", "200"]
               for line in quiet)
    noisy = speed.format_speed({"jax": timing(126_000), "torch": timing(200)}, flops, 2, 1)
    assert any("GLIBC_TUNABLES" in line for line in noisy)


@pytest.mark.exhaustive
def test_compare_float64_is_exact_to_1e8(torch):
    result = compare_module.compare(arch="fcns", backbone="vgg11", batch_norm=True, num_classes=3, size=(32, 32),
                                    float64=True, speed=False, progress=False)
    assert result.ok and result.config["dtype"] == "float64"
    assert max(c.relative for c in result.checks) <= 1e-8
    assert all(c.jax_vs_float64 is None for c in result.checks)


@pytest.mark.exhaustive
def test_compare_covers_the_paper_nets_at_any_size(torch):
    # Full width (fc6 alone holds 103M weights at 4096 channels): compare builds what users load.
    result = compare_module.compare(arch="fcn8s_atonce_paper", backbone="vgg11", num_classes=3, batch_size=1,
                                    size=(5, 7), speed=False, progress=False)
    assert result.ok and "dropout off" in result.config["model"]
    rows = [f"{c.section} {c.name}" for c in result.checks]
    assert rows == [row for row in ROWS if row != "step bn stats"]  # no BatchNorm in the paper's nets
    assert max(c.relative for c in result.checks) <= 1e-4


@pytest.mark.slow
def test_compare_fails_on_a_real_difference(torch, monkeypatch, capsys):
    """An error of 5% of the largest gradient in one tensor (a wrong layout or BN formula gives
    far more; the max-pool bug found by this tool gave 60%) exits 1."""
    real = parity.jax_results

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        grads = out["step gradients"]
        grads["deconv3.weight"] = grads["deconv3.weight"] + 5e-2 * max(np.abs(g).max() for g in grads.values())
        return out

    monkeypatch.setattr(parity, "jax_results", off_by_a_little)
    assert main(["compare", *TINY, "--no-speed"]) == 1
    captured = capsys.readouterr()
    assert "OVER TOLERANCE: step gradients" in captured.out and "(worst: deconv3.weight)" in captured.out
    assert "differ by more than the tolerance" in captured.err


@pytest.mark.exhaustive  # CI: the loading itself in test_cli.py (convert --verify) and test_weights.py
def test_compare_loads_weights_files(torch, tmp_path):
    tm = random_reference("fcn8s", 4, "vgg11", False, seed=3)
    pth = tmp_path / "ref.pth"
    torch.save(tm.state_dict(), pth)
    model, _, name = compare_module.build_pair("fcn8s", weights=pth)
    assert (model.num_classes, model.backbone.name, model.backbone.batch_norm) == (4, "vgg11", False)
    assert "ref.pth" in name
    np.testing.assert_array_equal(fcn_jax.to_torch_state_dict(model)["classifier.weight"],
                                  tm.state_dict()["classifier.weight"].numpy())
    st = tmp_path / "m.safetensors"
    fcn_jax.save_weights(model, st)
    model2, twin2, _ = compare_module.build_pair("fcn32s", weights=st)  # the file's own arch wins
    assert model2.arch == "fcn8s" and type(twin2).__name__ == "FCN8s"
    np.testing.assert_array_equal(twin2.state_dict()["deconv1.weight"].numpy(),
                                  tm.state_dict()["deconv1.weight"].numpy())


@pytest.mark.parametrize("args,message", [
    (["--size", "40x64"], "multiple of 32"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--arch", "fcn8s_paper", "--batch-norm"], "fcn8s_paper has no BatchNorm"),
])
def test_compare_bad_arguments(torch, capsys, args, message):
    assert main(["compare", "--backbone", "vgg11", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_json_path_that_is_a_folder_is_refused_before_comparing(torch, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare_module, "build_pair", lambda *a, **k: pytest.fail("compared before checking --json"))
    assert main(["compare", *TINY, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_on_nan_weights_says_so(torch, tmp_path, capsys):
    import jax.numpy as jnp

    model = fcn_jax.create_model("fcn16s", num_classes=3, backbone="vgg11", batch_norm=True)
    model.classifier.kernel[...] = jnp.full(model.classifier.kernel.shape, jnp.nan)
    fcn_jax.save_weights(model, tmp_path / "nan.safetensors")
    assert main(["compare", *TINY, "--weights", str(tmp_path / "nan.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "nan.safetensors: classifier.kernel holds NaN or infinite values" in err
