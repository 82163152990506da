"""Fixtures shared by the tests.

The tests run with the XLA flags the ``fcn-jax`` command sets (see fcn_jax/xla_flags.py); this file is
imported before any test starts JAX's backend, so the call here takes effect.
"""

import pytest

import fcn_jax

fcn_jax.use_fast_cpu_convolutions()


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch
