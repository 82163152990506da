"""The errors fcn-jax raises for bad input: each means "your input is wrong" and says what to do.

``fcn-jax`` prints exactly these as one line and exits with status 2; any other exception is a bug in
fcn-jax (or in a library under it) and keeps its traceback (status 1). Python callers can catch
:class:`FcnJaxError` for all of them; it derives from ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_SHOWN = 20  # keys listed per category before "... and N more"


class FcnJaxError(ValueError):
    """Bad user input (a file, a weights layout, a dataset, an option); the message says what to do."""


class ConfigError(FcnJaxError):
    """An option, argument or configuration that is unknown, out of range or inconsistent."""


class MissingExtraError(FcnJaxError):
    """A feature that needs an optional dependency (an extra such as ``fcn-jax[torch]``) that is not installed."""


class WeightsError(FcnJaxError):
    """Weights that cannot be read or do not fit the model."""


class DatasetError(FcnJaxError):
    """A dataset file, folder or label that cannot be used as it is."""


class InputError(FcnJaxError):
    """Arrays handed to a model or to ``predict`` with the wrong shape, dtype or size."""


class RunError(FcnJaxError):
    """A training run's folder that cannot be started or resumed as asked."""


class OutputError(FcnJaxError):
    """A file that cannot be written where it was asked for (a read-only or missing folder, a full disk)."""


class TrainingDiverged(FcnJaxError):
    """The loss or the parameters became NaN or infinite."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name where the message is empty), for quoting
    a library's error inside one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_values(source, tensors: Mapping[str, tuple[np.ndarray, bool]]) -> None:
    """A WeightsError naming every tensor of ``source`` that a model cannot use: ``tensors`` maps a name to
    ``(values, should_be_float)``; integers where floats belong (a quantised file) and NaN or infinite
    values (saved from a model that had diverged) are refused."""
    problems = []
    for name, (values, should_be_float) in tensors.items():
        floating = values.dtype.kind == "f" or "float" in values.dtype.name  # bfloat16 too (kind "V" in numpy)
        if should_be_float and not floating:
            problems.append(f"{name} is {values.dtype}, not floating point (a quantised file?)")
        elif floating and not np.isfinite(values.astype(np.float32)).all():
            problems.append(f"{name} holds NaN or infinite values (saved from a model that had diverged?)")
    if problems:
        shown = "; ".join(problems[:_SHOWN]) + (f"; ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN
                                                 else "")
        raise WeightsError(f"{source}: {shown}. Use weights saved before the problem (an earlier checkpoint) "
                           f"or convert the original floating-point weights again")


def root_cause(error: BaseException) -> BaseException:
    """The exception at the end of ``error``'s chain of causes: what actually went wrong, below a library's
    wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def check_keys(target: str, expected: Mapping[str, tuple], found: Mapping[str, tuple], hints: Sequence[str] = (),
               *, strict: bool = True) -> None:
    """One WeightsError listing every missing, unexpected (with ``strict``) and mis-shaped key when the
    ``found`` shapes (``{key: shape}``) do not fit the ``expected`` ones; nothing when they do."""
    missing = [(k, shape) for k, shape in expected.items() if k not in found]
    unexpected = [(k, shape) for k, shape in found.items() if k not in expected] if strict else []
    misshaped = [(k, shape, tuple(found[k])) for k, shape in expected.items()
                 if k in found and tuple(found[k]) != tuple(shape)]
    if missing or unexpected or misshaped:
        raise WeightsError(key_problems_message(target, missing, unexpected, misshaped, hints))


def key_problems_message(target: str, missing: Sequence[tuple[str, tuple]],
                         unexpected: Sequence[tuple[str, tuple]],
                         misshaped: Sequence[tuple[str, tuple, tuple]], hints: Sequence[str]) -> str:
    """One readable message listing every missing, unexpected and mis-shaped key, hints first."""
    counts = ", ".join(f"{len(items)} {label}" for items, label in
                       ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "mis-shaped"))
                       if items)
    lines = [f"cannot load weights into {target}: {counts} key(s)"]
    lines += [f"  hint: {h}" for h in hints]

    def section(label, items, fmt):
        lines.extend(f"  {label + ':':<11} {fmt(*item)}" for item in items[:_SHOWN])
        if len(items) > _SHOWN:
            lines.append(f"  ... and {len(items) - _SHOWN} more {label} keys")

    section("missing", missing, lambda k, shape: f"{k} (expected shape {shape})")
    section("unexpected", unexpected, lambda k, shape: f"{k} (shape {shape})")
    section("mis-shaped", misshaped, lambda k, want, got: f"{k}: expected {want}, got {got}")
    return "\n".join(lines)
