"""The CPU convolution flag: never set by ``import fcn_jax``; set by ``fcn-jax`` before JAX starts, and by
``fcn_jax.use_fast_cpu_convolutions()`` where that is safe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fcn_jax.xla_flags import CPU_CONVOLUTION_FLAG

STARTS_JAX = "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready(); "
PRINT_FLAGS = "print(os.environ.get('XLA_FLAGS', ''))"


def _run(code: str, env_update: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FCN_JAX_XLA_DEFAULTS")}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", "import os; " + code], env=env, capture_output=True, text=True,
                          check=True)


def _flags(code: str, env_update: dict | None = None) -> str:
    lines = _run(code + PRINT_FLAGS, env_update or {}).stdout.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
@pytest.mark.parametrize("user_flags", ["", "--xla_cpu_enable_fast_math=false"])
def test_import_changes_no_environment_variable(user_flags):
    """No variable changed by the import; XLA_FLAGS (unset, or the user's) as it was once JAX has started. (JAX's own
    start sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY, so the whole environment is compared before it.)"""
    lines = _run("before = dict(os.environ); import fcn_jax, fcn_jax.cli; print(sorted(k for k in set(before) | "
                 "set(os.environ) if before.get(k) != os.environ.get(k))); " + STARTS_JAX + PRINT_FLAGS,
                 {"XLA_FLAGS": user_flags} if user_flags else {}).stdout.splitlines()
    assert lines[-2:] == ["[]", user_flags]


@pytest.mark.slow
def test_the_call_adds_the_flag_and_keeps_user_flags():
    call = "import fcn_jax; assert fcn_jax.use_fast_cpu_convolutions(); " + STARTS_JAX
    assert _flags(call) == CPU_CONVOLUTION_FLAG
    user = "--xla_cpu_enable_fast_math=false"
    assert _flags(call, {"XLA_FLAGS": user}) == f"{user} {CPU_CONVOLUTION_FLAG}"


@pytest.mark.slow
@pytest.mark.parametrize("env,before", [
    ({"FCN_JAX_XLA_DEFAULTS": "0"}, ""),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}, ""),
    ({}, STARTS_JAX),  # too late: the backend already read XLA_FLAGS
])
def test_the_call_does_nothing_where_unsafe(env, before):
    code = f"import fcn_jax; {before}assert not fcn_jax.use_fast_cpu_convolutions(); "
    assert CPU_CONVOLUTION_FLAG not in _flags(code, env)


@pytest.mark.slow
def test_a_late_call_says_why_it_did_nothing():
    err = _run(f"import fcn_jax; {STARTS_JAX}fcn_jax.use_fast_cpu_convolutions()", {}).stderr
    assert "JAX's backends already started" in err and "before the first JAX computation" in err


@pytest.mark.slow
def test_the_command_sets_the_flag_before_jax_starts():
    result = _run("from fcn_jax.cli import main; main(['summary', '--arch', 'fcn32s']); " + PRINT_FLAGS, {})
    assert result.stdout.strip().splitlines()[-1] == CPU_CONVOLUTION_FLAG
    assert "already started" not in result.stderr
