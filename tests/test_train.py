"""The training program end to end: it learns, writes its run directory, and stops cleanly on a NaN loss
(resuming to the bit after being killed or stopped: tests/test_preemption.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fcn_jax
from fcn_jax.cli import main
from fcn_jax.errors import ConfigError, TrainingDiverged
from fcn_jax.training.config import resolve_config
from fcn_jax.training.run import train

# 3 epochs of these learn to a mean IoU of 0.53 (the least class 0.39) on 2 CPU cores in ~20 s.
SMALL = dict(synthetic_size=32, synthetic_train=128, synthetic_val=64, batch_size=8, lr=3e-3, warmup_steps=5,
             workers=1, overlays=2)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    metrics = train(resolve_config(**SMALL, epochs=3, checkpoint_every_steps=20, run_dir=str(run_dir)), progress=False)
    return run_dir, metrics


@pytest.mark.xdist_group("short_run")
@pytest.mark.slow
def test_short_training_learns(short_run):
    _, metrics = short_run
    # Predicting background everywhere scores a mean IoU of about 0.18 here (and 0 on every shape).
    assert metrics["mean_iou"] > 0.45, metrics
    assert min(v for k, v in metrics["per_class_iou"].items() if k != "background") > 0.25, metrics


@pytest.mark.xdist_group("short_run")
@pytest.mark.slow
def test_run_directory_has_everything(short_run):
    run_dir, _ = short_run
    for name in ("config.json", "metrics.jsonl", "learning_curve.png", "best.safetensors", "final.safetensors",
                 "predictions/val_000.png", "predictions/val_001.png"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "val"}
    assert [r["step"] for r in records if r["kind"] == "val"] == [16, 32, 48]
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [40, 48]  # every 20 steps and every epoch end, the latest two kept (48 is also the best)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["synthetic_size"] == 32 and saved["epochs"] == 3
    info = json.loads((run_dir / "checkpoints" / "48" / "info" / "metadata").read_text())  # orbax JsonSave
    assert info["config"] == saved and info["step"] == 48 and info["best"]["step"] == 48
    model = fcn_jax.load_model(run_dir / "final.safetensors")
    assert model.arch == "fcns" and model.num_classes == 5


@pytest.mark.xdist_group("short_run")
@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_and_resume_refuses_other_settings(short_run, capsys):
    run_dir, _ = short_run
    assert main(["train", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "already holds a run (checkpoint at step 48): continue it with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", str(run_dir), "--epochs", "9", "--no-progress"]) == 2
    assert "--epochs 9 (the run has 3)" in capsys.readouterr().err


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    import optax
    from flax import nnx

    from fcn_jax.training.checkpoint import RunCheckpoints

    model = fcn_jax.VGGBackbone("vgg11", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    checkpoints = RunCheckpoints(tmp_path, keep=2)
    for step, miou in enumerate([0.1, 0.9, 0.2, None, 0.4], start=1):
        checkpoints.save(step, model, optimizer, {"epoch": 0, "batch": step}, {"step": step},
                         metrics=None if miou is None else {"mean_iou": miou})
    checkpoints.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 4, 5]
    data, info = RunCheckpoints(tmp_path, keep=2).restore(2, model, optimizer)
    assert data == {"epoch": 0, "batch": 2} and info == {"step": 2}


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from fcn_jax.training.checkpoint import RunCheckpoints

    config = resolve_config(**{**SMALL, "synthetic_train": 64, "lr": 1e30, "warmup_steps": 0}, schedule="constant",
                            checkpoint_every_steps=1, run_dir=str(tmp_path / "nan"))
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 2 \(epoch 1\); stopped without saving, "
                                               r"the last good checkpoint is step 1"):
        train(config, progress=False)
    assert RunCheckpoints(tmp_path / "nan" / "checkpoints", 2).latest_step() == 1


@pytest.mark.xdist_group("short_run")  # the short run's settings: its compiled step, on the same worker
@pytest.mark.slow
def test_non_finite_parameters_are_never_checkpointed(tmp_path, monkeypatch):
    """An update can turn the parameters to NaN while the loss (computed before it) is still finite."""
    import fcn_jax.training.run as run

    calls = []
    real = run.all_finite
    monkeypatch.setattr(run, "all_finite", lambda tree: calls.append(1) or (real(tree) & (len(calls) < 3)))
    config = resolve_config(**SMALL, epochs=3, checkpoint_every_steps=1, run_dir=str(tmp_path / "p"))
    with pytest.raises(TrainingDiverged, match=r"the parameters became NaN or infinite at step 3 .*last good "
                                               r"checkpoint is step 2"):
        train(config, progress=False)


@pytest.mark.exhaustive
def test_bfloat16_training_runs(tmp_path):
    config = resolve_config(**{**SMALL, "synthetic_train": 32, "synthetic_val": 16, "overlays": 0}, epochs=1,
                            dtype="bfloat16", run_dir=str(tmp_path / "bf16"))
    metrics = train(config, progress=False)
    assert 0 <= metrics["mean_iou"] <= 1
    model = fcn_jax.load_model(tmp_path / "bf16" / "final.safetensors")
    assert model.classifier.kernel[...].dtype == np.float32  # float32 master weights


def test_presets_and_bad_settings_give_clear_errors(tmp_path, capsys):
    assert main(["train", "--preset", "camvid-fcns-reference", "--run-dir", str(tmp_path / "c")]) == 2
    assert "--dataset camvid needs --data-dir" in capsys.readouterr().err
    config = resolve_config("camvid-fcns-reference")
    assert (config.optimizer, config.lr, config.weight_decay, config.loss, config.batch_size) == (
        "rmsprop", 1e-4, 1e-5, "bce", 6)
    with pytest.raises(ConfigError, match=r"--backbone-weights missing\.safetensors: no such file"):
        train(resolve_config(**SMALL, backbone_weights="missing.safetensors", run_dir=str(tmp_path / "w")))
    with pytest.raises(ConfigError, match="--class-weights has 2 values; the dataset has 5 classes"):
        train(resolve_config(**SMALL, class_weights=(1.0, 2.0), run_dir=str(tmp_path / "cw")))
