"""The persistent compilation cache of the `fcn-jax` command (fcn_jax/caches.py): on by default, off with one
switch, a second start compiles nothing, and an entry it cannot read costs a compilation, not a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcn_jax

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "FCN_JAX_TEST_CACHE")}
    env.update({"PYTHONPATH": str(ROOT), "FCN_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"})
    env.update({k.upper(): v for k, v in extra.items()})
    return {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE") and
            not k.startswith("JAX_PERSISTENT_CACHE")}


def _folder(cache: Path) -> str:
    code = "from fcn_jax.caches import compile_cache_dir; print(compile_cache_dir())"
    return subprocess.run([sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_the_switch_and_a_folder_of_ones_own_win(tmp_path):
    code = ("import os, fcn_jax; folder = fcn_jax.use_compile_cache(); import jax; "
            "print(folder, jax.config.jax_compilation_cache_dir)")
    run = [sys.executable, "-c", code]
    on = subprocess.run(run, env=_env(tmp_path), capture_output=True, text=True, check=True).stdout.split()
    assert on[0] == on[1] == _folder(tmp_path) and Path(on[0]).is_relative_to(tmp_path / "xla")
    off = subprocess.run(run, env=_env(tmp_path, fcn_jax_compile_cache="0"), capture_output=True, text=True,
                         check=True).stdout.split()
    assert off == ["None", "None"]
    mine = subprocess.run(run, env={**_env(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")},
                          capture_output=True, text=True, check=True).stdout.split()
    assert mine == ["None", str(tmp_path / "mine")]


@pytest.mark.slow
def test_a_second_start_compiles_nothing_and_a_damaged_entry_is_compiled_again(tmp_path):
    weights = tmp_path / "w.safetensors"
    fcn_jax.save_weights(fcn_jax.create_model("fcn32s", num_classes=3, backbone="vgg11"), weights)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    cache = tmp_path / "cache"

    def predict(out: str) -> tuple[bytes, str]:
        done = subprocess.run([sys.executable, "-m", "fcn_jax.cli", "predict", str(weights), str(tmp_path / "a.png"),
                               "--output", str(tmp_path / out), "--logits", "--no-progress", "--workers", "0"],
                              env=_env(cache, jax_log_compiles="1", jax_explain_cache_misses="1"), check=True,
                              capture_output=True, text=True)
        return (tmp_path / out / "a_logits.npy").read_bytes(), done.stderr

    first, log = predict("first")
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_forward'" in log
    entries = sorted(Path(_folder(cache)).iterdir())
    assert any(e.name.startswith("jit_forward-") for e in entries)  # the model's program, among others
    again, log = predict("second")
    assert again == first and "cache hit for 'jit_forward'" in log and "PERSISTENT COMPILATION CACHE MISS" not in log
    for entry in entries:  # as a process killed while writing would leave them
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    damaged, log = predict("third")
    assert damaged == first and "Error reading persistent compilation cache entry" in log
