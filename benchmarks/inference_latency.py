"""Inference latency of one network in three runtimes, batch 1, in one process on the same machine:
onnxruntime running the ``fcn-jax export --format onnx`` graph, JAX (the model under ``jax.jit``) and PyTorch
(the reference model, eval mode, ``torch.inference_mode``).

    python benchmarks/inference_latency.py --arch fcn8s --backbone vgg16 --sizes 224x224,375x500 --repeats 10

Random weights (the speed does not depend on them). The tutorial's PyTorch reference only takes multiples of
32, so PyTorch gets the image padded to the next multiple of 32 (the JAX model and the ONNX graph pad inside
themselves, which is counted). Each figure is the median of ``--repeats`` calls after ``--warmup``; the runtimes
alternate call by call so that a change in machine load hits all three alike. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import torch

import fcn_jax
from fcn_jax import registry
from fcn_jax.deploy.exporting import export
from fcn_jax.models.fcn import STRIDE
from fcn_jax.pytorch.parity import torch_twin
from fcn_jax.training.config import parse_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="fcn8s", choices=registry.archs(family="tutorial"))
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--sizes", default="224x224,375x500", help="comma-separated HxW")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    fcn_jax.use_fast_cpu_convolutions()  # what the fcn-jax command runs with (fcn_jax/xla_flags.py)
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    model = fcn_jax.create_model(args.arch, num_classes=21, backbone=args.backbone)
    model.eval()
    twin = torch_twin(model).eval()
    session = onnxruntime.InferenceSession(export(model, "onnx"), providers=["CPUExecutionProvider"])
    forward = jax.jit(lambda x: model(x))
    results = []
    for h, w in sizes:
        x = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
        nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        padded = torch.from_numpy(np.pad(nchw, ((0, 0), (0, 0), (0, -h % STRIDE), (0, -w % STRIDE))))
        start = time.perf_counter()
        forward(jnp.asarray(x)).block_until_ready()
        compile_s = time.perf_counter() - start
        runs = {
            "onnxruntime": lambda nchw=nchw: session.run(None, {"images": nchw}),
            "jax": lambda x=x: forward(jnp.asarray(x)).block_until_ready(),
            "pytorch": lambda padded=padded: twin(padded),
        }
        times = {name: [] for name in runs}
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if i >= args.warmup:
                        times[name].append(1000 * (time.perf_counter() - start))
        medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
        print(f"{args.arch}-{args.backbone} {h}x{w}, batch 1: " + ", ".join(f"{k} {v} ms" for k, v in medians.items())
              + f" (JAX compile {compile_s:.1f} s)")
        results.append({"size": [h, w], "ms": medians, "jax_compile_s": round(compile_s, 2)})
    print(json.dumps({"arch": args.arch, "backbone": args.backbone, "batch": 1, "results": results,
                      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
                      "jax": jax.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
