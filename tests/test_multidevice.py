"""One step function, several device layouts: 1 vs 8 CPU devices, and 2 processes x 2 devices vs
1 process x 4 devices (jax.distributed on localhost). Each layout runs tests/multidevice_worker.py
in its own process (CPU device counts are fixed at start-up)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fcn_jax
from fcn_jax.models import torch_feature_indices
from tests.helpers import cpu_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multidevice_worker.py"
# float32. The reduction order differs between device counts: 1 vs 8 devices measured 3.5e-6 at most (a BatchNorm
# bias); a different computation moves the results far more (per-device BatchNorm statistics normalise each image by
# its own mean instead of the batch's; a gradient summed instead of averaged is an 8x step). (In float64 the
# 8-device process took 5.1 GB, over the budget; now 2.9 GB.)
RTOL = 1e-4


@pytest.fixture
def weights(tmp_path) -> str:
    """The runs' initial model: FCN8s on vgg11_bn, 5 classes."""
    path = tmp_path / "start.safetensors"
    fcn_jax.save_weights(fcn_jax.create_model("fcn8s", num_classes=5, backbone="vgg11", batch_norm=True, seed=0), path)
    return str(path)


def _run(out: Path, weights: str, counts: str, devices_per_process: int) -> dict[int, dict]:
    result = subprocess.run([sys.executable, str(WORKER), str(out), weights, counts],
                            env=cpu_env(devices_per_process), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _by_count(out)


def _by_count(out: Path) -> dict[int, dict]:
    """The worker's runs by device count."""
    runs: dict[int, dict] = {}
    with np.load(out) as saved:
        for key in saved.files:
            count, name = key.split("/", 1)
            runs.setdefault(int(count), {})[name] = saved[key]
    return runs


def _assert_same_training(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=RTOL)
    # Conv biases right before a train-mode BatchNorm have a true gradient of zero: they hold only
    # rounding noise, compared against the model's scale instead of their own.
    zero_grad = {f"backbone.convs.{j}.bias" for j, (_, bn) in enumerate(torch_feature_indices("vgg11", True))
                 if bn is not None}
    for key in a:
        if key in ("losses", "devices"):
            continue
        scale = 1.0 if key in zero_grad else np.abs(a[key]).max()
        err = np.abs(a[key] - b[key]).max()
        assert err <= RTOL * scale, f"{key}: {err:.3e} > {RTOL} x {scale:.3e}"


@pytest.mark.slow
def test_eight_devices_train_like_one(tmp_path, weights):
    runs = _run(tmp_path / "runs.npz", weights, "1,8", 8)  # one process: the model's start-up is paid once
    one, eight = runs[1], runs[8]
    assert (int(one["devices"]), int(eight["devices"])) == (1, 8)
    _assert_same_training(one, eight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.exhaustive
def test_two_processes_train_like_one_process_with_four_devices(tmp_path, weights):
    coordinator = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "two.npz"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), weights, "4", coordinator, "2", str(pid)],
                              env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    try:
        logs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-3000:]
    two = _by_count(out)[4]
    four = _run(tmp_path / "four.npz", weights, "4", 4)[4]
    assert int(two["devices"]) == int(four["devices"]) == 4  # 2 processes x 2 devices vs 1 x 4
    _assert_same_training(four, two)
