"""One run per folder, and a resume that survives what stopped and killed runs leave behind: a lock taken before
anything is created or cleaned, stale locks of dead processes, a stop request's checkpoint, corrupt latest
checkpoints, half-written files."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fcn_jax.cli import main
from fcn_jax.training.config import resolve_config
from fcn_jax.training.run import resume, train
from tests.helpers import assert_same_weights, checkpoint_steps

ROOT = Path(__file__).resolve().parents[1]
# Batches loaded in the main process (a worker process costs ~2 s a run and epoch here): the runs' workers are
# tests/test_train.py's short run and tests/test_input_pipeline.py's, stopped and killed in tests/test_preemption.py.
SMALL = dict(synthetic_size=32, synthetic_train=64, synthetic_val=16, batch_size=16, workers=0, overlays=0,
             epochs=2, checkpoint_every_steps=3)


def _lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-11-25T10:00:00"}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _listing(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))}


def test_a_folder_in_use_is_refused_in_one_line_and_left_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _lock(run_dir, os.getpid())  # a live process holds the folder
    in_progress = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1764064800"
    in_progress.mkdir(parents=True)
    (in_progress / "part").write_text("being written")
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 5}\n')
    before = _listing(run_dir)
    for extra in ([], ["--resume"]):
        assert main(["train", "--run-dir", str(run_dir), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run_dir} is in use by process {os.getpid()} on {socket.gethostname()}" in err
        assert _listing(run_dir) == before  # the running run's in-progress checkpoint is still there


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished 2-epoch run (checkpoints at steps 3, 4, 6, 8), started over the stale lock of a dead process, and
    the notes it gave; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _lock(run_dir, _dead_pid())
    notes = io.StringIO()
    handler = logging.StreamHandler(notes)
    logging.getLogger("fcn_jax").addHandler(handler)
    try:
        train(resolve_config(**SMALL, keep_checkpoints=4, run_dir=str(run_dir)), progress=False)
    finally:
        logging.getLogger("fcn_jax").removeHandler(handler)
    return run_dir, notes.getvalue()


def _copy(run: tuple[Path, str], tmp_path: Path) -> Path:
    return Path(shutil.copytree(run[0], tmp_path / "run"))


@pytest.mark.xdist_group("finished_run")
@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(finished_run):
    run_dir, notes = finished_run
    assert "stale lock" in notes
    assert not (run_dir / ".lock").exists()  # released at the end


def test_a_lock_on_another_host_is_respected(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _lock(run_dir, 12345, host="some-other-host")
    assert main(["train", "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "in use by process 12345 on some-other-host" in err and "delete" in err


@pytest.mark.slow
def test_nothing_to_resume_is_one_line(tmp_path, capsys):
    """A run that stopped before its first checkpoint leaves config.json and an empty checkpoints/."""
    run = ["train", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    # test_train's NaN run's settings, so its compiled step
    assert main([*run, "--synthetic-size", "32", "--synthetic-train", "16", "--synthetic-val", "16",
                 "--batch-size", "8", "--lr", "1e30", "--warmup-steps", "0", "--schedule", "constant",
                 "--workers", "0", "--overlays", "0"]) == 2
    assert "no checkpoint had been written yet" in capsys.readouterr().err
    cli = [sys.executable, "-m", "fcn_jax.cli", *run]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # the 42 lines came from a race at interpreter exit: not every attempt showed them
        result = subprocess.run([*cli, "--resume"], capture_output=True, text=True, env=env)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "nothing to resume" in result.stderr


@pytest.mark.xdist_group("finished_run")
@pytest.mark.slow
def test_a_stop_request_checkpoints_the_step_in_progress_and_resume_is_bit_identical(finished_run, tmp_path,
                                                                                     monkeypatch):
    """SIGTERM to this very process after step 2 of a 4-step epoch (no periodic checkpoint there); resumed, the run
    ends as the uninterrupted one to the bit. Through real processes, with SIGKILL as well:
    tests/test_preemption.py (exhaustive tier)."""
    import fcn_jax.training.run as run
    from fcn_jax.training.stopping import TrainingStopped

    assert threading.current_thread() is threading.main_thread()  # else no handler: the signal would end pytest
    steps = []

    def step_then_sigterm(*args, **kwargs):
        out = run_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    run_step = run.train_step
    monkeypatch.setattr(run, "train_step", step_then_sigterm)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(resolve_config(**SMALL, keep_checkpoints=4, run_dir=str(run_dir)), progress=False)
    monkeypatch.undo()
    assert str(stopped.value).startswith(f"stopped at step 2 (epoch 1, batch 2 of 4) on SIGTERM: wrote the checkpoint "
                                         f"of step 2 to {run_dir / 'checkpoints'}. Resume with: fcn-jax train "
                                         f"--resume --run-dir {run_dir}")
    assert checkpoint_steps(run_dir) == [2] and not (run_dir / "final.safetensors").exists()
    resume(str(run_dir), progress=False)
    assert_same_weights(finished_run[0] / "final.safetensors", run_dir / "final.safetensors")


def _truncate_a_data_file(checkpoint: Path) -> Path:
    victim = max((p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    return victim


@pytest.mark.xdist_group("finished_run")
@pytest.mark.slow
def test_resume_falls_back_past_corrupt_checkpoints_and_cleans_half_written_files(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    assert checkpoint_steps(run_dir) == [3, 4, 6, 8]  # every 3 steps and at the end of each 4-step epoch
    uninterrupted = Path(shutil.copy(run_dir / "final.safetensors", tmp_path / "uninterrupted.safetensors"))
    _truncate_a_data_file(run_dir / "checkpoints" / "8")
    (run_dir / "checkpoints" / "6" / "data" / "metadata").write_text("{not json")
    half_written = run_dir / ".best.safetensors.tmp-4242"
    half_written.write_bytes(b"half")
    result = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "train", "--resume", "--run-dir", str(run_dir),
                             "--no-progress"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "skipped checkpoint 8" in text and "resumed from step 4" in text
    assert f"skipped checkpoint 6, which does not restore ({run_dir}/checkpoints/6/data/metadata is not" in text
    assert len(text.splitlines()) < 40, text[:3000]  # orbax's aborted restore alone printed 11,192 lines
    assert not half_written.exists()
    assert_same_weights(uninterrupted, run_dir / "final.safetensors")  # steps 5..8 again, bit for bit
    assert sorted(p.name.split("-")[0] for p in (run_dir / "damaged_checkpoints").iterdir()) == ["6", "8"]


@pytest.mark.xdist_group("finished_run")
@pytest.mark.slow
def test_no_restorable_checkpoint_says_which_failed_and_why_in_one_line(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    for step in checkpoint_steps(run_dir):
        _truncate_a_data_file(run_dir / "checkpoints" / str(step))
    result = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "train", "--resume", "--run-dir", str(run_dir),
                             "--no-progress"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr[:3000]
    assert "no checkpoint in" in result.stderr and "could be restored" in result.stderr
    assert "checkpoint 4: OUT_OF_RANGE" in result.stderr and "checkpoint 3: OUT_OF_RANGE" in result.stderr


@pytest.mark.xdist_group("finished_run")
@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.numpy

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--synthetic-size", "32", "--synthetic-train", "64",  # SMALL's:
                 "--synthetic-val", "16", "--batch-size", "16", "--epochs", "2", "--workers", "0",  # its programs
                 "--overlays", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"no space left on the device while writing {run_dir / 'best.safetensors'}" in err
    assert f"fcn-jax train --resume --run-dir {run_dir}" in err
    assert not list(run_dir.glob(".*.tmp-*"))  # nothing half-written
