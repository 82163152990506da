"""Fixtures shared by the tests.

The tests run with XLA's default flags, in-process and in the subprocesses they start:
``FCN_JAX_XLA_DEFAULTS=0`` keeps the ``fcn-jax`` command from adding its CPU convolution flag
(fcn_jax/xla_flags.py; tests/test_xla_flags.py checks the flag itself, in subprocesses without the
setting).
Without the flag the float64 checks run 2-5x faster (float64 convolutions are slow on XLA's Eigen path).

A run shares one compilation cache between its workers and the commands they start (fcn_jax/caches.py):
most of the suite's time is compiling the same few models, in-process and in ``fcn-jax`` subprocesses.
The cache and the run's other cached files (``$FCN_JAX_CACHE``) go to a temporary folder made by the first
process (the xdist controller, whose environment the workers inherit) and removed when it ends, so every
run starts cold and nothing lands in the user's own cache.
"""

import contextlib
import ctypes
import gc
import os
import shutil
import sys
import tempfile

import pytest

from fcn_jax.caches import use_compile_cache

os.environ.setdefault("FCN_JAX_XLA_DEFAULTS", "0")
_OWN_CACHE = None
if "FCN_JAX_TEST_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["FCN_JAX_TEST_CACHE"] = os.environ["FCN_JAX_CACHE"] = tempfile.mkdtemp(
        prefix="fcn-jax-test-cache-")
use_compile_cache()


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs and the arrays they keep alive: a worker that runs
    many modules would otherwise grow past 4 GB (seen: 7.6 GB)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    _return_free_memory()


def _return_free_memory() -> None:
    """Give the heap's freed pages back to the system (glibc keeps them, so a worker's resident memory only grows
    from module to module); nothing where the C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@pytest.fixture(autouse=True, scope="session")
def _remove_shared_folders(request, tmp_path_factory):
    """Folders made by module- and session-scoped fixtures (``tmp_path_factory.mktemp``: trained runs, weights
    files, ~1 GB a run) are not covered by pytest's per-test retention policy: removed at the end of a run
    in which no test failed (a failed run keeps everything to look at)."""
    yield
    if request.session.testsfailed == 0:
        base = tmp_path_factory.getbasetemp()
        for child in base.iterdir():
            shutil.rmtree(child, ignore_errors=True)


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``FCN_JAX_TEST_MEMORY=FILE``: each test's process peak memory after it (kB, one line per test,
    appended), to find a test that takes a worker past the 4 GB budget."""
    yield
    report = os.environ.get("FCN_JAX_TEST_MEMORY")
    if report:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(report, "a") as f:
            f.write(f"{peak}\t{children}\t{os.getpid()}\t{item.nodeid}\n")
