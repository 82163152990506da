"""Every training option is checked before anything runs: one line naming the option and what it takes,
exit 2, nothing written. Resuming refuses what would silently change the run, and allows the learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_jax.cli import main
from fcn_jax.errors import TrainingDiverged
from fcn_jax.training.config import resolve_config
from fcn_jax.training.run import train

SMALL = ["--synthetic-size", "32", "--synthetic-train", "32", "--synthetic-val", "16", "--batch-size", "16",
         "--workers", "1", "--overlays", "0", "--no-progress"]


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--momentum", "5"], "--momentum must be in [0, 1), got 5.0"),
    (["--scale", "0,0"], "--scale takes MIN,MAX with 0 < MIN <= MAX, got 0.0,0.0"),
    (["--scale", "2,1"], "--scale takes MIN,MAX with 0 < MIN <= MAX, got 2.0,1.0"),
    (["--crop", "0x64"], "--crop must be positive, got 0x64"),
    (["--synthetic-val", "0"], "--synthetic-val must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--log-every-steps", "0"], "--log-every-steps must be >= 1, got 0"),
    (["--eval-every-epochs", "0"], "--eval-every-epochs must be >= 1, got 0"),
    (["--ignore-index", "300"], "--ignore-index must be in [0, 255] (masks are 8-bit), got 300"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    (["--class-weights", "1,-2"], "--class-weights must be >= 0 and finite, got 1.0,-2.0"),
])
def test_bad_options_are_refused_up_front(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert err == f"fcn-jax: error: {message}\n"
    assert not run_dir.exists()


def test_an_empty_pth_is_one_clear_line(tmp_path, capsys, torch):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert main(["convert", "--input", str(tmp_path / "empty.pth"), "--arch", "fcn8s",
                 "--output", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty.pth" in err and "empty" in err


def test_resume_refuses_a_preset(tmp_path, capsys):
    """Refused from the arguments alone, before the run folder is looked at (or created)."""
    run_dir = tmp_path / "run"
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--preset", "voc-fcn8s"]) == 2
    assert "--resume continues the run with its saved settings; --preset cannot change them" in capsys.readouterr().err
    assert not run_dir.exists()


def _folder_dataset(root: Path, names: list[str]) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nobject\n")
    rng = np.random.default_rng(0)
    for name in names:
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / "train" / f"{name}.png")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8)).save(root / "masks" / "train" / f"{name}.png")
    return root


@pytest.mark.exhaustive
def test_resume_refuses_a_training_split_that_changed(tmp_path, capsys):
    data = _folder_dataset(tmp_path / "data", [f"im{i}" for i in range(16)])
    run_dir = tmp_path / "run"
    args = ["--dataset", "folder", "--data-dir", str(data), "--val-split", "train", "--run-dir", str(run_dir),
            "--batch-size", "8", "--epochs", "2", "--workers", "1", "--overlays", "0", "--no-progress"]
    assert main(["train", *args, "--epochs", "1"]) == 0
    _folder_dataset(tmp_path / "more", ["extra"])
    for kind in ("images", "masks"):
        (tmp_path / "more" / kind / "train" / "extra.png").rename(data / kind / "train" / "extra.png")
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the training split changed since the run started (16 -> 17 samples)" in err


@pytest.mark.exhaustive
def test_after_a_nan_the_advice_works(tmp_path, monkeypatch):
    import fcn_jax.training.run as run

    real_step, calls = run.train_step, []

    def nan_at_step_3(*args):
        calls.append(1)
        loss = real_step(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(run, "train_step", nan_at_step_3)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as info:
        train(resolve_config(synthetic_size=32, synthetic_train=64, synthetic_val=16, batch_size=16, workers=1,
                             overlays=0, checkpoint_every_steps=1, run_dir=str(run_dir)), progress=False)
    advice = str(info.value)
    assert "the loss became nan at step 3" in advice and "the last good checkpoint is step 2" in advice
    assert f"fcn-jax train --resume --run-dir {run_dir} --lr 0.0001" in advice
    monkeypatch.undo()
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--lr", "0.0001", "--no-progress"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-4
