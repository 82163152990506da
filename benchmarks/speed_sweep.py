"""JAX vs PyTorch speed over batch sizes and resolutions: forward (eval) and SGD training step.

Prints a table, writes ``sweep.csv``, ``sweep.json`` and ``sweep.png`` to ``--out``. Each configuration
is measured with :func:`fcn_jax.pytorch.speed.measure_speed` (alternating rounds, medians after warm-up), so
the figures are those ``fcn-jax compare`` prints. Achieved FLOP/s (XLA's FLOP count of the program
divided by the time) is set against the machine's measured fp32 matmul peak (a 4096^3 ``jnp.dot``),
the best this device does on dense fp32 work.

    python benchmarks/speed_sweep.py                               # FCN8s-VGG16, CPU defaults
    python benchmarks/speed_sweep.py --batch-sizes 1,8,32 --sizes 224x224,512x512 --torch-compile  # GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import registry
from fcn_jax.models import BACKBONES
from fcn_jax.pytorch.compare import build_pair, environment, make_batch
from fcn_jax.pytorch.speed import measure_speed
from fcn_jax.training.config import parse_size

ARCHS = registry.archs(family="tutorial")

FRAMEWORK_NAMES = {"jax": "JAX", "torch": "PyTorch", "torch.compile": "torch.compile"}


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n x n matmul on JAX's default device (precision "highest": true fp32)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def sweep(args) -> tuple[list[dict], dict]:
    model, twin, name = build_pair(args.arch, args.backbone, args.batch_norm, args.num_classes)
    peak = matmul_peak_gflops()
    print(f"{name}; fp32 matmul peak of {jax.devices()[0]}: {peak:.0f} GFLOP/s")
    rows = []
    for size in args.sizes:
        for batch in args.batch_sizes:
            images, labels = make_batch(batch, size, args.num_classes)
            timings, flops = measure_speed(model, twin, images, labels, repeats=args.repeats, warmup=args.warmup,
                                           torch_compile=args.torch_compile)
            for framework, t in timings.items():
                for kind in ("forward", "step"):
                    ms = getattr(t, f"{kind}_ms")
                    gflops = flops[kind] / ms / 1e6
                    rows.append({
                        "framework": framework, "kind": kind, "batch_size": batch, "height": size[0],
                        "width": size[1], "median_ms": round(ms, 2), "images_per_s": round(batch * 1e3 / ms, 3),
                        "gflop_per_s": round(gflops, 1), "percent_of_peak": round(100 * gflops / peak, 1),
                        "jax_over_torch": round(ms / getattr(timings["torch"], f"{kind}_ms"), 3),
                        "compile_s": getattr(t, f"compile_{kind}_s"), "peak_mib": getattr(t, f"{kind}_peak_mib"),
                        "all_ms": [round(v, 2) for v in getattr(t, f"{kind}_all_ms")]})
                    print(f"  {size[0]}x{size[1]} batch {batch:3d} {kind:<8} {FRAMEWORK_NAMES[framework]:<14} "
                          f"{ms:9.1f} ms {batch * 1e3 / ms:8.2f} img/s {gflops:7.0f} GFLOP/s "
                          f"({100 * gflops / peak:4.1f}% of peak)"
                          + (f"  JAX/PyTorch {ms / getattr(timings['torch'], f'{kind}_ms'):.2f}"
                             if framework == "jax" else ""), flush=True)
    return rows, {"model": name, "matmul_peak_gflops": peak, "environment": environment(),
                  "repeats": args.repeats, "warmup": args.warmup}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["height"], r["width"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, kind in zip(axes[0], ("forward", "step"), strict=True):
        for framework in dict.fromkeys(r["framework"] for r in rows):
            for size, style in zip(sizes, ("-o", "--s", ":^", "-.d"), strict=False):
                pts = sorted((r["batch_size"], r["images_per_s"]) for r in rows
                             if r["framework"] == framework and r["kind"] == kind and (r["height"], r["width"]) == size)
                ax.plot(*zip(*pts, strict=True), style, label=f"{FRAMEWORK_NAMES[framework]} {size[0]}x{size[1]}")
        ax.set(title="forward (eval)" if kind == "forward" else "training step (SGD)", xlabel="batch size",
               ylabel="images / s", xscale="log", yscale="log")
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="fcn8s")
    p.add_argument("--backbone", choices=BACKBONES, default="vgg16")
    p.add_argument("--batch-norm", action="store_true")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--sizes", type=lambda s: [parse_size(v) for v in s.split(",")], default=[(224, 224), (320, 320)])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true", help="also torch.compile (minutes of compiling per config)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)

    rows, meta = sweep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "all_ms"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "sweep.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    plot(rows, args.out / "sweep.png")
    print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
