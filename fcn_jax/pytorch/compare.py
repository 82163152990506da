"""``fcn-jax compare``: the same FCN in PyTorch and in JAX, fed the same batch: how far apart, how fast.

:func:`compare` builds the PyTorch reference and the JAX model with the same weights (random, with
BatchNorm statistics moved off their defaults, unless a weights file is given), then reports

- fidelity (:func:`fcn_jax.pytorch.parity.fidelity_checks`): max abs / max relative error of ``x1..x5``
  and the logits in eval and train mode, the loss, every gradient, the BatchNorm running statistics and
  the parameters after one SGD step;
- speed (:func:`fcn_jax.pytorch.speed.measure_speed`): forward and training-step times, images/s,
  FLOP/s, compile time, peak memory, page faults and system CPU time;
- the environment: devices, threads and library versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch
from flax import nnx

from fcn_jax import registry
from fcn_jax.errors import ConfigError
from fcn_jax.models import create_model
from fcn_jax.models.fcn import STRIDE
from fcn_jax.pytorch.parity import (
    IGNORE_INDEX,
    TRUTH_FACTOR,
    Check,
    fidelity_checks,
    jax_twin,
    random_reference,
    torch_twin,
)
from fcn_jax.pytorch.speed import ProgressBar, Timing, format_speed, measure_speed, speed_ratios
from fcn_jax.weights.native import load_model
from fcn_jax.weights.torch_layout import infer_config, read_torch_state_dict


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


def build_pair(arch: str = "fcn8s", backbone: str | None = None, batch_norm: bool | None = None, num_classes: int = 21,
               weights: str | os.PathLike | None = None, seed: int = 0, float64: bool = False):
    """``(jax_model, torch_model, description)`` holding the same weights, both in train mode.

    ``weights``: an fcn-jax ``.safetensors`` (its own architecture wins) or a PyTorch reference FCN
    state_dict (``.pth``; depth, BatchNorm and classes are read from it, ``arch`` must be right).
    Without, the models hold :func:`~fcn_jax.pytorch.parity.random_reference`'s weights (``seed``).
    """
    if weights is not None and Path(weights).suffix == ".safetensors":
        stored = load_model(weights)
        twin, arch = torch_twin(stored), stored.arch
        source = str(weights)
    elif weights is not None:
        state_dict = read_torch_state_dict(weights)
        found = infer_config(state_dict)
        architecture = nnx.eval_shape(lambda: create_model(  # shapes only: the weights come from the file
            arch, num_classes=found.get("num_classes", num_classes), backbone=found["backbone"] or backbone,
            batch_norm=found["batch_norm"]))
        twin = torch_twin(architecture, state_dict)
        source = str(weights)
    else:
        twin = random_reference(arch, num_classes, backbone or "vgg16", bool(batch_norm), seed)
        source = f"random (seed {seed})"
    if float64:
        twin = twin.double()
    model = jax_twin(twin, arch, dtype=jnp.float64 if float64 else jnp.float32)
    twin.train()
    model.train()
    name = (f"{arch}-{model.backbone.name}{'-bn' if model.backbone.batch_norm else ''}, {model.num_classes} classes, "
            f"weights: {source}")
    if model.takes_dropout_rngs:  # two frameworks' random dropout masks cannot agree: train mode compared without
        for module in twin.modules():
            if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d):
                module.p = 0.0
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.Dropout):
                module.rate = 0.0
        name += ", dropout off"
    return model, twin, name


def make_batch(batch_size: int, size: tuple[int, int], num_classes: int, seed: int = 0,
               dtype=np.float32, multiple: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Normalised-image-like NCHW inputs and labels with a block of ignored pixels; sides a multiple of
    ``multiple`` (the tutorial's PyTorch reference accepts nothing else; the paper's nets take any size)."""
    h, w = size
    if h % multiple or w % multiple:
        raise ConfigError(f"--size must be a multiple of {multiple} in both sides for the tutorial's FCNs (their "
                          f"PyTorch reference accepts nothing else; the paper's take any size), got {h}x{w}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, h, w)).astype(dtype)
    labels = rng.integers(0, num_classes, (batch_size, h, w))
    labels[:, : h // 8, : w // 8] = IGNORE_INDEX
    return images, labels


def environment() -> dict:
    """Devices, threads and versions, as recorded with every comparison."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "jax_devices": [str(d) for d in jax.devices()], "jax_platform": jax.devices()[0].platform,
        "torch_device": cuda or "cpu", "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "flax": flax.__version__, "optax": optax.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def format_report(result: CompareResult) -> str:
    c = result.config
    size = f"{c['size'][0]}x{c['size'][1]}"
    lines = [f"fcn-jax compare: {c['model']}",
             f"batch {c['batch_size']} x {size}, {c['dtype']}, SGD lr {c['lr']} momentum 0.9", ""]
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
        lines += [*format_speed(result.timings, result.flops, c["batch_size"], c["repeats"]), ""]
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


def compare(*, arch: str = "fcn8s", backbone: str | None = None, batch_norm: bool | None = None, num_classes: int = 21,
            batch_size: int = 2, size: tuple[int, int] = (224, 224), weights=None, float64: bool = False,
            seed: int = 0, lr: float = 0.01, repeats: int = 5, warmup: int = 2, fidelity: bool = True,
            speed: bool = True, torch_compile: bool = False, progress: bool = True) -> CompareResult:
    """Build both models, run the fidelity checks and the speed measurement; see the module doc."""
    segmenters = registry.archs(segmenters=True)
    if arch not in segmenters:
        raise ConfigError(f"compare covers the segmentation nets ({', '.join(segmenters)}), not {arch}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    with jax.enable_x64(float64), jax.default_matmul_precision("highest"):
        model, twin, name = build_pair(arch, backbone, batch_norm, num_classes, weights, seed, float64)
        images, labels = make_batch(batch_size, size, model.num_classes, seed,
                                    np.float64 if float64 else np.float32,
                                    multiple=STRIDE if model.family == "tutorial" else 1)
        checks = fidelity_checks(model, twin, images, labels, lr=lr, float64=float64) if fidelity else []
    timings, flops = {}, {}
    if speed:  # at the backend's default precision: what users get
        bar = ProgressBar(warmup_runs=6 if torch_compile else 4, repeats=repeats, enabled=progress)
        with jax.enable_x64(float64), bar:
            timings, flops = measure_speed(model, twin, images, labels, repeats=repeats, warmup=warmup, lr=lr,
                                           torch_compile=torch_compile, progress=bar.update)
    config = {"model": name, "arch": model.arch, "backbone": model.backbone.name,
              "batch_norm": model.backbone.batch_norm, "num_classes": model.num_classes,
              "batch_size": batch_size, "size": list(size), "dtype": "float64" if float64 else "float32",
              "lr": lr, "repeats": repeats, "warmup": warmup, "seed": seed}
    return CompareResult(config, checks, timings, flops, environment())


def run_compare(*, json_path: str | os.PathLike | None = None, **kwargs) -> CompareResult:
    """``fcn-jax compare``: print the report, write JSON if asked (the path is checked before the work)."""
    if json_path and Path(json_path).is_dir():
        raise ConfigError(f"--json {json_path} is a folder; give a file name, e.g. {Path(json_path) / 'compare.json'}")
    result = compare(**kwargs)
    print(format_report(result))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {path}")
    return result
