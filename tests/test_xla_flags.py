"""``import fcn_jax`` sets its CPU convolution flag only where that is safe (fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fcn_jax.xla_flags import CPU_CONVOLUTION_FLAG

PROBE = "import os, fcn_jax; import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(env_update: dict, before: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FCN_JAX_XLA_DEFAULTS")}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", before + PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_flag_added_by_default_and_kept_with_user_flags():
    assert _flags_after_import({}) == CPU_CONVOLUTION_FLAG
    user = "--xla_cpu_enable_fast_math=false"
    assert _flags_after_import({"XLA_FLAGS": user}) == f"{user} {CPU_CONVOLUTION_FLAG}"


@pytest.mark.parametrize("env,before", [
    ({"FCN_JAX_XLA_DEFAULTS": "0"}, ""),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}, ""),
    ({}, "import jax.numpy as _j; _j.zeros(1).block_until_ready(); "),  # backend already started
])
def test_flag_not_added(env, before):
    assert CPU_CONVOLUTION_FLAG not in _flags_after_import(env, before)
