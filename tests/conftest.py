import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Four CPU devices for the data-parallel tests (tests/test_parallel.py); computations stay on
# device 0 unless a mesh says otherwise. XLA_FLAGS=--xla_force_host_platform_device_count=N, when
# set, takes precedence.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 4)


@pytest.fixture
def key():
    return jax.random.key(0)
