"""Samples loaded in worker processes, so that reading and augmenting scale with the host's cores.

The standard library's ``ProcessPoolExecutor`` with the *spawn* start method (forking a process that
runs JAX can deadlock). Each worker receives the load function once, at start, and then runs one task
(typically a whole batch) per item; large arrays come back through shared memory. The caller submits
items in the order it needs them and reads the results in that order, so what comes out never depends
on the number of workers or on which worker was fastest. ``count=0`` loads in the calling process, one
item at a time as it is asked for.

Workers ignore SIGINT and SIGTERM (the main process decides when to stop, and shuts them down), and on
Linux they are killed by the kernel when the main process dies, even by SIGKILL: no orphans. A sample
that fails raises in the caller with its own message (a :class:`~fcn_jax.errors.FcnJaxError` as it
was raised; anything else as a ``DatasetError`` naming the sample and the fix); a worker that dies
(e.g. killed for memory) is a ``DatasetError`` too, never a hang.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import itertools
import mmap
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from typing import Any, NamedTuple

import numpy as np

from fcn_jax.errors import ConfigError, DatasetError, FcnJaxError

_load: Callable[[Any], Any] | None = None  # the worker's sample function, set once by _start_worker


def default_workers() -> int:
    """The worker count for ``workers=None``: one per core that the process may use, less one for the main
    process (which feeds the devices), at least 1 and at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores - 1))


def _start_worker(load: Callable[[Any], Any], parent: int) -> None:
    global _load
    _load = load
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux's PR_SET_PDEATHSIG: die with the main process
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # it died while this worker was starting, before the line above
        os._exit(0)


def _run(item):
    try:
        return _to_shared(_load(item))
    except FcnJaxError:
        raise
    except Exception as e:
        raise worker_failure(repr(item), e) from None


class SharedArray(NamedTuple):
    """A worker's array waiting in shared memory for the main process (:func:`_from_shared` frees it)."""

    name: str
    shape: tuple
    dtype: str


_SHARED_FROM = 1 << 16  # bytes: smaller arrays travel through the pipe


def _to_shared(value):
    """``value`` with its large numpy arrays (in dicts, tuples and lists) moved to shared memory: the result pipe
    then carries names, not megabytes (a 6 MB batch through a 64 KB pipe idles the worker ~20 ms). When one
    array cannot be moved, the blocks made for the others are freed before the error goes on."""
    moved: list[SharedArray] = []
    try:
        return _moved_to_shared(value, moved)
    except BaseException:
        _from_shared(moved, keep=False)
        raise


def _moved_to_shared(value, moved: list):
    if isinstance(value, np.ndarray) and value.nbytes >= _SHARED_FROM:
        block = _shared_block(value.nbytes)
        np.ndarray(value.shape, value.dtype, buffer=block.buf)[...] = value
        block.close()
        moved.append(SharedArray(block.name, value.shape, value.dtype.str))
        return moved[-1]
    if isinstance(value, dict):
        return {k: _moved_to_shared(v, moved) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not isinstance(value, SharedArray):
        return type(value)(_moved_to_shared(v, moved) for v in value)
    return value


def _shared_block(size: int) -> shared_memory.SharedMemory:
    """A new shared-memory block of ``size`` bytes, its memory reserved now: a mount too small for it (a
    container's /dev/shm is 64 MiB by default) is a clear error here, not a worker killed by SIGBUS when it
    writes the batch."""
    block = shared_memory.SharedMemory(create=True, size=size)
    fd = getattr(block, "_fd", -1)
    try:
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        block.close()
        block.unlink()
        if e.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        raise DatasetError(f"the shared memory for passing batches between processes is full: a batch needs "
                           f"{size / 2**20:.1f} MiB more than /dev/shm has free. Load in the main process with "
                           f"--workers 0 (workers=0), use fewer workers or smaller batches, or give /dev/shm more "
                           f"space (Docker: --shm-size=2g; Kubernetes: an emptyDir with medium Memory)") from None
    return block


def _from_shared(value, keep: bool = True):
    """The arrays of ``value`` back from shared memory (with ``keep``; else just freed). Each block's name is
    removed at once; its memory goes back to the system when the array returned is garbage-collected."""
    if isinstance(value, SharedArray):
        block = shared_memory.SharedMemory(name=value.name)
        try:
            return _mapped(block, value.shape, np.dtype(value.dtype)) if keep else None
        finally:
            block.close()
            block.unlink()
    if isinstance(value, dict):
        return {k: _from_shared(v, keep) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_from_shared(v, keep) for v in value)
    return value


def _mapped(block: shared_memory.SharedMemory, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """The array in ``block`` through a mapping of its own, not a copy: copying a batch out cost the main
    process ~3 ms per 6 MB plus the page faults of the fresh copy, competing with the workers for cores."""
    fd = getattr(block, "_fd", -1)  # POSIX shared memory; elsewhere (Windows) the array is copied
    if fd < 0:
        return np.ndarray(shape, dtype, buffer=block.buf).copy()
    mapping = mmap.mmap(fd, block.size)  # outlives block.close(): the array's buffer keeps it open
    return np.frombuffer(mapping, dtype, count=int(np.prod(shape))).reshape(shape)


def _free_when_done(future: concurrent.futures.Future) -> None:
    """A result nobody will read still holds shared memory: free it once the worker has delivered it."""
    def free(done: concurrent.futures.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            _from_shared(done.result(), keep=False)

    future.add_done_callback(free)


def in_worker() -> bool:
    """Whether this process is one of the workers."""
    return _load is not None


def worker_failure(what: str, error: Exception) -> DatasetError:
    """A bug in a user's dataset, met in a worker: one line naming the sample, its traceback kept as an attribute
    (the worker's traceback objects cannot travel)."""
    failure = DatasetError(f"loading {what} failed in a data worker: {type(error).__name__}: {error}. "
                           f"Run with --workers 0 (workers=0) to see the traceback in the main process")
    failure.worker_traceback = traceback.format_exc()
    return failure


class SampleWorkers:
    """``count`` worker processes that each call ``load(item)`` for the items submitted to them (an item is
    typically a whole batch: one round trip per batch, and the worker stacks it).

    ``load`` must be picklable (a module-level function, or an object of a module-level class, holding
    the dataset): spawned workers import it by name. Started on the first :meth:`submit`; :meth:`close`
    (or leaving the ``with`` block, or garbage collection) stops them."""

    def __init__(self, load: Callable[[Any], Any], count: int):
        if count < 0:
            raise ConfigError(f"--workers must be >= 0, got {count}")
        if count > 0:
            try:  # what spawning the workers would do, failing here with the fix instead of deep in multiprocessing
                pickle.dumps(load)
            except Exception as e:
                raise ConfigError(f"the dataset cannot be sent to worker processes ({type(e).__name__}: {e}): define "
                                  f"its class at the top level of a module, or load in this process with --workers 0 "
                                  f"(workers=0)") from None
        self.load, self.count = load, count
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def submit(self, item):
        """A future of ``load(item)``; its ``result()`` raises the sample's error (see the module)."""
        if self.count == 0:
            return _LocalFuture(self.load, item)
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(self.load, os.getpid()))
        try:
            return _WorkerFuture(self._pool.submit(_run, item), self.count)
        except BrokenProcessPool:  # a worker died before this item could even be queued
            raise _worker_died(self.count) from None

    def in_order(self, items: Iterator, ahead: int) -> Iterator:
        """``load(item)`` for every item, in order, with up to ``ahead`` items submitted before their results
        are needed; leaving the loop early cancels what was not started."""
        pending: collections.deque = collections.deque()
        try:
            while True:
                for item in itertools.islice(items, ahead - len(pending)):
                    pending.append(self.submit(item))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SampleWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _worker_died(count: int) -> DatasetError:
    return DatasetError(
        f"a data worker process died: it was killed (out of memory? use fewer than {count} workers), or it could "
        f"not start (workers import the main script again: a script that trains must keep its work under "
        f"`if __name__ == \"__main__\":`, and a dataset class defined in a notebook cannot be imported by them). "
        f"--workers 0 (workers=0) loads in the main process")


class _LocalFuture:
    def __init__(self, load, item):
        self.load, self.item = load, item

    def result(self):
        return self.load(self.item)

    def cancel(self) -> bool:
        return True


class _WorkerFuture:
    def __init__(self, future: concurrent.futures.Future, count: int):
        self.future, self.count = future, count

    def result(self):
        try:
            return _from_shared(self.future.result())
        except BrokenProcessPool:
            raise _worker_died(self.count) from None

    def cancel(self) -> bool:
        if self.future.cancel():
            return True
        _free_when_done(self.future)  # running or done: its shared memory is freed when it is delivered
        return False
