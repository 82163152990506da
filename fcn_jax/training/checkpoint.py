"""Orbax checkpoints of a training run: model + optimizer state, data-iterator state, and an info
record (step, best mean IoU so far, last metrics, the resolved config).

One ``CheckpointManager`` under ``RUN_DIR/checkpoints`` keeps the latest ``keep`` checkpoints plus
the one with the best validation mean IoU. Saving is asynchronous: training goes on while orbax writes
(one checkpoint at a time), and the run waits for the last write before it reports or exits. Orbax
writes each checkpoint to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact (and the temporary directory is cleaned up on the next start, which
holds the folder's lock by then). A checkpoint
that does not restore (a truncated file, a damaged record) is skipped for the newest one that does, and moved
to ``RUN_DIR/damaged_checkpoints/`` so that the resumed run can write that step again.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from fcn_jax.errors import RunError, first_line, root_cause


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int):
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["mean_iou"], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=preserve, create=True,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, data_state: dict, info: dict, metrics: dict | None = None) -> None:
        """Start saving ``step`` and return once the arrays are copied off the devices (so the next step may
        donate them); the files are written in the background, under a temporary name until complete. A write
        error surfaces at the next :meth:`save` or :meth:`wait`. ``metrics`` (with ``mean_iou``) marks a
        checkpoint that competes for "best"."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.state((model, optimizer))),
            data=ocp.args.JsonSave(data_state),
            info=ocp.args.JsonSave(info),
        ), metrics=metrics, force=True)

    def restore(self, step: int, model, optimizer) -> tuple[dict, dict]:
        """Load ``step`` into ``model`` and ``optimizer`` (keeping their shardings); returns the
        data-iterator state and the info saved with it."""
        for item in ("data", "info"):  # orbax's own error for a damaged record does not say which file it is
            record = self.directory / str(step) / item / "metadata"
            try:
                json.loads(record.read_text())
            except (OSError, ValueError) as e:
                raise RunError(f"{record} is not a readable JSON record ({first_line(e)})") from None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((model, optimizer)))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), info=ocp.args.JsonRestore()))
        nnx.update((model, optimizer), restored["state"])
        return restored["data"], restored["info"]

    def restore_newest(self, model, optimizer) -> tuple[int, dict, dict, list[tuple[int, str]]]:
        """Restore the newest checkpoint that restores: ``(step, data state, info, skipped)``, ``skipped``
        naming each newer checkpoint that failed and why. A RunError lists them all when none restores."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                data, info = self.restore(step, model, optimizer)
            except Exception as e:  # whatever orbax or tensorstore raise for a damaged checkpoint
                _mute_aborted_restore_reports()
                skipped.append((step, first_line(root_cause(e))))
                continue
            self._set_aside([failed for failed, _ in skipped])
            return step, data, info, skipped
        failed = "; ".join(f"checkpoint {step}: {why}" for step, why in skipped)
        raise RunError(f"no checkpoint in {self.manager.directory} could be restored ({failed}); start a new run, "
                       f"or seed one from the run's weights with --init-weights")

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged checkpoints out of the manager's way (process 0; every process waits for it)."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged_checkpoints"
            aside.mkdir(exist_ok=True)
            for step in steps:
                os.replace(self.directory / str(step), aside / f"{step}-set-aside-{int(time.time())}")
        multihost_utils.sync_global_devices("fcn-jax: damaged checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        """Wait until the checkpoint being written is complete (raising its write error, if any)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, kind, error, trace) -> None:
        # On errors too: an unclosed manager's thread prints a traceback at interpreter exit. A failed last
        # write must not hide the error that is already on its way out.
        try:
            self.close()
        except Exception:
            if kind is None:
                raise


_NOISE = ("Encountered error while reading array index", "Event loop is closed", "OUT_OF_RANGE")


def _is_restore_noise(error: BaseException | None) -> bool:
    return error is not None and any(text in str(error) for text in _NOISE)


def _mute_aborted_restore_reports() -> None:
    """After orbax gave up on a damaged checkpoint, the reads it left in flight, its coroutines and futures
    report the same error again as they finish or are collected, through Python's unraisable hook,
    ``sys.excepthook`` (tensorstore's callbacks into a closed event loop) and the asyncio logger: thousands of
    lines for one damaged file, for as long as the process lives. From the first failed restore on, exactly
    those reports are dropped (the failure is reported once, in one line); everything else passes through."""
    if getattr(sys.unraisablehook, "fcn_jax_restore_filter", False):
        return
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

    def unraisable(report):
        if not _is_restore_noise(report.exc_value):
            unraisable_hook(report)

    def excepthook(kind, value, traceback):
        if not _is_restore_noise(value):
            except_hook(kind, value, traceback)

    unraisable.fcn_jax_restore_filter = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    atexit.register(time.sleep, 0.5)  # reads still in flight at exit would report after the hooks are gone
    logging.getLogger("asyncio").addFilter(
        lambda record: not (_is_restore_noise(record.exc_info[1] if record.exc_info else None)
                            or _is_restore_noise(record.getMessage())))
