"""JAX and PyTorch timed side by side: forward (eval) and SGD training step of the same model on the same batch.

Medians of alternating rounds after warm-up (a drifting machine affects both alike), images/s, FLOP/s (XLA's
count), JAX compile time, peak memory (the accelerator allocator's peak, or the process's resident set growth
on CPU), minor page faults and system CPU time per call (a CPU allocator that returns memory to the OS every
step shows up there). Used by ``fcn-jax compare`` and ``benchmarks/speed_sweep.py``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import os
import resource
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from fcn_jax.pytorch.parity import IGNORE_INDEX, main_logits
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.step import jitted_train_step

PAGE_FAULT_HINT = 10_000  # per step; FCN8s-VGG16 at 2x224x224 made 126k (JAX) and 90k (PyTorch) here


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
        return not torch.cuda.is_available()

    def __enter__(self):
        if self._on_host():
            with contextlib.suppress(OSError, AttributeError):  # return freed heap pages first (glibc)
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._base, self._peak, self._stop = _rss_bytes(), 0, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        elif self.framework == "torch":
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
    train_model, eval_model = copy.deepcopy(twin).train(), copy.deepcopy(twin).eval()
    optimizer = torch.optim.SGD(train_model.parameters(), lr=lr, momentum=0.9)
    if compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(main_logits(train_model(x)), y, ignore_index=IGNORE_INDEX).backward()
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


class ProgressBar(contextlib.AbstractContextManager):
    """A tqdm bar over the warm-up runs and timed rounds (``update`` is :func:`measure_speed`'s ``progress``)."""

    def __init__(self, warmup_runs: int, repeats: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=warmup_runs + repeats, desc="timing (warm-up, then rounds)", unit="run",
                         disable=not enabled, leave=False)

    def update(self):
        self._bar.update()

    def __exit__(self, *exc):
        self._bar.close()

