"""Runs a few training steps on a mesh of CPU devices and saves losses, parameters and BatchNorm
statistics to an .npz; started in subprocesses by test_multidevice.py (device counts are fixed when JAX
starts, so each configuration needs its own process).

    python tests/multidevice_worker.py OUT.npz WEIGHTS NUM_DEVICES[,NUM_DEVICES...] \
        [COORDINATOR NUM_PROCESSES PROCESS_ID]

One run per device count, one after the other, each from the initial model in WEIGHTS (an fcn-jax .safetensors made
by the test: loading it compiles nothing, a random initialisation compiles a program per parameter shape) on the
first devices of the process's own; OUT holds each run's arrays under ``"<count>/"``.
"""

from __future__ import annotations

import itertools
import sys

import jax
import numpy as np
import optax
from flax import nnx


def run(weights: str, num_devices: int) -> dict:
    import fcn_jax
    from fcn_jax.data import Loader, SyntheticShapes
    from fcn_jax.devices import host_array, make_mesh, replicate_state, shard_batch
    from fcn_jax.training.losses import cross_entropy
    from fcn_jax.training.optim import make_optimizer
    from fcn_jax.training.step import train_step
    from fcn_jax.weights.native import flat_variables

    model = fcn_jax.load_model(weights)
    model.train()
    tx = make_optimizer("sgd", optax.constant_schedule(0.01), momentum=0.9, weight_decay=1e-4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    mesh = make_mesh(num_devices)
    replicate_state((model, optimizer), mesh)
    loader = Loader(SyntheticShapes("train", num_samples=64, size=(32, 32)), 8, seed=0, workers=0,
                    process_index=jax.process_index(), process_count=jax.process_count())
    losses = []
    for batch in itertools.islice(loader, 3):
        batch = shard_batch(batch, mesh)
        losses.append(float(host_array(train_step(model, optimizer, batch["image"], batch["label"], cross_entropy))))
    return {"losses": np.array(losses), "devices": mesh.size,
            **{k: host_array(v[...]) for k, v in flat_variables(model).items()}}


if __name__ == "__main__":
    out, weights, counts = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3].split(",")]
    if len(sys.argv) > 4:
        jax.distributed.initialize(coordinator_address=sys.argv[4], num_processes=int(sys.argv[5]),
                                   process_id=int(sys.argv[6]))
    runs = {f"{n}/{key}": value for n in counts for key, value in run(weights, n).items()}
    if jax.process_index() == 0:
        np.savez(out, **runs)
