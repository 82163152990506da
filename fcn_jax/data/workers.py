"""Samples loaded in worker processes, so that reading and augmenting scale with the host's cores.

The standard library's ``ProcessPoolExecutor`` with the *spawn* start method (forking a process that
runs JAX can deadlock). Each worker receives the sample function once, at start, and then loads one
sample per task; the caller submits tasks in the order it needs them and reads the results in that
order, so what comes out never depends on the number of workers or on which worker was fastest.
``count=0`` loads in the calling process, one sample at a time as it is asked for.

Workers ignore SIGINT and SIGTERM (the main process decides when to stop, and shuts them down), and on
Linux they are killed by the kernel when the main process dies, even by SIGKILL: no orphans. A sample
that fails raises in the caller with its own message (a :class:`~fcn_jax.errors.FcnJaxError` as it
was raised; anything else as a ``DatasetError`` naming the sample and the fix); a worker that dies
(e.g. killed for memory) is a ``DatasetError`` too, never a hang.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

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
        return _load(item)
    except FcnJaxError:
        raise
    except Exception as e:  # a bug in a user's dataset: the traceback travels as the cause
        raise _worker_error(item, e, traceback.format_exc()) from None


def _worker_error(item, error: Exception, trace: str) -> DatasetError:
    failure = DatasetError(f"loading sample {item} failed in a data worker: {type(error).__name__}: {error}. "
                           f"Run with --workers 0 (workers=0) to see the traceback in the main process")
    failure.worker_traceback = trace
    return failure


class SampleWorkers:
    """``count`` worker processes that each call ``load(item)`` for the items submitted to them.

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
        return _WorkerFuture(self._pool.submit(_run, item), item, self.count)

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


class _LocalFuture:
    def __init__(self, load, item):
        self.load, self.item = load, item

    def result(self):
        return self.load(self.item)

    def cancel(self) -> bool:
        return True


class _WorkerFuture:
    def __init__(self, future: concurrent.futures.Future, item, count: int):
        self.future, self.item, self.count = future, item, count

    def result(self):
        try:
            return self.future.result()
        except BrokenProcessPool:
            raise DatasetError(
                f"a data worker process died while loading sample {self.item}: it was killed (out of memory? use "
                f"fewer than {self.count} workers), or it could not start (workers import the main script again: "
                f"a script that trains must keep its work under `if __name__ == \"__main__\":`, and a dataset class "
                f"defined in a notebook cannot be imported by them). --workers 0 (workers=0) loads in the main "
                f"process") from None

    def cancel(self) -> bool:
        return self.future.cancel()
