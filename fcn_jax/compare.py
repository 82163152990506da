"""``fcn-jax compare``: the same FCN in PyTorch and in JAX, fed the same batch: how far apart, how fast.

:func:`compare` builds the PyTorch reference (:mod:`fcn_jax.reference`) and the JAX model with the
same weights (random, with BatchNorm statistics moved off their defaults, unless a weights file is
given) and measures

- fidelity: max abs / max relative error of ``x1..x5`` and the logits in eval and train mode, the loss,
  every gradient, the BatchNorm running statistics and the parameters after one SGD step;
- speed: median forward (eval) and training-step (SGD with momentum) times after warm-up, images/s,
  FLOP/s, JAX compile time, peak memory, page faults and system CPU time per call (a CPU allocator
  that returns memory to the OS every step shows up there); JAX and PyTorch measured in alternating
  rounds in one process.

Relative error is ``max |jax - torch| / scale`` over a tensor, the scale being ``max |torch|`` except
where :func:`fidelity_checks` says otherwise (gradients and parameters after the step).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fcn_jax.convert import (infer_config, load_torch_state_dict, read_torch_state_dict, to_torch_state_dict,
                             torch_entries)
from fcn_jax.errors import FcnJaxError
from fcn_jax.models import create_model, torch_feature_indices
from fcn_jax.models.fcn import STRIDE
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.step import jitted_train_step
from fcn_jax.verify import Difference
from fcn_jax.weights import load_model

# (float32, float64) bars on max |jax - torch| / scale, scale = max |torch| of the tensor, except for
# gradients and parameters after the step (see fidelity_checks).
TOLERANCES = {
    "eval": (1e-5, 1e-10),
    "train": (1e-4, 1e-10),  # train-mode BatchNorm divides by batch statistics: more rounding
    "loss": (1e-5, 1e-12),
    "gradients": (2e-2, 1e-8),  # float32: of the model's largest gradient; measured up to 1e-2
    "bn stats": (1e-5, 1e-10),
    "parameters": (1e-5, 1e-12),
}
# JAX/PyTorch ratios of float32 error against float64 measured 0.5..2.5 on most rows; up to 7 on a
# VGG16-BN first-conv gradient, which PyTorch's CPU BatchNorm (double accumulation) gets closer.
TRUTH_FACTOR = 4
IGNORE_INDEX = 255
PAGE_FAULT_HINT = 10_000  # per step; FCN8s-VGG16 at 2x224x224 made 126k (JAX) and 90k (PyTorch) here


@dataclasses.dataclass(frozen=True)
class Check(Difference):
    """One fidelity row: ``section`` (eval, train, step) and ``name`` (x1, logits, loss, ...);
    ``max_ref`` is the scale the error is divided by."""
    section: str
    tolerance: float
    worst: str = ""  # the tensor with the largest relative error, for rows over many tensors
    jax_vs_float64: float | None = None  # float32 runs: each framework's relative error against
    torch_vs_float64: float | None = None  # the PyTorch reference run in float64

    @property
    def ok(self) -> bool:
        """Within the tolerance, or (float32) no more than ``TRUTH_FACTOR`` times as far from the float64
        reference as PyTorch's own float32 result: then the difference is rounding, not a bug."""
        if self.relative <= self.tolerance:
            return True
        return self.jax_vs_float64 is not None and self.jax_vs_float64 <= TRUTH_FACTOR * self.torch_vs_float64


@dataclasses.dataclass
class Timing:
    """Speed of one framework; times in milliseconds (medians), memory in MiB."""
    forward_ms: float
    step_ms: float
    forward_all_ms: list[float]
    step_all_ms: list[float]
    compile_forward_s: float | None = None  # JAX: lower + compile; torch.compile: its first call
    compile_step_s: float | None = None
    forward_peak_mib: float | None = None
    step_peak_mib: float | None = None
    memory_method: str = ""
    forward_page_faults: float | None = None  # medians per call: minor page faults (process-wide, getrusage)
    step_page_faults: float | None = None
    forward_system_ms: float | None = None  # and system (kernel) CPU time
    step_system_ms: float | None = None


@dataclasses.dataclass
class CompareResult:
    config: dict
    checks: list[Check]
    timings: dict[str, Timing]  # "jax", "torch" (, "torch.compile")
    flops: dict[str, float]  # XLA's count: "forward", "step" (per batch)
    environment: dict

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def ratios(self) -> dict[str, float]:
        return speed_ratios(self.timings) if self.timings else {}

    def to_json(self) -> dict:
        return {"config": self.config, "ok": self.ok,
                "checks": [{**dataclasses.asdict(c), "relative": c.relative, "ok": c.ok} for c in self.checks],
                "timings": {k: dataclasses.asdict(v) for k, v in self.timings.items()},
                "jax_over_torch": self.ratios(), "flops": self.flops, "environment": self.environment}


# ---------------------------------------------------------------------------------------------
# The two models


def build_pair(arch: str = "fcn8s", backbone: str = "vgg16", batch_norm: bool = False, num_classes: int = 21,
               weights: str | os.PathLike | None = None, seed: int = 0, float64: bool = False):
    """``(jax_model, torch_model, description)`` holding the same weights, both in train mode.

    ``weights``: an fcn-jax ``.safetensors`` (its own architecture wins) or a PyTorch reference FCN
    state_dict (``.pth``; depth, BatchNorm and classes are read from it, ``arch`` must be right).
    Without, the torch model is initialised from ``seed`` and its BatchNorm parameters and running
    statistics are randomised, so that eval and train mode differ.
    """
    import torch

    from fcn_jax.reference import build_torch_model, randomize_batchnorm_
    from fcn_jax.verify import torch_twin

    dtype = jnp.float64 if float64 else jnp.float32
    if weights is not None and Path(weights).suffix == ".safetensors":
        stored = load_model(weights)
        sd = to_torch_state_dict(stored, as_torch=True)
        twin = torch_twin(stored, sd)
        arch, backbone = stored.arch, stored.backbone.name
        batch_norm, num_classes = stored.backbone.batch_norm, stored.num_classes
        source = str(weights)
    elif weights is not None:
        sd = read_torch_state_dict(weights)
        found = infer_config(sd)
        backbone, batch_norm = found.get("backbone", backbone), found.get("batch_norm", batch_norm)
        num_classes = found.get("num_classes", num_classes)
        twin = build_torch_model(arch, num_classes, backbone, batch_norm)
        twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
        source = str(weights)
    else:
        torch.manual_seed(seed)
        twin = randomize_batchnorm_(build_torch_model(arch, num_classes, backbone, batch_norm), seed)
        source = f"random (seed {seed})"
    if float64:
        twin = twin.double()
    model = create_model(arch, num_classes=num_classes, backbone=backbone, batch_norm=batch_norm,
                         dtype=dtype, param_dtype=dtype)
    load_torch_state_dict(model, twin.state_dict())
    twin.train()
    model.train()
    name = f"{arch}-{backbone}{'-bn' if batch_norm else ''}, {num_classes} classes, weights: {source}"
    return model, twin, name


def make_batch(batch_size: int, size: tuple[int, int], num_classes: int, seed: int = 0,
               dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-image-like NCHW inputs and labels with a block of ignored pixels."""
    h, w = size
    if h % STRIDE or w % STRIDE:
        raise FcnJaxError(f"--size must be a multiple of {STRIDE} in both sides (the PyTorch reference "
                          f"accepts nothing else), got {h}x{w}")
    if batch_size < 1:
        raise FcnJaxError(f"--batch-size must be at least 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, h, w)).astype(dtype)
    labels = rng.integers(0, num_classes, (batch_size, h, w))
    labels[:, : h // 8, : w // 8] = IGNORE_INDEX
    return images, labels


# ---------------------------------------------------------------------------------------------
# Fidelity
#
# Both frameworks produce the same named groups of tensors, torch-named: "eval x1" .. "eval logits",
# "train x1" .. "train loss" (one train-mode forward), "step gradients", "step bn stats" and
# "step parameters" (after one SGD step with momentum 0.9).


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _torch_forward(twin, x):
    """``(features, logits)`` of the torch FCN, features captured from its backbone's output."""
    captured = {}
    handle = twin.pretrained_net.register_forward_hook(lambda m, i, out: captured.update(out))
    try:
        logits = twin(x)
    finally:
        handle.remove()
    return captured, logits


def torch_results(twin, images: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, dict[str, np.ndarray]]:
    """The groups of the PyTorch reference (run on a copy of ``twin``)."""
    import torch

    twin = copy.deepcopy(twin)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    out = {}
    with torch.no_grad():
        feats, logits = _torch_forward(twin.eval(), x)
    out.update({f"eval {k}": {k: v.numpy()} for k, v in sorted(feats.items())})
    out["eval logits"] = {"logits": logits.numpy()}
    optimizer = torch.optim.SGD(twin.train().parameters(), lr=lr, momentum=0.9)
    feats, logits = _torch_forward(twin, x)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
    loss.backward()
    optimizer.step()
    out.update({f"train {k}": {k: v.detach().numpy()} for k, v in sorted(feats.items())})
    out["train logits"] = {"logits": logits.detach().numpy()}
    out["train loss"] = {"loss": np.asarray(loss.item())}
    out["step gradients"] = {k: p.grad.numpy().copy() for k, p in twin.named_parameters()}
    state = {k: v.numpy() for k, v in twin.state_dict().items()}
    out["step bn stats"] = {k: state[k] for k in state if k.endswith(("running_mean", "running_var"))}
    out["step parameters"] = {k: state[k] for k in out["step gradients"]}
    return out


def jax_results(model, images: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, dict[str, np.ndarray]]:
    """The groups of the JAX model (run on a copy of ``model``), torch-named."""
    model = nnx.clone(model)
    x, y = jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(labels)
    out = {}
    model.eval()
    feats, logits = nnx.jit(lambda m, x: m.features_and_logits(x))(model, x)
    out.update({f"eval {k}": {k: _nchw(v)} for k, v in sorted(feats.items())})
    out["eval logits"] = {"logits": _nchw(logits)}

    def loss_fn(m):
        f, out = m.features_and_logits(x)
        return cross_entropy(out, y, ignore_index=IGNORE_INDEX), (f, out)

    @nnx.jit
    def sgd_step(m, optimizer):
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        optimizer.update(m, grads)
        return loss, aux, grads

    model.train()
    loss, (feats, logits), grads = sgd_step(model, nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param))
    out.update({f"train {k}": {k: _nchw(v)} for k, v in sorted(feats.items())})
    out["train logits"] = {"logits": _nchw(logits)}
    out["train loss"] = {"loss": np.asarray(loss)}
    holder = nnx.clone(model)  # the converter lays the gradients out as torch's parameters
    nnx.update(holder, grads)
    grads = to_torch_state_dict(holder)
    state = to_torch_state_dict(model)
    params = [key for key, _, var in torch_entries(model) if isinstance(var, nnx.Param)]
    out["step gradients"] = {k: grads[k] for k in params}
    out["step bn stats"] = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    out["step parameters"] = {k: state[k] for k in params}
    return out


def _tolerance(group: str, float64: bool) -> float:
    section, name = group.split(" ", 1)
    kind = name if section == "step" else "loss" if name == "loss" else section
    return TOLERANCES[kind][1 if float64 else 0]


def _max_relative(ours: dict, ref: dict, scales: dict) -> tuple[float, float, float, str]:
    """``(relative, max_abs, scale, key)`` of the tensor with the largest ``max |ours - ref| / scale``."""
    rows = []
    for key, r in ref.items():
        a = np.asarray(ours[key], np.float64)
        if a.shape != r.shape:
            raise AssertionError(f"{key}: JAX shape {a.shape} != PyTorch shape {r.shape}")
        err = float(np.abs(a - np.asarray(r, np.float64)).max())
        rows.append((err / max(scales[key], np.finfo(np.float64).tiny), err, scales[key], key))
    return max(rows)


def fidelity_checks(model, twin, images: np.ndarray, labels: np.ndarray, *, lr: float = 0.01,
                    float64: bool = False) -> list[Check]:
    """One :class:`Check` per group, each tensor judged against its own largest value.

    Two exceptions. A conv bias feeding a train-mode BatchNorm has a true gradient of zero and stays
    ~0: its gradient and value are judged against the model's largest. In float32 every gradient (and
    parameter after the step) is judged against the model's largest: a deep backward pass (with
    train-mode BatchNorm subtracting nearly equal terms) leaves small gradients with rounding noise of
    the size of the large ones' (PyTorch on CPU hides part of it by accumulating BatchNorm in double).
    ``float64`` checks each tensor against its own scale at 1e-8.

    In float32 the PyTorch reference also runs in float64 as the truth, and each row records both
    frameworks' error against it: a row over its tolerance still passes when JAX's error is at most
    ``TRUTH_FACTOR`` times PyTorch's (see :attr:`Check.ok`).
    """
    ours = jax_results(model, images, labels, lr)
    ref = torch_results(twin, images, labels, lr)
    truth = None if float64 else torch_results(copy.deepcopy(twin).double(), images.astype(np.float64), labels, lr)
    zero_grad_biases = {f"pretrained_net.features.{conv}.bias"
                        for conv, bn in torch_feature_indices(model.backbone.name, model.backbone.batch_norm)
                        if bn is not None}
    checks = []
    for group, tensors in ref.items():
        scales = {k: float(np.abs(v).max()) for k, v in tensors.items()}
        if group in ("step gradients", "step parameters"):
            largest = max(scales.values())
            scales.update({k: largest for k in zero_grad_biases})
            if not float64:  # parameters after the step differ by lr x the gradients' difference
                scales = dict.fromkeys(scales, largest)
        relative, max_abs, scale, key = _max_relative(ours[group], tensors, scales)
        vs_truth = {}
        if truth is not None:
            vs_truth = {"jax_vs_float64": _max_relative(ours[group], truth[group], scales)[0],
                        "torch_vs_float64": _max_relative(tensors, truth[group], scales)[0]}
        section, name = group.split(" ", 1)
        checks.append(Check(name=name, max_abs=max_abs, max_ref=scale, section=section,
                            tolerance=_tolerance(group, float64), worst=key if len(tensors) > 1 else "", **vs_truth))
    return checks


# ---------------------------------------------------------------------------------------------
# Speed


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a code block, in MiB: the accelerator allocator's peak on GPU/TPU (JAX or torch),
    else the process's resident set growth over the block, sampled every millisecond."""

    def __init__(self, framework: str):
        self.framework, self.mib = framework, None
        self.method = "resident set growth" if self._on_host() else "allocator peak"

    def _on_host(self) -> bool:
        if self.framework == "jax":
            return jax.devices()[0].platform == "cpu"
        import torch

        return not torch.cuda.is_available()

    def __enter__(self):
        if self._on_host():
            with contextlib.suppress(OSError, AttributeError):  # return freed heap pages first (glibc)
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._base, self._peak, self._stop = _rss_bytes(), 0, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        elif self.framework == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._on_host():
            self._stop.set()
            self._thread.join()
            self.mib = max(self._peak - self._base, 0) / 2**20
        elif self.framework == "torch":
            import torch

            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            stats = jax.devices()[0].memory_stats() or {}
            self.mib = stats.get("peak_bytes_in_use", 0) / 2**20 or None


@dataclasses.dataclass
class _Call:
    """One timed call: wall time, and the process's minor page faults and system CPU time during it."""
    ms: float
    page_faults: int
    system_ms: float


def _timed(fn) -> _Call:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    ms, after = (time.perf_counter() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF)
    return _Call(ms, after.ru_minflt - before.ru_minflt, (after.ru_stime - before.ru_stime) * 1e3)


def _torch_runs(twin, x, y, lr: float, compile: bool):
    """``(forward, step)`` callables of a torch FCN (eager, or through ``torch.compile``), on copies."""
    import torch

    train_model, eval_model = copy.deepcopy(twin).train(), copy.deepcopy(twin).eval()
    optimizer = torch.optim.SGD(train_model.parameters(), lr=lr, momentum=0.9)
    if compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(train_model(x), y, ignore_index=IGNORE_INDEX).backward()
        optimizer.step()

    def forward():
        with torch.inference_mode():
            eval_model(x)

    return forward, step


def measure_speed(model, twin, images: np.ndarray, labels: np.ndarray, *, repeats: int = 5, warmup: int = 2,
                  lr: float = 0.01, torch_compile: bool = False,
                  progress=None) -> tuple[dict[str, Timing], dict[str, float]]:
    """Median forward (eval) and training-step times of JAX (``fcn_jax.training.train_step``), PyTorch
    eager and optionally ``torch.compile``, measured in alternating rounds so that a drifting machine
    affects all alike. The models are copied, not changed. Returns timings keyed "jax", "torch"
    (and "torch.compile") and XLA's FLOP counts per batch."""
    import torch

    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # own buffers: the step may donate them
    x_t, y_t = torch.from_numpy(images), torch.from_numpy(labels)
    x_j, y_j = jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(labels)

    eval_model = nnx.clone(model)
    eval_model.eval()
    optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param)
    start = time.perf_counter()
    compiled_forward = nnx.jit(lambda m, x: m(x)).lower(eval_model, x_j).compile()
    compile_s = {("jax", "forward"): time.perf_counter() - start}
    start = time.perf_counter()
    compiled_step = jitted_train_step().lower(model, optimizer, x_j, y_j, cross_entropy).compile()
    compile_s["jax", "step"] = time.perf_counter() - start
    flops = {k: float((c.cost_analysis() or {}).get("flops", 0.0))
             for k, c in (("forward", compiled_forward), ("step", compiled_step))}

    runs = {("jax", "forward"): lambda: compiled_forward(eval_model, x_j).block_until_ready(),
            ("jax", "step"): lambda: compiled_step(model, optimizer, x_j, y_j).block_until_ready()}
    for name, compile in (("torch", False), ("torch.compile", True))[:2 if torch_compile else 1]:
        runs[name, "forward"], runs[name, "step"] = _torch_runs(twin, x_t, y_t, lr, compile)
    times = {k: [] for k in runs}
    peaks = {}
    for (framework, kind), run in runs.items():  # warm-up under the memory probe
        with PeakMemory("jax" if framework == "jax" else "torch") as probe:
            first = _timed(run)
            for _ in range(warmup):
                run()
        if framework == "torch.compile":  # its compilation happens in the first call
            compile_s[framework, kind] = first.ms / 1e3
        peaks[framework, kind] = probe
        if progress:
            progress()
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            times[key].append(_timed(runs[key]))
        if progress:
            progress()

    def median(framework, kind, field):
        return statistics.median(getattr(call, field) for call in times[framework, kind])

    timings = {}
    for framework in dict.fromkeys(f for f, _ in runs):
        timings[framework] = Timing(
            forward_ms=median(framework, "forward", "ms"), step_ms=median(framework, "step", "ms"),
            forward_all_ms=[call.ms for call in times[framework, "forward"]],
            step_all_ms=[call.ms for call in times[framework, "step"]],
            compile_forward_s=compile_s.get((framework, "forward")),
            compile_step_s=compile_s.get((framework, "step")), forward_peak_mib=peaks[framework, "forward"].mib,
            step_peak_mib=peaks[framework, "step"].mib, memory_method=peaks[framework, "step"].method,
            forward_page_faults=median(framework, "forward", "page_faults"),
            step_page_faults=median(framework, "step", "page_faults"),
            forward_system_ms=median(framework, "forward", "system_ms"),
            step_system_ms=median(framework, "step", "system_ms"))
    return timings, flops


# ---------------------------------------------------------------------------------------------
# Report


def environment() -> dict:
    """Devices, threads and versions, as recorded with every comparison."""
    import flax
    import jaxlib
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "jax_devices": [str(d) for d in jax.devices()], "jax_platform": jax.devices()[0].platform,
        "torch_device": cuda or "cpu", "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def speed_ratios(timings: dict[str, Timing]) -> dict[str, float]:
    """JAX time / PyTorch eager time, forward and step."""
    j, t = timings["jax"], timings["torch"]
    return {"forward": j.forward_ms / t.forward_ms, "step": j.step_ms / t.step_ms}


def format_speed(timings: dict[str, Timing], flops: dict[str, float], batch_size: int, repeats: int) -> list[str]:
    """The speed table: one column per framework; the last column is JAX time / PyTorch eager time
    (below 1: JAX is faster)."""
    names = {"jax": "JAX", "torch": "PyTorch", "torch.compile": "torch.compile"}
    cols = list(timings)

    def row(label, values, fmt, ratio=None):
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        return f"  {label:<26}" + "".join(f" {cell:>13}" for cell in cells) + (f" {ratio:12.2f}" if ratio else "")

    def per(kind, fn):
        return [fn(getattr(timings[f], f"{kind}_ms")) for f in cols]

    def gflops(kind):
        return per(kind, lambda ms: flops[kind] / ms / 1e6 if flops.get(kind) else None)

    lines = [f"{'speed (median of ' + str(repeats) + ')':<28}" + "".join(f" {names[f]:>13}" for f in cols)
             + f" {'JAX/PyTorch':>12}"]
    ratio = speed_ratios(timings)
    for kind, label in (("forward", "forward, eval"), ("step", "train step")):
        lines += [row(f"{label} (ms)", per(kind, lambda ms: ms), "{:.1f}", ratio[kind]),
                  row(f"{label} (images/s)", per(kind, lambda ms: batch_size * 1e3 / ms), "{:.2f}"),
                  row(f"{label} (GFLOP/s)", gflops(kind), "{:.0f}")]
    lines += [row("compile forward (s)", [timings[f].compile_forward_s for f in cols], "{:.2f}"),
              row("compile train step (s)", [timings[f].compile_step_s for f in cols], "{:.2f}"),
              row("peak memory fwd (MiB)", [timings[f].forward_peak_mib for f in cols], "{:.0f}"),
              row("peak memory step (MiB)", [timings[f].step_peak_mib for f in cols], "{:.0f}"),
              row("forward page faults", [timings[f].forward_page_faults for f in cols], "{:.0f}"),
              row("train step page faults", [timings[f].step_page_faults for f in cols], "{:.0f}"),
              row("train step system CPU (ms)", [timings[f].step_system_ms for f in cols], "{:.0f}"),
              f"  memory: {timings['jax'].memory_method} (JAX), {timings['torch'].memory_method} (PyTorch); "
              f"FLOPs per batch (XLA): forward {flops.get('forward', 0) / 1e9:.1f} G, "
              f"step {flops.get('step', 0) / 1e9:.1f} G"]
    if "torch.compile" in timings:
        lines.append("  torch.compile's compile time is its first call")
    if any((t.step_page_faults or 0) > PAGE_FAULT_HINT for t in timings.values()):
        lines.append("  many page faults per step: the allocator returns memory to the OS and faults it in again; "
                     "on Linux see the README's 'CPU tip: keep freed memory' (GLIBC_TUNABLES)")
    return lines


def format_report(result: CompareResult) -> str:
    c = result.config
    lines = [f"fcn-jax compare: {c['model']}",
             f"batch {c['batch_size']} x {c['size'][0]}x{c['size'][1]}, {c['dtype']}, SGD lr {c['lr']} momentum 0.9", ""]
    if result.checks:
        truth = result.checks[0].jax_vs_float64 is not None
        lines.append(f"{'fidelity (JAX vs PyTorch)':<24} {'max |diff|':>11} {'scale':>11} {'relative':>10} "
                     + (f"{'JAX err':>10} {'torch err':>10} " if truth else "") + f"{'tolerance':>10}  ok")
        for ch in result.checks:
            name = f"{ch.section} {ch.name}"
            lines.append(f"  {name:<22} {ch.max_abs:11.3e} {ch.max_ref:11.3e} {ch.relative:10.2e} "
                         + (f"{ch.jax_vs_float64:10.2e} {ch.torch_vs_float64:10.2e} " if truth else "")
                         + f"{ch.tolerance:10.0e}  {'yes' if ch.ok else 'NO'}"
                         + (f"  (worst: {ch.worst})" if ch.worst else ""))
        if truth:
            lines.append(f"  JAX err, torch err: each float32 result's relative error against PyTorch in float64; "
                         f"a row over tolerance passes when JAX err <= {TRUTH_FACTOR} x torch err")
        lines.append("")
    if result.timings:
        lines += format_speed(result.timings, result.flops, c["batch_size"], c["repeats"]) + [""]
    e = result.environment
    lines += [f"environment: JAX {e['jax']} on {', '.join(e['jax_devices'])}; PyTorch {e['torch']} on "
              f"{e['torch_device']} with {e['torch_threads']} threads; flax {e['flax']}; {e['cpu']} "
              f"({e['cpu_count']} CPUs); Python {e['python']}"
              + (f"; XLA_FLAGS={e['xla_flags']}" if e["xla_flags"] else "")]
    if result.checks:
        failed = [f"{ch.section} {ch.name}" for ch in result.checks if not ch.ok]
        lines.append("all fidelity checks within tolerance" if not failed
                     else f"OVER TOLERANCE: {', '.join(failed)}")
    return "\n".join(lines)


def compare(*, arch: str = "fcn8s", backbone: str = "vgg16", batch_norm: bool = False, num_classes: int = 21,
            batch_size: int = 2, size: tuple[int, int] = (224, 224), weights=None, float64: bool = False,
            seed: int = 0, lr: float = 0.01, repeats: int = 5, warmup: int = 2, fidelity: bool = True,
            speed: bool = True, torch_compile: bool = False, progress: bool = True) -> CompareResult:
    """Build both models, run the fidelity checks and the speed measurement; see the module doc."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise FcnJaxError("fcn-jax compare needs PyTorch and torchvision: pip install 'fcn-jax[torch]'") from e
    if repeats < 1 or warmup < 0:
        raise FcnJaxError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    with jax.enable_x64(float64), jax.default_matmul_precision("highest"):
        model, twin, name = build_pair(arch, backbone, batch_norm, num_classes, weights, seed, float64)
        images, labels = make_batch(batch_size, size, model.num_classes, seed,
                                    np.float64 if float64 else np.float32)
        checks = fidelity_checks(model, twin, images, labels, lr=lr, float64=float64) if fidelity else []
    timings, flops = {}, {}
    if speed:  # at the backend's default precision: what users get
        bar = _ProgressBar(warmup_runs=6 if torch_compile else 4, repeats=repeats, enabled=progress)
        with jax.enable_x64(float64), bar:
            timings, flops = measure_speed(model, twin, images, labels, repeats=repeats, warmup=warmup, lr=lr,
                                           torch_compile=torch_compile, progress=bar.update)
    config = {"model": name, "arch": model.arch, "backbone": model.backbone.name,
              "batch_norm": model.backbone.batch_norm, "num_classes": model.num_classes,
              "batch_size": batch_size, "size": list(size), "dtype": "float64" if float64 else "float32",
              "lr": lr, "repeats": repeats, "warmup": warmup, "seed": seed}
    return CompareResult(config, checks, timings, flops, environment())


class _ProgressBar(contextlib.AbstractContextManager):
    def __init__(self, warmup_runs: int, repeats: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=warmup_runs + repeats, desc="timing (warm-up, then rounds)", unit="run",
                         disable=not enabled, leave=False)

    def update(self):
        self._bar.update()

    def __exit__(self, *exc):
        self._bar.close()


def run_compare(*, json_path: str | os.PathLike | None = None, **kwargs) -> CompareResult:
    """``fcn-jax compare``: print the report, write JSON if asked."""
    result = compare(**kwargs)
    print(format_report(result))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {path}")
    return result
