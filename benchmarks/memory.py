"""What one training step needs in memory, with and without rematerialisation (``create_model(remat=True)``,
``fcn-jax train --remat``), from XLA's own analysis of the compiled step, and what it costs in time.

    python benchmarks/memory.py [--size 375x500] [--batches 1,8] [--time-batches 1] [--time-dtypes float32]

For FCN8s-VGG16 (the tutorial's, no BatchNorm in the backbone) and the paper's FCN-8s (VGG16, fc6/fc7 4096
wide), at each batch size, float32 and bfloat16, remat off and on: the compiled step's argument, output and
temporary bytes (``compiled.memory_analysis()``: what XLA plans to allocate on this backend), and for the batch
sizes and dtypes named by --time-batches / --time-dtypes the median step time of --steps steps after one
warm-up (SGD with momentum, uint8 images normalised in the step, as training runs). From the two batch sizes it
derives, per net and setting, the largest batch whose step fits in 16, 40 and 80 GB (temporaries grow
linearly with the batch; derived, not measured). Last line: every figure as JSON.

Each row also counts the convolutions in the compiled program: remat recomputes each stage's convolutions in
the backward pass, so the count grows with it where the backend keeps the recomputation. XLA:CPU does not: it
expands JAX's optimisation barriers before its common-subexpression pass, which merges the recomputation
back into the forward pass (same count, same temporaries), so remat saves memory on GPUs and TPUs only.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fcn_jax
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.step import jitted_train_step, trainable

NETS = {"fcn8s_vgg16": dict(arch="fcn8s", backbone="vgg16", batch_norm=False),
        "fcn8s_paper_vgg16": dict(arch="fcn8s_paper", backbone="vgg16")}
GB = 1e9


def _step_figures(model, optimizer, batch: int, size: tuple[int, int], steps: int) -> dict:
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, *size, 3), np.uint8))
    labels = jnp.asarray(rng.integers(0, 21, (batch, *size), np.int32))
    loss_fn = functools.partial(cross_entropy, ignore_index=255)
    step = jitted_train_step()
    start = time.perf_counter()
    compiled = step.lower(model, optimizer, images, labels, loss_fn, "imagenet").compile()
    memory = compiled.memory_analysis()
    figures = {"compile_s": round(time.perf_counter() - start, 1),
               "convolutions": compiled.as_text().count("convolution("),  # more with remat: the recomputation
               "argument_gb": memory.argument_size_in_bytes / GB, "output_gb": memory.output_size_in_bytes / GB,
               "temp_gb": memory.temp_size_in_bytes / GB}
    if steps:
        times = []
        for _ in range(steps + 1):  # the first call also traces
            start = time.perf_counter()
            jax.block_until_ready(step(model, optimizer, images, labels, loss_fn, "imagenet"))
            times.append(time.perf_counter() - start)
        figures["step_s"] = statistics.median(times[1:])
    return figures


def _fits(rows: list[dict], budgets=(16, 40, 80)) -> dict:
    """The largest batch whose arguments + outputs + temporaries fit in each budget (GB), from a straight line
    through the temporaries of the smallest and largest batch measured."""
    small, large = rows[0], rows[-1]
    per_image = (large["temp_gb"] - small["temp_gb"]) / (large["batch"] - small["batch"])
    fixed = small["argument_gb"] + small["output_gb"] + small["temp_gb"] - per_image * small["batch"]
    return {f"{budget}GB": max(0, int((budget - fixed) // per_image)) for budget in budgets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="375x500", help="HxW of the images (default: a VOC photo, 500x375)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--time-batches", default="1", help="batch sizes whose steps are timed ('' for none)")
    parser.add_argument("--time-dtypes", default="float32", help="dtypes whose steps are timed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--nets", default=",".join(NETS))
    args = parser.parse_args()
    fcn_jax.use_compile_cache()
    size = tuple(int(v) for v in args.size.split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    timed_batches = {int(b) for b in args.time_batches.split(",") if b}
    results = []
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), images {size[0]}x{size[1]}")
    for net in args.nets.split(","):
        for dtype in ("float32", "bfloat16"):
            model = fcn_jax.create_model(**NETS[net], num_classes=21, dtype=jnp.dtype(dtype))
            model.train()
            optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=trainable(False))
            for remat in (False, True):
                model.backbone.remat = remat
                rows = []
                for batch in batches:
                    steps = args.steps if batch in timed_batches and dtype in args.time_dtypes.split(",") else 0
                    row = {"net": net, "dtype": dtype, "remat": remat, "batch": batch,
                           **_step_figures(model, optimizer, batch, size, steps)}
                    rows.append(row)
                    step = f", step {row['step_s']:.2f} s" if "step_s" in row else ""
                    print(f"{net:18s} {dtype:8s} remat={remat!s:5s} batch {batch}: arguments "
                          f"{row['argument_gb']:.2f} GB, outputs {row['output_gb']:.2f} GB, temporaries "
                          f"{row['temp_gb']:.2f} GB, {row['convolutions']} convolutions (compiled in "
                          f"{row['compile_s']} s){step}", flush=True)
                if len(rows) > 1:
                    rows[-1]["largest_batch_that_fits_derived"] = _fits(rows)
                    print(f"    largest batch that fits (derived): {rows[-1]['largest_batch_that_fits_derived']}")
                results += rows
    print(json.dumps({"device": jax.devices()[0].device_kind, "size": size, "rows": results}))


if __name__ == "__main__":
    main()
