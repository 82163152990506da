"""The accelerator-fed input path: samples read by worker processes, batches prefetched to the devices and
normalised there, the loss watched on device (no host sync between log points), the donating step."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fcn_jax
from fcn_jax.data import Augment, Loader, SyntheticShapes, normalize
from fcn_jax.data.normalization import normalize_on_device
from fcn_jax.data.pipeline import EvalBatches
from fcn_jax.devices import make_mesh, prefetch_to_devices, replicate_state
from fcn_jax.errors import ConfigError, DatasetError
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.meter import LossMeter
from fcn_jax.training.step import _train_step_in_place, _train_step_new_buffers, train_step
from tests.helpers import TinyDataset

ROOT = Path(__file__).resolve().parents[1]


AUGMENTS = {"scale": Augment((32, 32), (0.6, 1.4)), "shorter side": Augment((32, 32), shorter=(24, 56))}


def _loader(workers, augment="scale", **kw):
    ds = SyntheticShapes("train", num_samples=36, size=(40, 40), seed=5)
    return Loader(ds, 8, seed=2, augment=AUGMENTS[augment], workers=workers, drop_last=False, **kw)


def _two_epochs(loader):
    with loader:
        return [b for _ in range(2) for b in loader]


@pytest.mark.slow
@pytest.mark.parametrize("augment", AUGMENTS)
def test_batches_are_the_same_for_any_number_of_workers(augment):
    reference = _two_epochs(_loader(0, augment))
    assert len(reference) == 10 and reference[0]["image"].dtype == np.float32
    for workers in (1, 3):
        got = _two_epochs(_loader(workers, augment))
        for want, have in zip(reference, got, strict=True):
            np.testing.assert_array_equal(have["image"], want["image"])
            np.testing.assert_array_equal(have["label"], want["label"])
    raw = _two_epochs(_loader(2, augment, normalization=None))
    assert raw[0]["image"].dtype == np.uint8
    np.testing.assert_array_equal(normalize(raw[4]["image"]), reference[4]["image"])


@pytest.mark.slow
@pytest.mark.parametrize("augment", AUGMENTS)
def test_a_state_saved_with_some_workers_resumes_with_any_other_count(augment):
    reference = _two_epochs(_loader(0, augment, normalization=None))
    loader = _loader(3, augment, normalization=None)
    with loader:
        list(itertools.islice(loader, 3))
        state = loader.state()
    resumed = _loader(1, augment, normalization=None)
    resumed.restore(state)
    with resumed:
        rest = list(resumed) + list(resumed)
    for want, have in zip(reference[3:], rest, strict=True):
        np.testing.assert_array_equal(have["image"], want["image"])


def test_prefetch_is_bounded():
    requested = []

    class Counting(TinyDataset):
        def __getitem__(self, i):
            requested.append(i)
            return super().__getitem__(i)

    loader = Loader(Counting(n=64), 4, shuffle=False, workers=0, prefetch=3)
    batches = iter(loader)
    next(batches)
    # workers=0 loads lazily (one batch read); what is *submitted* ahead is bounded by prefetch batches
    assert loader.in_flight == 3 and len(requested) == 4
    assert Loader(TinyDataset(n=64), 4, workers=6, prefetch=1).in_flight == 6  # a batch for every worker


def test_a_failing_sample_in_a_worker_stops_with_the_sample_and_the_fix():
    with Loader(TinyDataset(fail_at=5), 4, shuffle=False, workers=2) as loader, \
            pytest.raises(DatasetError, match=r"loading sample 5 failed in a data worker: ValueError: "
                                              r"cannot decode sample 5. Run with --workers 0"):
        list(loader)


def test_a_dataset_error_from_a_worker_keeps_its_own_message(tmp_path):
    from PIL import Image

    from fcn_jax.data import get_dataset

    (tmp_path / "classes.txt").write_text("background\nthing\n")
    for folder in ("images/train", "masks/train"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "images/train" / f"{i}.png")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(tmp_path / "masks/train" / f"{i}.png")
    (tmp_path / "images/train/2.png").write_bytes(b"not a png")
    ds = get_dataset("folder", "train", data_dir=str(tmp_path))
    messages = []
    for workers in (0, 2):
        with Loader(ds, 4, shuffle=False, workers=workers) as loader, pytest.raises(DatasetError) as e:
            list(loader)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "2.png: not a readable image" in messages[0]


def test_a_dataset_that_cannot_reach_the_workers_says_how_to_fix_it():
    class Local(TinyDataset):  # a class inside a function cannot be pickled
        pass

    with pytest.raises(ConfigError, match=r"cannot be sent to worker processes .* --workers 0"):
        Loader(Local(), 4, workers=2)
    assert len(list(Loader(Local(), 4, workers=0))) == 6


def test_a_worker_that_dies_is_an_error_not_a_hang():
    start = time.perf_counter()
    with Loader(TinyDataset(exit_at=6), 4, shuffle=False, workers=2) as loader, \
            pytest.raises(DatasetError, match="a data worker process died: it was killed"):
        list(loader)
    assert time.perf_counter() - start < 60


def test_evaluation_batches_are_the_same_through_workers():
    ds = TinyDataset(n=10, size=20)
    here = list(EvalBatches(ds, 4, workers=0))
    with EvalBatches(ds, 4, workers=2) as batches:
        there = list(batches)
    for a, b in zip(here, there, strict=True):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])


def _worker_pids(process: subprocess.Popen) -> list[int]:
    line = process.stdout.readline()
    assert line.startswith("workers"), line + process.stderr.read()
    return [int(p) for p in line.split()[1:]]


def _gone(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().split(")")[1].split()[0] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


_HOLDS_WORKERS = textwrap.dedent("""
    import multiprocessing, sys, time
    from fcn_jax.data import Loader
    from tests.helpers import TinyDataset

    if __name__ == "__main__":
        loader = Loader(TinyDataset(n=400), 4, workers=2)
        batches = iter(loader)
        next(batches)
        print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
        for batch in batches:
            time.sleep(0.5)
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", *(pytest.param(how, marks=pytest.mark.exhaustive)  # CI: the one no
                                             for how in ("SIGTERM", "SIGINT to the process group"))])  # handler sees
def test_no_worker_outlives_the_main_process(tmp_path, how):
    script = tmp_path / "hold.py"
    script.write_text(_HOLDS_WORKERS)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               start_new_session=True)
    try:
        pids = _worker_pids(process)
        assert len(pids) == 2
        if how == "SIGINT to the process group":  # what a terminal's Ctrl-C does
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(getattr(signal, how))
        process.wait(timeout=60)
        assert _gone(pids), f"worker processes {pids} outlived the main process"
    finally:
        if process.poll() is None:
            process.kill()


def test_device_normalisation_gives_the_hosts_bits():
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 256, (2, 16, 16, 3)),
                             np.broadcast_to(np.arange(256)[None, :, None, None], (2, 256, 16, 3))], axis=1)
    images = images.astype(np.uint8)
    for mode in ("imagenet", "reference", "caffe"):
        on_device = np.asarray(jax.jit(normalize_on_device, static_argnums=1)(jnp.asarray(images), mode))
        np.testing.assert_array_equal(on_device, normalize(images, mode))


@pytest.mark.exhaustive  # CI: test_device_normalisation_gives_the_hosts_bits (the step is the same function after it)
def test_a_uint8_step_normalising_on_device_equals_the_float_step():
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    y = np.random.default_rng(2).integers(0, 5, (2, 32, 32)).astype(np.int32)
    results = []
    for images, normalization in ((normalize(x), None), (x, "imagenet")):
        model = fcn_jax.create_model("fcns", num_classes=5, backbone="vgg11", batch_norm=True, seed=0)
        optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
        loss = train_step(model, optimizer, jnp.asarray(images), jnp.asarray(y), cross_entropy, normalization)
        results.append((float(loss), np.asarray(model.classifier.kernel[...])))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.exhaustive
def test_the_donating_step_gives_the_same_results_as_the_one_writing_new_buffers():
    # GPUs and TPUs run the donating step; compile and run it here too.
    x = normalize(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8))
    y = np.random.default_rng(4).integers(0, 5, (2, 32, 32)).astype(np.int32)
    outcomes = []
    for step in (_train_step_new_buffers, _train_step_in_place):
        model = fcn_jax.create_model("fcn8s", num_classes=5, backbone="vgg11", batch_norm=True, seed=0)
        optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
        kernel = model.backbone.convs[0].kernel[...]
        with jax.default_matmul_precision("highest"):
            losses = [float(step(model, optimizer, jnp.asarray(x), jnp.asarray(y), cross_entropy)) for _ in range(2)]
        outcomes.append((losses, nnx.state(model), kernel))
    (losses_new, state_new, _), (losses_donated, state_donated, kernel_donated) = outcomes
    assert kernel_donated.is_deleted()  # the buffers really were donated
    np.testing.assert_allclose(losses_donated, losses_new, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state_new), jax.tree.leaves(state_donated), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def counting_device_reads():
    """Counts reads of jax.Array values by the host. JAX's transfer guard catches them on GPU and TPU, but not on
    CPU, where XLA hands arrays to numpy without a copy (jax-ml/jax#16602); so this also counts, on any backend,
    the Python-level ways to read one: ``float``/``int``/``bool``/``.item()``/``device_get`` (through
    ``_value``), ``__array__``, and ``np.asarray``/``np.array`` of a jax.Array."""
    from jax._src.array import ArrayImpl

    reads = []
    value, to_numpy, asarray, array = ArrayImpl._value, ArrayImpl.__array__, np.asarray, np.array

    def counted(original):
        def read(x, *args, **kwargs):
            if isinstance(x, jax.Array):
                reads.append(x.shape)
            return original(x, *args, **kwargs)
        return read

    ArrayImpl._value = property(counted(value.fget))
    ArrayImpl.__array__ = counted(to_numpy)
    np.asarray, np.array = counted(asarray), counted(array)
    try:
        with jax.transfer_guard_device_to_host("disallow"):
            yield reads
    finally:
        ArrayImpl._value, ArrayImpl.__array__, np.asarray, np.array = value, to_numpy, asarray, array


@pytest.mark.slow
def test_the_steps_between_two_log_points_never_read_from_the_devices():
    model = fcn_jax.create_model("fcns", num_classes=5, backbone="vgg11", batch_norm=True, seed=0)
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    mesh = make_mesh()
    replicate_state((model, optimizer), mesh)
    loader = Loader(SyntheticShapes("train", num_samples=40, size=(32, 32)), 8, workers=0, normalization=None)
    meter = LossMeter(0)
    batches = prefetch_to_devices(loader, mesh, depth=2)
    train_step(model, optimizer, *next(batches).values(), cross_entropy, "imagenet")  # compile outside
    with counting_device_reads() as reads:
        for batch in itertools.islice(batches, 3):  # what the loop does between two log points
            meter.add(train_step(model, optimizer, batch["image"], batch["label"], cross_entropy, "imagenet"))
    assert reads == []
    seen = meter.fetch()
    assert seen.step == 3 and np.isfinite(seen.loss) and seen.first_bad_step is None
    with counting_device_reads() as reads:  # the counter does see a read
        float(meter.record["loss"])
        np.asarray(meter.record["step"])
    assert len(reads) == 2


@pytest.mark.exhaustive  # CI: test_the_steps_between_two_log_points_never_read_from_the_devices
def test_the_training_loop_reads_from_the_devices_per_log_point_not_per_step(tmp_path):
    from fcn_jax.training.config import resolve_config
    from fcn_jax.training.run import train

    counts = []
    for samples in (32, 64):  # 4 and 8 steps: the same log points, checkpoints and evaluations
        config = resolve_config(synthetic_size=32, synthetic_train=samples, synthetic_val=8, batch_size=8, epochs=1,
                                log_every_steps=100, checkpoint_every_steps=0, workers=0, overlays=0,
                                run_dir=str(tmp_path / str(samples)))
        with counting_device_reads() as reads:
            train(config, progress=False)
        counts.append(len(reads))
    assert counts[0] == counts[1], counts


def test_the_meter_remembers_the_first_non_finite_step():
    meter = LossMeter(10)
    for loss in (1.0, float("nan"), 2.0, float("inf")):
        meter.add(jnp.float32(loss))
    seen = meter.fetch()
    assert seen.step == 14 and seen.first_bad_step == 12 and seen.loss == float("inf")


def test_device_prefetch_keeps_order_and_depth():
    pulled = []

    def batches():
        for i in range(6):
            pulled.append(i)
            yield {"x": np.full((2,), i, np.float32)}

    stream = prefetch_to_devices(batches(), make_mesh(), depth=2)
    first = next(stream)
    assert pulled == [0, 1, 2] and float(first["x"][0]) == 0
    assert [int(b["x"][0]) for b in stream] == [1, 2, 3, 4, 5]


def test_the_cli_the_registry_and_the_data_workers_import_without_jax():
    code = ("import sys, fcn_jax.cli, fcn_jax.data, fcn_jax.registry; fcn_jax.cli.build_parser(); "
            "print([m for m in ('jax', 'flax', 'optax') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]", result.stderr
