"""Fixtures shared by the tests.

The tests run with XLA's default flags, in-process and in the subprocesses they start:
``FCN_JAX_XLA_DEFAULTS=0`` keeps the ``fcn-jax`` command from adding its CPU convolution flag
(fcn_jax/xla_flags.py; tests/test_xla_flags.py checks the flag itself, in subprocesses without the
setting).
Without the flag the float64 checks run 2-5x faster (float64 convolutions are slow on XLA's Eigen path).
"""

import gc
import os
import sys

import pytest

os.environ.setdefault("FCN_JAX_XLA_DEFAULTS", "0")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs and the arrays they keep alive: a worker that runs
    many modules would otherwise grow past 4 GB (seen: 7.6 GB)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``FCN_JAX_TEST_MEMORY=FILE``: each test's process peak memory after it (kB, one line per test,
    appended), to find a test that takes a worker past the 4 GB budget (`make test-memory`)."""
    yield
    report = os.environ.get("FCN_JAX_TEST_MEMORY")
    if report:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(report, "a") as f:
            f.write(f"{peak}\t{children}\t{os.getpid()}\t{item.nodeid}\n")
