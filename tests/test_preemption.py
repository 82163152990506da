"""A real training process told to stop (SIGTERM from a scheduler, Ctrl-C from a user) finishes its step,
writes a checkpoint of it, says how to resume and exits with 75; resuming ends bit-identical to a run that
was never interrupted, as it does after SIGKILL. Single process and two processes (jax.distributed on localhost)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import assert_same_weights, checkpoint_steps, cpu_env

EXIT_STOPPED = 75
FINAL = "final.safetensors"
SMALL = ["--no-progress", "--synthetic-size", "32", "--synthetic-train", "96", "--synthetic-val", "32",
         "--batch-size", "8", "--epochs", "2", "--checkpoint-every-steps", "100", "--workers", "1",
         "--overlays", "0", "--log-every-steps", "1"]

pytestmark = pytest.mark.slow


def _train(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fcn_jax.cli", "train", "--run-dir", str(run_dir), *SMALL, *extra]


def _wait_until(done, proc, what: str, timeout=600) -> None:
    """Until ``done()`` is true while ``proc`` still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(f"training never {what}")


def _wait_for_step(run_dir: Path, step: int, proc) -> None:
    """Until metrics.jsonl has logged ``step`` (training is under way, mid-epoch)."""
    log = run_dir / "metrics.jsonl"
    _wait_until(lambda: log.is_file() and f'"step": {step},' in log.read_text(), proc, f"reached step {step}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_train(run_dir), env=cpu_env(), check=True, capture_output=True, timeout=600)
    return run_dir / FINAL


def _stop_with(sig, run_dir: Path, proc, after_step: int) -> int:
    """Send ``sig`` once ``after_step`` is logged; the run must finish its step, checkpoint it, say how to resume and
    exit with 75. Returns the step it stopped at."""
    _wait_for_step(run_dir, after_step, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = checkpoint_steps(run_dir)[-1]
    assert after_step <= stopped < 12, stopped  # the step in progress, not an epoch end
    text = out + err
    assert f"stopped at step {stopped}" in text and f"checkpoint of step {stopped}" in text
    assert f"fcn-jax train --resume --run-dir {run_dir}" in text
    return stopped


@pytest.mark.xdist_group("straight")
# Exhaustive: four training processes (90 s). CI: test_run_folder.py's in-process stop request and a kill's damaged
# checkpoints; SIGTERM before the first step in test_reported_cases.py (a real process, exit 75)
@pytest.mark.exhaustive
def test_stopped_then_killed_then_resumed_is_bit_identical(straight, tmp_path):
    """SIGTERM mid-epoch checkpoints the step in progress; the resumed run, killed by SIGKILL (no handler runs)
    somewhere inside a later step or save, resumes again from its last whole checkpoint; the result is the
    uninterrupted run's to the bit, although that one never checkpointed mid-epoch (every 5 steps here)."""
    run_dir = tmp_path / "run"
    every_5 = ("--checkpoint-every-steps", "5")
    proc = subprocess.Popen(_train(run_dir, *every_5), env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stopped = _stop_with(signal.SIGTERM, run_dir, proc, after_step=2)  # an epoch is 12 steps

    proc = subprocess.Popen(_train(run_dir, *every_5, "--resume"), env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_until(lambda: checkpoint_steps(run_dir)[-1] >= 10, proc, "checkpointed step 10")
    time.sleep(0.7)  # land somewhere inside a later step or save
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final.safetensors").exists() and checkpoint_steps(run_dir)[0] >= stopped

    resumed = subprocess.run(_train(run_dir, *every_5, "--resume"), env=cpu_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(straight, run_dir / FINAL)


@pytest.mark.xdist_group("straight")
@pytest.mark.exhaustive  # CI: SIGTERM, the same handler, in test_run_folder.py's stop request
def test_ctrl_c_checkpoints_the_step_and_resume_is_bit_identical(straight, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train(run_dir), env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _stop_with(signal.SIGINT, run_dir, proc, after_step=3)
    resumed = subprocess.run(_train(run_dir, "--resume"), env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(straight, run_dir / FINAL)


@pytest.mark.exhaustive  # a training process of its own for one message (20 s); CI: SIGTERM's stop
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train(run_dir, "--epochs", "50"), env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    seen = [proc.stderr.readline()]
    while seen[-1] and "SIGINT received" not in seen[-1]:  # Python folds signals that arrive within one step
        seen.append(proc.stderr.readline())
    proc.send_signal(signal.SIGINT)
    start = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - start < 10
    err = "".join(seen) + err
    assert proc.returncode == 130 and "second Ctrl-C" in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(run_dir: Path, *extra: str) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(_train(run_dir, "--distributed", "--coordinator", coordinator, "--num-processes", "2",
                                    "--process-id", str(pid), *extra),
                             env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in range(2)]


def _finish(procs) -> list[tuple[int, str]]:
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out + err) for p, (out, err) in zip(procs, results, strict=True)]


@pytest.mark.exhaustive  # six processes (5 min); CI: the one-process stop above, eight devices in test_multidevice.py
def test_two_processes_stop_at_the_same_step_and_resume_bit_identical(tmp_path):
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    for code, text in _finish(_two_processes(straight_dir)):
        assert code == 0, text[-3000:]
    procs = _two_processes(run_dir)
    _wait_for_step(run_dir, 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)  # a scheduler may tell one host first: both must stop together
    results = _finish(procs)
    for code, text in results:
        assert code == EXIT_STOPPED, text[-3000:]
    steps = checkpoint_steps(run_dir)
    assert all(f"stopped at step {steps[-1]}" in text for _, text in results), [t[-500:] for _, t in results]
    for code, text in _finish(_two_processes(run_dir, "--resume")):
        assert code == 0, text[-3000:]
    assert_same_weights(straight_dir / FINAL, run_dir / FINAL)
