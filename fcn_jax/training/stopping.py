"""Stopping a run when asked: SIGTERM (what preemptible VMs, Kubernetes and SLURM send) or Ctrl-C.

The run finishes the step in progress, writes a checkpoint of it (model, optimizer, data position), prints
where it stopped and the command that resumes it, and exits with :data:`EXIT_STOPPED`. A second Ctrl-C
exits at once (status 130) without saving.

In a multi-process run every process must stop at the same step, or the others would wait forever in the
step's collectives. There JAX's preemption service (started by ``jax.distributed.initialize``) catches
SIGTERM, tells every process, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
names one step at which all of them stop; Ctrl-C is handed to the same service.

Before the first step (reading the datasets, building the model, starting workers; from the first second
of ``fcn-jax train``) there is no step to finish: a stop request ends the run at once, through the normal
unwinding, so the run folder's lock is released and nothing half-made is left. The module imports JAX only
when a run uses it, so that the command can catch signals before JAX has loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped on request, a checkpoint was written, resume to continue
EXIT_SECOND_INTERRUPT = 130


class TrainingStopped(Exception):
    """The run stopped on request after writing a checkpoint; the message says how to resume it."""


class StopRequests:
    """``with StopRequests() as stop:`` catches SIGTERM and SIGINT: before :meth:`steps_begin` they stop the run
    at once (:class:`TrainingStopped`, raised where the program is); after it they make
    ``stop.requested(step)`` True after the step in progress (see the module docstring). The previous handlers
    come back afterwards. ``multi_process``: whether the run spans processes (default: JAX says; pass False
    to catch signals before JAX is loaded)."""

    def __init__(self, multi_process: bool | None = None):
        self.signal_name: str | None = None
        self._multi_process = multi_process
        self._stepping = False
        self._previous: dict = {}
        self._unraisable_hook = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        if self._multi_process is None:
            import jax

            self._multi_process = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi_process else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:  # in a multi-process run, SIGTERM stays with JAX's preemption service
            self._previous[sig] = signal.signal(sig, self._on_signal)
            outer = getattr(self._previous[sig], "__self__", None)  # a request the enclosing one has seen
            if isinstance(outer, StopRequests) and outer.signal_name and not self.signal_name:
                self.signal_name = outer.signal_name
        self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._on_unraisable
        return self

    def _on_unraisable(self, unraisable) -> None:
        """A stop raised inside a callback whose exceptions Python ignores (garbage collection) is remembered
        and honoured at :meth:`steps_begin`; anything else is reported as usual."""
        if not isinstance(unraisable.exc_value, TrainingStopped):
            self._unraisable_hook(unraisable)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._unraisable_hook is not None and sys.unraisablehook == self._on_unraisable:
            sys.unraisablehook = self._unraisable_hook  # (a hook installed since, which calls ours, stays)

    def steps_begin(self) -> None:
        """The training loop starts: from here on a stop request waits for the step in progress (and after the
        last step, the run finishes writing its results). A request received earlier whose exception was
        swallowed (a signal handled inside a garbage-collection callback, whose exceptions Python ignores)
        stops the run here."""
        if self.signal_name is not None:
            raise self._stopped_before_start()
        self._stepping = True

    def _stopped_before_start(self) -> TrainingStopped:
        return TrainingStopped(f"{self.signal_name} received before training began: stopped; nothing was trained "
                               f"yet and nothing was written (earlier checkpoints, if any, are as they were). Start "
                               f"it again with the same command")

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self._stepping:
            self.signal_name = name
            raise self._stopped_before_start()
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
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        return self.signal_name or "a preemption notice (SIGTERM to one of the run's processes)"
