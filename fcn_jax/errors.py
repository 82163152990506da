"""Errors that fcn-jax raises for bad input; the CLI prints their message as a one-line reason."""

from __future__ import annotations

from collections.abc import Sequence

_SHOWN = 20  # keys listed per category before "... and N more"


class FcnJaxError(ValueError):
    """Bad user input (a file, a weights layout, a config); the message says what to do."""


class WeightsError(FcnJaxError):
    """Weights that cannot be read or do not fit the model."""


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
