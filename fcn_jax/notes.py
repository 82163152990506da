"""The library's one voice: every note fcn-jax gives (what it copied, skipped, took over or assumed) goes
through :func:`note`, the ``fcn_jax`` logger, so ``train()`` from Python says what ``fcn-jax train`` says.

On the first note the library gives that logger a handler of its own, unless the application gave it one
first: ``note: ...`` lines on the standard error of that moment (notebooks and test harnesses replace it).
While the logger's level is unset, each note sets it to INFO. To route the notes elsewhere, add a handler to
``logging.getLogger("fcn_jax")`` before using fcn-jax; to silence them, set that logger's level above INFO.
Importing fcn-jax configures nothing.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "fcn_jax"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when each note is given."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def logger() -> logging.Logger:
    """The ``fcn_jax`` logger, set up as the module doc says."""
    log = logging.getLogger(LOGGER)
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        log.addHandler(handler)
    # Checked on every note, not only when the handler is added: code that sets the level and later puts it back
    # (pytest's caplog.at_level) leaves it unset, and the notes would fall below the root logger's WARNING.
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


def note(message: str, *args) -> None:
    """Give a note (``message % args``): something the user should know that is not an error."""
    logger().info(message, *args)


def warn(message: str, *args) -> None:
    """Give a warning: something that may not do what the user meant."""
    logger().warning(message, *args)
