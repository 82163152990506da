"""Forward and backward time of each convolution of the paper's FCN-8s (VGG16, fc6/fc7 4096 wide) at the shapes
one image of --size meets (padded by 100 pixels, as the paper's nets are), fcn-jax's ``Conv2d`` against
PyTorch's ``conv2d``: where the training step's time goes, layer by layer.

    python benchmarks/paper_layers.py [--size 64] [--xla-conv]

``--xla-conv`` times fc6 as XLA's plain convolution instead of fcn-jax's matrix product (the smallest
reproduction of the slow weight gradient it avoids). Last line: the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax.models.layers import Conv2d
from fcn_jax.xla_flags import use_fast_cpu_convolutions


def _layers(size: int) -> list[tuple[str, int, int, int, int, int]]:
    """``(name, input side, in channels, out channels, kernel, padding)`` of each convolution."""
    side, cin, layers = size, 3, []
    for stage, (width, count) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for i in range(1, count + 1):
            pad = 100 if (stage, i) == (1, 1) else 1
            layers.append((f"conv{stage}_{i}", side, cin, width, 3, pad))
            side, cin = side + 2 * pad - 2, width
        side = -(-side // 2)  # the paper's pools round up
    return [*layers, ("fc6", side, 512, 4096, 7, 0), ("fc7", side - 6, 4096, 4096, 1, 0),
            ("score_fr", side - 6, 4096, 21, 1, 0)]


def median_ms(run, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``run`` after one untimed call, in ms."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _time_layer(name: str, side: int, cin: int, cout: int, k: int, pad: int, *, repeats: int, xla_conv: bool,
                torch) -> dict:
    layer = Conv2d(cin, cout, k, padding=pad, rngs=nnx.Rngs(0))
    if xla_conv:
        layer._by_patches = lambda *_: False
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, side, side, cin), np.float32))
    g = jnp.ones(layer(x).shape, jnp.float32)
    graphdef, params = nnx.split(layer)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    backward = jax.jit(lambda p, x, g: jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), p, x)[1](g))
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.tensor(np.asarray(layer.kernel[...])).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tg = torch.tensor(np.asarray(g)).permute(0, 3, 1, 2).contiguous()

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(tx, tw, padding=pad)

    def torch_step():
        torch.autograd.grad(torch.nn.functional.conv2d(tx, tw, padding=pad), (tx, tw), tg)

    return {"layer": name, "input": [side, side, cin], "out_channels": cout, "kernel": k,
            "jax_forward_ms": median_ms(lambda: forward(params, x).block_until_ready(), repeats),
            "jax_backward_ms": median_ms(lambda: jax.block_until_ready(backward(params, x, g)), repeats),
            "torch_forward_ms": median_ms(torch_forward, repeats),
            "torch_forward_backward_ms": median_ms(torch_step, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="side of the square input image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--xla-conv", action="store_true", help="fc6 as XLA's convolution (the slow path)")
    args = parser.parse_args()
    use_fast_cpu_convolutions()
    import torch

    torch.set_num_threads(2)
    rows = []
    for layer in _layers(args.size):
        row = _time_layer(*layer, repeats=args.repeats, xla_conv=args.xla_conv, torch=torch)
        rows.append(row)
        jax_ms, torch_ms = row["jax_forward_ms"] + row["jax_backward_ms"], row["torch_forward_backward_ms"]
        print(f"{row['layer']:9s} {'x'.join(map(str, row['input']))} -> {row['out_channels']}, {row['kernel']}x"
              f"{row['kernel']}: JAX forward {row['jax_forward_ms']:7.1f} ms, backward {row['jax_backward_ms']:7.1f} "
              f"ms | PyTorch forward {row['torch_forward_ms']:7.1f} ms, forward + backward {torch_ms:7.1f} ms | "
              f"JAX/PyTorch {jax_ms / torch_ms:.2f}", flush=True)
    print(json.dumps({"size": args.size, "xla_conv": args.xla_conv, "rows": rows}))


if __name__ == "__main__":
    main()
