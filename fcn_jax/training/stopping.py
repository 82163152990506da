"""Stopping a run when asked: SIGTERM (what preemptible VMs, Kubernetes and SLURM send) or Ctrl-C.

The run finishes the step in progress, writes a checkpoint of it (model, optimizer, data position), prints
where it stopped and the command that resumes it, and exits with :data:`EXIT_STOPPED`. A second Ctrl-C
exits at once (status 130) without saving.

In a multi-process run every process must stop at the same step, or the others would wait forever in the
step's collectives. There JAX's preemption service (started by ``jax.distributed.initialize``) catches
SIGTERM, tells every process, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
names one step at which all of them stop; Ctrl-C is handed to the same service.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request, a checkpoint was written, resume to continue
EXIT_SECOND_INTERRUPT = 130


class TrainingStopped(Exception):
    """The run stopped on request after writing a checkpoint; the message says how to resume it."""


class StopRequests:
    """``with StopRequests() as stop:`` turns SIGTERM and SIGINT into ``stop.requested(step)`` being True
    after the step in progress (see the module docstring); the previous handlers come back afterwards."""

    def __init__(self):
        self.signal_name: str | None = None
        self._multi_process = jax.process_count() > 1
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        signals = (signal.SIGINT,) if self._multi_process else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:  # in a multi-process run, SIGTERM stays with JAX's preemption service
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            print("\nfcn-jax: second Ctrl-C: exiting at once without a checkpoint (the last one written is kept)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_SECOND_INTERRUPT)
        self.signal_name = name
        print(f"\nfcn-jax: {name} received: stopping after the current step and writing a checkpoint "
              f"(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        if self._multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells every process

    def requested(self, step: int) -> bool:
        """Whether to stop now, after ``step``; called after every step (a local check, no device sync)."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        return self.signal_name or "a preemption notice (SIGTERM to one of the run's processes)"
