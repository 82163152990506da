"""A training run's folder: the names training writes, and what inference reads back.

``fcn_jax.training`` writes the folder; ``evaluate`` and ``predict`` accept it in place of a weights file
and read it through :func:`resolve_weights`, so inference does not depend on the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

from fcn_jax.errors import ConfigError

CONFIG = "config.json"
BEST_WEIGHTS, FINAL_WEIGHTS = "best.safetensors", "final.safetensors"


def resolve_weights(weights: str | Path) -> tuple[Path, dict | None]:
    """``(weights file, the run's settings)`` for a training run's folder (its best weights, else its final
    ones; the settings are the run's ``config.json`` as a dict), or ``(weights, None)`` for a file."""
    path = Path(weights)
    if not path.is_dir():
        return path, None
    for name in (BEST_WEIGHTS, FINAL_WEIGHTS):
        if (path / name).is_file():
            return path / name, read_settings(path)
    raise ConfigError(f"{path} holds no {BEST_WEIGHTS} or {FINAL_WEIGHTS} (is it a finished training run?)")


def read_settings(run_dir: Path) -> dict | None:
    """The settings a run was started with (its ``config.json``), or None where the folder has none."""
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the checkpoint's info record "
                          f"or start a new run") from None


def input_normalization(given: str | None, run: dict | None, weights_config: dict) -> str:
    """The input normalisation to use with some weights: ``given`` (the command line) wins, then the training
    run's setting, then the one stored in the weights file (training stores it), else ``imagenet``."""
    return given or (run or {}).get("normalization") or weights_config.get("normalization") or "imagenet"
