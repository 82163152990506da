"""Forward time of each kind of convolution in torchvision's FCN-ResNet50 (dilated, output stride 8) at one input
size, fcn-jax's ``Conv2d`` against PyTorch's ``conv2d``, times the number of such convolutions in the net:
where the forward pass's time goes, and which layers JAX loses on.

    python benchmarks/resnet_layers.py [--size 520] [--batch 2] [--arch fcn_resnet50]

Last line: the figures as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from paper_layers import median_ms  # this folder is on the path of a script run from it

from fcn_jax.models.layers import Conv2d
from fcn_jax.models.resnet import BLOCKS, DILATE, EXPANSION, STRIDES, WIDTHS
from fcn_jax.xla_flags import use_fast_cpu_convolutions


def _convolutions(arch: str, size: int) -> collections.Counter:
    """``(input side, in, out, kernel, stride, dilation)`` -> how many such convolutions the network runs."""
    found = collections.Counter()
    side = (size + 1) // 2
    found[(size, 3, 64, 7, 2, 1)] += 1
    side = (side + 1) // 2  # the max-pool
    cin, dilation = 64, 1
    for blocks, width, stride, dilate in zip(BLOCKS[arch.split("_")[1]], WIDTHS, STRIDES, DILATE, strict=True):
        first_dilation = dilation
        if dilate:
            dilation, stride = dilation * stride, 1
        for b in range(blocks):
            s, d = (stride, first_dilation) if b == 0 else (1, dilation)
            found[(side, cin, width, 1, 1, 1)] += 1
            found[(side, width, width, 3, s, d)] += 1
            out_side = (side + 1) // 2 if s == 2 else side
            found[(out_side, width, width * EXPANSION, 1, 1, 1)] += 1
            if b == 0:
                found[(side, cin, width * EXPANSION, 1, s, 1)] += 1  # the downsample
            side, cin = out_side, width * EXPANSION
    found[(side, 2048, 512, 3, 1, 1)] += 1  # FCNHead
    found[(side, 512, 21, 1, 1, 1)] += 1
    found[(side, 1024, 256, 3, 1, 1)] += 1  # the aux head
    found[(side, 256, 21, 1, 1, 1)] += 1
    return found


def _time(side, cin, cout, k, stride, dilation, *, batch: int, repeats: int, torch) -> tuple[float, float]:
    pad = dilation * (k // 2)
    layer = Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, side, side, cin), np.float32))
    graphdef, params = nnx.split(layer)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    tw = torch.tensor(np.asarray(layer.kernel[...])).permute(3, 2, 0, 1).contiguous()

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad, dilation=dilation)

    return (median_ms(lambda: forward(params, x).block_until_ready(), repeats),
            median_ms(torch_forward, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="fcn_resnet50", choices=("fcn_resnet50", "fcn_resnet101"))
    parser.add_argument("--size", type=int, default=520)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    use_fast_cpu_convolutions()
    import torch

    torch.set_num_threads(2)
    rows, totals = [], [0.0, 0.0]
    for (side, cin, cout, k, stride, dilation), count in _convolutions(args.arch, args.size).items():
        jax_ms, torch_ms = _time(side, cin, cout, k, stride, dilation, batch=args.batch, repeats=args.repeats,
                                 torch=torch)
        totals[0] += count * jax_ms
        totals[1] += count * torch_ms
        rows.append({"input": [side, side, cin], "out": cout, "kernel": k, "stride": stride, "dilation": dilation,
                     "count": count, "jax_ms": jax_ms, "torch_ms": torch_ms})
        print(f"{count:2d} x {side}x{side}x{cin} -> {cout}, {k}x{k} stride {stride} dilation {dilation}: JAX "
              f"{jax_ms:7.1f} ms, PyTorch {torch_ms:7.1f} ms, JAX/PyTorch {jax_ms / torch_ms:.2f}", flush=True)
    print(f"all convolutions: JAX {totals[0]:.0f} ms, PyTorch {totals[1]:.0f} ms, JAX/PyTorch "
          f"{totals[0] / totals[1]:.2f}")
    print(json.dumps({"arch": args.arch, "size": args.size, "batch": args.batch, "rows": rows,
                      "jax_ms": totals[0], "torch_ms": totals[1]}))


if __name__ == "__main__":
    main()
