"""What the persistent compilation cache saves: the wall time of `fcn-jax predict` on one photo and of a short
`fcn-jax train` (and its time to the first logged step), each run twice with an empty cache folder first.

    python benchmarks/startup.py [--arch fcns --backbone vgg11]

Prints one line per run and, last, the figures as JSON. Everything runs in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _train_timed(command: list[str], env: dict, run_dir: Path) -> tuple[float, float]:
    """``(seconds to the first training record in metrics.jsonl, seconds to the end)`` of a training command."""
    start, first = time.perf_counter(), None
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and log.exists() and '"kind": "train"' in log.read_text():
            first = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with status {proc.returncode}")
    return first or float("nan"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="fcns")
    parser.add_argument("--backbone", default="vgg11")
    args = parser.parse_args()
    fcn = [sys.executable, "-m", "fcn_jax.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FCN_JAX_CACHE": str(tmp / "cache")}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), np.uint8)).save(tmp / "photo.jpg")
        subprocess.run([*fcn, "train", "--arch", args.arch, "--backbone", args.backbone, "--synthetic-train", "16",
                        "--synthetic-val", "8", "--epochs", "1", "--run-dir", str(tmp / "w"), "--no-progress",
                        "--overlays", "0"], env={**env, "FCN_JAX_COMPILE_CACHE": "0"}, check=True, capture_output=True)
        figures = {}
        for attempt in ("first", "second"):
            figures[f"predict {attempt}"] = _timed(
                [*fcn, "predict", str(tmp / "w" / "final.safetensors"), str(tmp / "photo.jpg"), "--output",
                 str(tmp / f"out-{attempt}"), "--no-progress"], env)
        for attempt in ("first", "second"):
            run_dir = tmp / f"run-{attempt}"
            first_step, total = _train_timed(
                [*fcn, "train", "--arch", args.arch, "--backbone", args.backbone, "--synthetic-train", "64",
                 "--synthetic-val", "16", "--epochs", "1", "--log-every-steps", "1", "--run-dir", str(run_dir),
                 "--no-progress", "--overlays", "0"], env, run_dir)
            figures[f"train {attempt}: first step logged"], figures[f"train {attempt}"] = first_step, total
        for name, seconds in figures.items():
            print(f"{name:<32} {seconds:7.1f} s")
        print(json.dumps({"arch": args.arch, "backbone": args.backbone, **figures}))


if __name__ == "__main__":
    main()
