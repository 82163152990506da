"""The run's log: ``metrics.jsonl`` and the same scalars as TensorBoard events (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path):
        SummaryWriter = _summary_writer_class()
        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{kind}/{name}", value, step)
        self.tb.flush()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def close(self) -> None:
        self.tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch: its package imports torch where installed (3 s
    of every training start) only to accept torch tensors, and this log writes Python floats. A ``None`` in
    ``sys.modules`` makes that import fail for the moment, as if torch were absent."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
