"""`fcn-jax convert` / `summary` and the top-level convert.py, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.pytorch.parity import random_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fcn_pth(torch, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "fcn16s.pth"
    torch.save(random_reference("fcn16s", 6, "vgg11", True, seed=8).state_dict(), path)
    return path


@pytest.mark.slow
def test_convert_whole_fcn_with_verify(fcn_pth, tmp_path, capsys):
    out = tmp_path / "fcn16s.safetensors"
    rc = main(["convert", "--input", str(fcn_pth), "--arch", "fcn16s", "--output", str(out), "--verify",
               "--verify-size", "64x64"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"wrote {out}" in text and "verify logits" in text
    rel = float(text.split("relative = ")[1].split()[0])
    assert rel <= 1e-5
    model = fcn_jax.load_model(out)
    assert (model.arch, model.num_classes, model.backbone.name, model.backbone.batch_norm) == ("fcn16s", 6, "vgg11",
                                                                                               True)


@pytest.mark.slow
def test_convert_back_to_pth_round_trips(fcn_pth, tmp_path, torch):
    mid, back = tmp_path / "m.safetensors", tmp_path / "back.pth"
    assert main(["convert", "--input", str(fcn_pth), "--arch", "fcn16s", "--output", str(mid)]) == 0
    assert main(["convert", "--input", str(mid), "--output", str(back)]) == 0
    original, again = torch.load(fcn_pth, weights_only=True), torch.load(back, weights_only=True)
    assert list(original) == list(again)
    for k in original:
        assert torch.equal(original[k], again[k]), k


def test_convert_needs_arch_for_a_whole_fcn(fcn_pth, tmp_path, capsys):
    assert main(["convert", "--input", str(fcn_pth), "--output", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fcn-jax: error: this is a whole FCN checkpoint: pass --arch")


def test_convert_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["convert", "--input", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def _fake_hub(torch_state_dict=None):
    def load_state_dict_from_url(url, *args, **kwargs):
        if torch_state_dict is None:
            raise urllib.error.URLError("Name or service not known")
        return torch_state_dict
    return load_state_dict_from_url


def test_torchvision_download_failure_says_what_to_do(monkeypatch, tmp_path, capsys, torch):
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", _fake_hub())
    assert main(["convert", "--torchvision", "vgg16_bn", "--output", str(tmp_path / "v.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "could not download torchvision's vgg16_bn weights from https://download.pytorch.org/models/" in err
    assert "pass it with --input" in err
    assert main(["convert", "--torchvision", "resnet50", "--output", str(tmp_path / "v.safetensors")]) == 2


@pytest.mark.slow
def test_torchvision_weights_build_an_fcn_around_the_backbone(monkeypatch, tmp_path, capsys, torch):
    import torchvision
    import torchvision.models._api as api

    tv = torchvision.models.vgg11(weights=None)
    # torchvision's keys; its fully connected classifier (ignored by the conversion) 8 wide instead of 4096, ~0.5 GB
    # less at this test's peak
    for i, (fan_in, fan_out) in zip((0, 3, 6), ((512 * 7 * 7, 8), (8, 8), (8, 1000)), strict=True):
        tv.classifier[i] = torch.nn.Linear(fan_in, fan_out)
    monkeypatch.setattr(api, "load_state_dict_from_url", _fake_hub(tv.state_dict()))
    out = tmp_path / "fcn8s.safetensors"
    rc = main(["convert", "--torchvision", "vgg11", "--arch", "fcn8s", "--num-classes", "3", "--output", str(out),
               "--verify", "--verify-size", "32x32"])
    assert rc == 0, capsys.readouterr()
    model = fcn_jax.load_model(out)
    np.testing.assert_array_equal(model.backbone.convs[0].kernel[...],
                                  tv.features[0].weight.detach().numpy().transpose(2, 3, 1, 0))


@pytest.mark.slow
def test_verify_failure_exits_1(fcn_pth, tmp_path, monkeypatch, capsys):
    from fcn_jax.pytorch import parity

    monkeypatch.setattr(parity, "compare_outputs", lambda *a, **k: [parity.Difference("logits", 1.0, 2.0)])
    rc = main(["convert", "--input", str(fcn_pth), "--arch", "fcn16s", "--output", str(tmp_path / "x.safetensors"),
               "--verify"])
    assert rc == 1 and "verification failed" in capsys.readouterr().err


def test_summary_command(capsys):
    assert main(["summary", "--arch", "fcn32s", "--backbone", "vgg16", "--num-classes", "21"]) == 0
    text = capsys.readouterr().out
    assert "FCN32s(vgg16, batch_norm=False, num_classes=21)" in text
    assert "14,714,688" in text  # torchvision vgg16.features


def test_entry_points_run():
    for cmd in ([sys.executable, "convert.py", "--help"], [sys.executable, "-m", "fcn_jax.cli", "summary", "--help"]):
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
