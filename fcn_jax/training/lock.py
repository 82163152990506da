"""One training run per folder.

``RUN_DIR/.lock`` names the process that holds the folder. It is created atomically (``O_CREAT | O_EXCL``)
before anything else in the folder is created, cleaned or resumed, so a second ``train`` on the same folder
is refused without touching the checkpoint a running run is writing. It is removed when the run ends,
however it ends, except under SIGKILL: a lock whose process no longer runs on this host (same PID and start
time) is stale and taken over with a note. A lock held from another host cannot be checked from here and is
respected; the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from fcn_jax.errors import RunError
from fcn_jax.notes import note

LOCK_NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: clock ticks since boot, with the boot's id), to tell a live process
    from a later one that reuses its PID; None where /proc cannot say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def _alive(holder: dict) -> bool:
    """Whether the process that wrote ``holder`` still runs (or cannot be shown not to)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    started = holder.get("process_start")
    return started is None or started == _start_time(pid)


class RunLock:
    """``with RunLock(run_dir):`` holds the folder for the block; see the module docstring."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _start_time(os.getpid()),
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # gone, or being written this instant

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or _alive(holder):
                    raise RunError(self._in_use(holder)) from None
                # Move the stale lock aside (atomic: of two processes taking it over, one wins the rename).
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                    self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink()
                    note("took over the stale lock of process %s on %s (started %s), which no longer runs",
                         holder.get("pid"), holder.get("host"), holder.get("started"))
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.owner, f)
            except BaseException:  # a stop request or an error right after taking it: nobody holds it
                self.path.unlink(missing_ok=True)
                raise
            return self
        raise RunError(self._in_use(self._holder()))

    def _in_use(self, holder: dict | None) -> str:
        who = (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})" if holder
               else "another process")
        return (f"{self.path.parent} is in use by {who}: wait for that run to end or choose another --run-dir "
                f"(if no such run is alive any more, delete {self.path})")

    def __exit__(self, *exc) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike) -> Iterator[None]:
    """The folder's lock for the block. In a multi-process run, process 0 takes it (the folder is shared)
    and every process learns whether it could, so that all of them stop together when it could not."""
    if jax.process_count() == 1:
        with RunLock(Path(run_dir)):
            yield
        return
    lock, refusal = RunLock(Path(run_dir)), None
    if jax.process_index() == 0:
        try:
            lock.__enter__()
        except RunError as e:
            refusal = e
    if not multihost_utils.broadcast_one_to_all(np.int32(refusal is None)):
        raise refusal or RunError(f"process 0 could not take the lock of {run_dir}; its output says why")
    try:
        yield
    finally:
        if jax.process_index() == 0:
            lock.__exit__(None, None, None)
