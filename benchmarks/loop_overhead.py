"""What the training loop costs per step beyond the compiled step: a tiny model, batches already in memory.

    python benchmarks/loop_overhead.py --steps 300

Three ways to run the same steps, each timed over ``--steps`` after a warm-up:
- ``compiled step``: the step as a plain ``jax.jit`` function of the split state, called back to back on
  arrays already on the device: the floor;
- ``loop``: what ``fcn-jax train`` does between two log points (batches placed on the devices ahead by
  ``prefetch_to_devices``, ``train_step`` through ``nnx.jit``, the loss accounted on device by ``LossMeter``, the
  progress bar), fetching the loss every ``--log-every`` steps;
- ``loop, host sync per step``: the same, but reading the loss on the host after every step (what the loop did
  before: the host waits for each step before it can enqueue the next).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from fcn_jax.devices import make_mesh, prefetch_to_devices, replicate_state
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.meter import LossMeter
from fcn_jax.training.step import _train_step, train_step


class Tiny(nnx.Module):
    """One 3x3 convolution to ``classes`` logits: a step of well under a millisecond."""

    def __init__(self, classes: int = 3):
        self.conv = nnx.Conv(3, classes, (3, 3), rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.conv(x)


def _setup(size: int, batch: int):
    model = Tiny()
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    mesh = make_mesh()
    replicate_state((model, optimizer), mesh)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "label": rng.integers(0, 3, (batch, size, size)).astype(np.int32)} for _ in range(8)]
    return model, optimizer, mesh, batches


def compiled_floor(steps: int, size: int, batch: int) -> float:
    """Seconds per step of the bare compiled step on arrays already on the device."""
    model, optimizer, _, batches = _setup(size, batch)
    graph, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, images, labels):
        model, optimizer = nnx.merge(graph, state)
        loss = _train_step(model, optimizer, images, labels, cross_entropy, "imagenet")
        return nnx.state((model, optimizer)), loss

    placed = [jax.device_put(b) for b in batches]
    state, loss = step(state, placed[0]["image"], placed[0]["label"])
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(steps):
        state, loss = step(state, placed[i % 8]["image"], placed[i % 8]["label"])
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / steps


def training_loop(steps: int, size: int, batch: int, log_every: int, sync_every_step: bool) -> float:
    """Seconds per step of the training loop's per-step work (see the module docstring)."""
    model, optimizer, mesh, batches = _setup(size, batch)

    def stream(n):
        return prefetch_to_devices((batches[i % 8] for i in range(n)), mesh, depth=2)

    for b in stream(2):  # compile
        jax.block_until_ready(train_step(model, optimizer, b["image"], b["label"], cross_entropy, "imagenet"))
    meter = LossMeter(0)
    bar = tqdm(total=steps, disable=True)
    start = time.perf_counter()
    for step, b in enumerate(stream(steps), 1):
        loss = train_step(model, optimizer, b["image"], b["label"], cross_entropy, "imagenet")
        if sync_every_step:
            float(loss)
        meter.add(loss)
        bar.update(1)
        if step % log_every == 0:
            meter.fetch()
    meter.fetch()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", type=int, default=32, help="images are SIZE x SIZE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported")
    args = p.parse_args(argv)
    shape = (args.steps, args.size, args.batch_size)
    rows = {"compiled_step_ms": [], "loop_ms": [], "loop_sync_per_step_ms": []}
    for _ in range(args.rounds):
        rows["compiled_step_ms"].append(1e3 * compiled_floor(*shape))
        rows["loop_ms"].append(1e3 * training_loop(*shape, args.log_every, False))
        rows["loop_sync_per_step_ms"].append(1e3 * training_loop(*shape, args.log_every, True))
    med = {k: float(np.median(v)) for k, v in rows.items()}
    result = {**{k: round(v, 3) for k, v in med.items()},
              "overhead_ms": round(med["loop_ms"] - med["compiled_step_ms"], 3),
              "overhead_with_sync_ms": round(med["loop_sync_per_step_ms"] - med["compiled_step_ms"], 3),
              "steps": args.steps, "size": args.size, "batch_size": args.batch_size, "log_every": args.log_every,
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "machine": platform.processor() or platform.machine()}
    print(f"compiled step {med['compiled_step_ms']:.3f} ms; loop {med['loop_ms']:.3f} ms "
          f"(+{result['overhead_ms']:.3f}); loop with a host sync per step {med['loop_sync_per_step_ms']:.3f} ms "
          f"(+{result['overhead_with_sync_ms']:.3f})  [medians of {args.rounds} rounds of {args.steps} steps]")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
