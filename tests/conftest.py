"""Fixtures shared by the tests.

The tests run in-process with XLA's default flags, as a program that imports fcn_jax does; the flag the
``fcn-jax`` command sets (fcn_jax/xla_flags.py) is in force in every test that runs the command in a
subprocess, and tests/test_xla_flags.py checks it. Without the flag the float64 checks run 2-5x faster
(float64 convolutions are slow on XLA's Eigen path).
"""

import pytest


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch
