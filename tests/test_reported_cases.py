"""The second round of reported bad-input cases (staged training, outputs over inputs, the dataset contract,
early stops, file modes, shared memory, messages): each test was written first and failed on the code as
reported."""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import fcn_jax
from fcn_jax import registry
from fcn_jax.cli import main
from fcn_jax.errors import DatasetError
from fcn_jax.models import MODELS
from tests.helpers import NARROW, make_voc_tree

PAPER_ARCHS = registry.archs(family="paper")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def narrow_paper_nets(monkeypatch):
    """The paper's nets (and the heatmap) with fc6/fc7 NARROW wide wherever fcn-jax builds them, so that the
    commands run as written on tiny sizes (4096 wide, fc6 alone is 103M weights)."""
    for arch in (*PAPER_ARCHS, "heatmap"):
        cls = MODELS[arch]
        narrow = type(cls.__name__, (cls,), {"__init__": functools.partialmethod(cls.__init__, fc_width=NARROW)})
        monkeypatch.setitem(registry.family_of(arch).archs, arch, narrow)


def _paper_file(path: Path, arch: str, seed: int, num_classes: int = 21) -> Path:
    fcn_jax.save_weights(fcn_jax.create_model(arch, num_classes=num_classes, backbone="vgg11", seed=seed), path)
    return path


def _tensor(path: Path, key: str) -> np.ndarray:
    from fcn_jax.weights.native import read_weights

    return read_weights(path)[1][key]


# --- staged training: the previous stage wins ------------------------------------------------------------------


@pytest.mark.slow
def test_init_weights_win_over_backbone_weights_and_the_note_names_each_layers_file(tmp_path, narrow_paper_nets,
                                                                                      caplog):
    from fcn_jax.training.config import resolve_config
    from fcn_jax.training.setup import _load_init_weights
    from fcn_jax.weights.native import flat_variables

    heat = _paper_file(tmp_path / "heat.safetensors", "heatmap", seed=1, num_classes=1000)
    fcn32s = _paper_file(tmp_path / "fcn32s.safetensors", "fcn32s_paper", seed=2)
    config = resolve_config("voc-fcn16s-paper", data_dir="data", backbone="vgg11", backbone_weights=str(heat),
                            init_weights=str(fcn32s))
    model = fcn_jax.create_model("fcn16s_paper", backbone="vgg11", seed=3)
    with caplog.at_level("INFO", logger="fcn_jax"):
        _load_init_weights(model, config)
    for key in ("vgg.fc6.kernel", "vgg.fc7.bias", "vgg.backbone.convs.0.kernel", "score_fr.kernel"):
        got = np.asarray(flat_variables(model)[key][...])
        np.testing.assert_array_equal(got, _tensor(fcn32s, key), err_msg=key)  # the trained 32s, not ImageNet
    notes = caplog.text
    copied = notes.split(f"from {fcn32s} (--init-weights): ")[1].split(";")[0]
    assert "vgg.backbone.convs.0" in copied and "vgg.fc6" in copied and "score_fr" in copied
    assert f"from {heat}" not in notes  # every layer it has is overridden by the later stage
    assert "left at their initial values: score_pool4" in notes


def test_a_stage_with_init_weights_needs_no_backbone_weights_file(tmp_path):
    from fcn_jax.training.config import resolve_config

    config = resolve_config("voc-fcn16s-paper", data_dir="data", init_weights="runs/fcn32s/best.safetensors")
    assert config.backbone_weights is None  # the preset's ImageNet file is not needed (nor looked for)
    assert resolve_config("voc-fcn32s-paper", data_dir="data").backbone_weights == "vgg16_heatmap.safetensors"


def test_the_backbone_weights_hint_follows_the_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root, _ = make_voc_tree(tmp_path / "data")
    assert main(["train", "--preset", "voc-fcn32s-paper", "--data-dir", str(root), "--backbone", "vgg11",
                 "--run-dir", "r", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--backbone-weights vgg11_heatmap.safetensors: no such file" in err
    assert "fcn-jax convert --torchvision vgg11 --arch heatmap --output vgg11_heatmap.safetensors" in err


@pytest.mark.exhaustive
def test_the_readmes_three_stage_paper_recipe_runs_as_written(tmp_path, monkeypatch, narrow_paper_nets, capsys):
    monkeypatch.chdir(tmp_path)
    root, _ = make_voc_tree(tmp_path / "data")
    _paper_file(tmp_path / "vgg11_heatmap.safetensors", "heatmap", seed=1, num_classes=1000)
    tiny = ["--data-dir", str(root), "--backbone", "vgg11", "--epochs", "1", "--overlays", "0", "--workers", "0",
            "--no-progress"]
    assert main(["train", "--preset", "voc-fcn32s-paper", "--run-dir", "runs/fcn32s", *tiny]) == 0
    (tmp_path / "vgg11_heatmap.safetensors").unlink()  # the later stages start from the earlier ones only
    capsys.readouterr()
    assert main(["train", "--preset", "voc-fcn16s-paper", "--init-weights", "runs/fcn32s/best.safetensors",
                 "--run-dir", "runs/fcn16s", *tiny]) == 0
    err = capsys.readouterr().err
    assert "vgg.backbone.convs.0" in err.split("from runs/fcn32s/best.safetensors (--init-weights): ")[1]
    assert main(["train", "--preset", "voc-fcn8s-paper", "--init-weights", "runs/fcn16s/best.safetensors",
                 "--run-dir", "runs/fcn8s", *tiny]) == 0
    err = capsys.readouterr().err
    assert "from runs/fcn16s/best.safetensors (--init-weights)" in err and "score_pool4" in err
    assert fcn_jax.load_model("runs/fcn8s/final.safetensors").arch == "fcn8s_paper"


# --- no command writes over one of its inputs ------------------------------------------------------------------


def test_notes_still_show_after_a_caller_puts_the_loggers_level_back_to_unset(capsys):
    """Seen in the suite: code that sets the fcn_jax logger's level and puts it back (pytest's caplog.at_level)
    left it unset with the library's handler already attached, so every later note fell below the root logger's
    WARNING and vanished."""
    import logging

    from fcn_jax.notes import LOGGER, note

    log = logging.getLogger(LOGGER)
    note("the handler is attached")
    saved = log.level
    try:
        log.setLevel(logging.NOTSET)
        note("after the reset")
        assert "note: after the reset" in capsys.readouterr().err
        log.setLevel(logging.WARNING)  # a level the caller chose is kept
        note("silenced")
        assert "silenced" not in capsys.readouterr().err
    finally:
        log.setLevel(saved)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "fcn.safetensors"
    model = fcn_jax.create_model("fcn32s", num_classes=3, backbone="vgg11", seed=0)
    fcn_jax.save_weights(model, path, class_names=["a", "b", "c"], normalization="imagenet")
    return path


def _refused(argv, capsys, *, what: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would overwrite" in err and what in err, err
    return err


def test_export_refuses_to_write_over_its_weights(small_weights, capsys):
    before = small_weights.read_bytes()
    _refused(["export", str(small_weights), "--format", "stablehlo", "--output", str(small_weights)], capsys,
             what=str(small_weights))
    relative = os.path.relpath(small_weights)  # the same file by another name
    _refused(["export", relative, "--format", "onnx", "--output", str(small_weights)], capsys, what="weights")
    assert small_weights.read_bytes() == before


def test_convert_refuses_to_write_over_its_input(small_weights, capsys, tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to(small_weights)
    before = small_weights.read_bytes()
    _refused(["convert", "--input", str(small_weights), "--output", str(link)], capsys, what="--input")
    assert small_weights.read_bytes() == before


def test_heatmap_refuses_to_draw_over_its_image(tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(image)
    before = image.read_bytes()
    _refused(["heatmap", str(tmp_path / "missing.safetensors"), str(image), "--output", str(image)], capsys,
             what="image")
    assert image.read_bytes() == before


def test_predict_refuses_outputs_that_are_its_inputs(small_weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.png", "x_mask.png"):  # x's mask would be written over the input x_mask.png
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / name)
    before = (photos / "x_mask.png").read_bytes()
    _refused(["predict", str(small_weights), str(photos), "--output", str(photos), "--workers", "0"], capsys,
             what="x_mask.png")
    assert (photos / "x_mask.png").read_bytes() == before


def test_evaluate_refuses_to_write_over_the_runs_config(small_weights, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(small_weights.read_bytes())
    (run / "config.json").write_text('{"dataset": "synthetic", "synthetic_size": 32, "synthetic_val": 4, "seed": 0}')
    before = (run / "config.json").read_text()
    _refused(["evaluate", str(run), "--output", str(run / "config"), "--workers", "0", "--no-progress"], capsys,
             what="config.json")
    assert (run / "config.json").read_text() == before


# --- writing files ---------------------------------------------------------------------------------------------


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(small_weights, capsys):
    assert main(["export", str(small_weights), "--format", "stablehlo", "--output", "/proc/x.jaxexport",
                 "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "cannot write /proc/x.jaxexport" in err and "Traceback" not in err


def test_temporary_file_cleanup_never_hides_the_real_error(tmp_path, monkeypatch):
    from fcn_jax.atomic_files import atomic_target
    from fcn_jax.errors import FcnJaxError

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(FcnJaxError, match=r"cannot write .*out.bin: .*No space left on device"), \
            atomic_target(tmp_path / "out.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_weights_files_are_written_with_the_processs_umask(tmp_path, umask):
    model = fcn_jax.VGGBackbone("vgg11", rngs=nnx.Rngs(0))
    previous = os.umask(umask)
    try:
        path = fcn_jax.save_weights(model, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- the dataset contract, the same with and without workers ------------------------------------------------------


class _Samples:
    """A user's dataset returning ``image`` and ``label`` for every index."""

    num_classes, class_names, ignore_index = 3, ("a", "b", "c"), 255
    palette = np.zeros((3, 3), np.uint8)

    def __init__(self, image: np.ndarray, label: np.ndarray):
        self.image, self.label = image, label

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.image, self.label

    def image_sizes(self):
        return [self.image.shape[:2]] * 4


GOOD_IMAGE, GOOD_LABEL = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)
BROKEN_CONTRACTS = {
    "float image": (np.random.default_rng(0).random((32, 32, 3), dtype=np.float32), GOOD_LABEL,
                    "image is float32; expected uint8"),
    "2-D image": (np.zeros((32, 32), np.uint8), GOOD_LABEL, "image has shape (32, 32); expected (H, W, 3)"),
    "label of another size": (GOOD_IMAGE, np.zeros((31, 32), np.uint8),
                              "label has shape (31, 32); expected (32, 32), the image's height and width"),
    "float label": (GOOD_IMAGE, np.zeros((32, 32), np.float32), "label is float32; expected integers"),
}


@pytest.mark.parametrize("case,workers", [  # through worker processes: one case in `make test`, all exhaustive
    *((case, 0) for case in sorted(BROKEN_CONTRACTS)),
    *(pytest.param(case, 1, marks=pytest.mark.slow if case == "2-D image" else pytest.mark.exhaustive)
      for case in sorted(BROKEN_CONTRACTS))])
def test_a_sample_that_breaks_the_dataset_contract_is_named(case, workers):
    from fcn_jax.data import Loader
    from fcn_jax.data.pipeline import EvalBatches

    image, label, expected = BROKEN_CONTRACTS[case]
    data = _Samples(image, label)
    for batches in (Loader(data, 2, normalization=None, workers=workers),
                    EvalBatches(data, 2, workers=workers, sizes=[(32, 32)] * 4)):
        with batches, pytest.raises(DatasetError) as raised:
            next(iter(batches))
        assert "sample " in str(raised.value) and expected in str(raised.value), str(raised.value)


# --- a stop request is honoured from the first second --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("after", ["the lock", "its first line"])
def test_sigterm_before_the_first_step_says_so_and_leaves_nothing_behind(tmp_path, after):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fcn_jax.cli", "train", "--run-dir", str(run_dir), "--synthetic-size", "32",
               "--synthetic-train", "64", "--synthetic-val", "8", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    if after == "the lock":  # inside train(): datasets, model, compilation
        while not (run_dir / ".lock").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
    else:  # still importing: as soon as the command catches SIGTERM (its first line), long before JAX loads
        _wait_until_sigterm_is_caught(proc.pid, deadline)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "SIGTERM" in err and ("nothing was trained yet" in err or "wrote the checkpoint of step" in err), err
    assert "Traceback" not in err
    assert not (run_dir / ".lock").exists()
    if "nothing was trained yet" in err:
        assert "start it again with the same command" in err.lower()


def _wait_until_sigterm_is_caught(pid: int, deadline: float) -> None:
    """Until the process has a SIGTERM handler (Linux: bit 15 of SigCgt in /proc/PID/status; elsewhere one
    second). A signal sent before that, while Python itself starts, would kill it before any code of ours runs."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(1.0)
        return
    while time.monotonic() < deadline and status.exists():  # gone: it exited, and the test says how
        caught = next((line for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught.split()[-1], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)


# --- options that depend on the weights, and messages ------------------------------------------------------------


@pytest.fixture(scope="module")
def heatmap_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heat") / "heat.safetensors"
    model = MODELS["heatmap"](5, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(0))
    fcn_jax.save_weights(model, path, class_names=list("abcde"))
    return path


def test_heatmap_top_beyond_the_classes_is_refused_before_work(heatmap_file, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(image)
    assert main(["heatmap", str(heatmap_file), str(image), "--output", str(tmp_path / "o.png"), "--top", "5000"]) == 2
    assert "--top 5000: the model has 5 classes" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_heatmap_on_a_bad_image_does_not_suggest_options_it_lacks(heatmap_file, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["heatmap", str(heatmap_file), str(bad), "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "not a readable image" in err and "--skip-bad-samples" not in err and "split" not in err


def test_a_pth_given_where_fcn_jax_weights_belong_names_fcn_jax_convert(tmp_path, capsys, torch):
    pth = tmp_path / "fcn8s.pth"
    torch.save({"conv1_1.weight": torch.zeros(1)}, pth)
    assert main(["export", str(pth), "--format", "stablehlo", "--output", str(tmp_path / "x.jaxexport")]) == 2
    err = capsys.readouterr().err
    assert "is a PyTorch file" in err and f"fcn-jax convert --input {pth}" in err


@pytest.mark.slow
def test_converting_a_paper_file_into_another_paper_head_is_one_clear_error(tmp_path, capsys, torch):
    from fcn_jax.pytorch.paper_reference import build_paper_model

    pth = tmp_path / "fcn8s_paper.pth"
    torch.save(build_paper_model("fcn8s_paper", 3, "vgg11", fc_width=NARROW).state_dict(), pth)
    assert main(["convert", "--input", str(pth), "--arch", "fcn16s_paper", "--output",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "fcn8s_paper" in err and "Traceback" not in err


def test_onnx_scores_come_out_in_the_classes_layout(small_weights, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from fcn_jax.deploy.exporting import export

    data = export(fcn_jax.load_model(small_weights), "onnx", with_preprocessing=True, scores=True)
    classes, scores = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
        None, {"images": np.zeros((2, 40, 50, 3), np.uint8)})
    assert classes.shape == (2, 40, 50) and scores.shape == (2, 40, 50, 3)


# --- shared memory too small for a batch -----------------------------------------------------------------------------


def test_a_shared_memory_mount_too_small_for_a_batch_is_named_with_the_fix(monkeypatch):
    from fcn_jax.data import workers

    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    fallocate = os.posix_fallocate

    def room_for_the_labels_only(fd, offset, length):
        if length > 1 << 17:
            raise OSError(errno.ENOSPC, "No space left on device")
        fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", room_for_the_labels_only)
    with pytest.raises(DatasetError) as raised:  # the labels' block is made, then the images' does not fit
        workers._to_shared({"label": np.zeros((4, 64, 64), np.int32), "image": np.zeros((4, 64, 64, 3), np.float32)})
    message = str(raised.value)
    assert "/dev/shm" in message and "--workers 0" in message and "--shm-size" in message
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) == before  # no segment leaked


@pytest.mark.exhaustive
def test_a_tiny_shared_memory_mount_in_a_real_run(tmp_path):
    # A 1 MiB /dev/shm in a private mount namespace, where this machine allows one (root, unshare).
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here")
    script = ("mount -t tmpfs -o size=1m tmpfs /dev/shm && exec " + " ".join([
        sys.executable, "-m", "fcn_jax.cli", "train", "--run-dir", str(tmp_path / "run"), "--synthetic-size", "64",
        "--synthetic-train", "64", "--synthetic-val", "16", "--workers", "2", "--no-progress"]))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "/dev/shm" in proc.stderr and "--shm-size" in proc.stderr
    assert "leaked" not in proc.stderr and "Traceback" not in proc.stderr
