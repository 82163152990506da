"""Orbax checkpoints of a training run: model + optimizer state, data-iterator state, and an info
record (step, best mean IoU so far, last metrics, the resolved config).

One ``CheckpointManager`` under ``RUN_DIR/checkpoints`` keeps the latest ``keep`` checkpoints plus
the one with the best validation mean IoU. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so a run killed mid-save leaves the previous checkpoints intact (and the
temporary directory is cleaned up on the next start).
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int):
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["mean_iou"], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=preserve, create=True,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, data_state: dict, info: dict, metrics: dict | None = None) -> None:
        """Save (synchronously: on GPU and TPU the next step donates these buffers). ``metrics`` (with ``mean_iou``)
        marks a checkpoint that competes for "best"."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.state((model, optimizer))),
            data=ocp.args.JsonSave(data_state),
            info=ocp.args.JsonSave(info),
        ), metrics=metrics, force=True)

    def restore(self, step: int, model, optimizer) -> tuple[dict, dict]:
        """Load ``step`` into ``model`` and ``optimizer`` (keeping their shardings); returns the
        data-iterator state and the info saved with it."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((model, optimizer)))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), info=ocp.args.JsonRestore()))
        nnx.update((model, optimizer), restored["state"])
        return restored["data"], restored["info"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
