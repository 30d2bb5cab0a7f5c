import os
import shutil
import tempfile

import pytest

# One persistent compilation cache for the whole session, shared by the xdist workers and by the CLI
# subprocesses the tests start (they inherit the environment): programs that many tests and processes
# compile identically (the same model, loss and optimizer) are compiled once. A fresh directory per
# session, removed at the end, so no run ever loads another run's programs. An entry that a concurrent
# writer left incomplete fails to load and is compiled again (JAX warns); results never depend on it.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxnet-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The tests' programs are small and run briefly: their compilation, mostly LLVM's optimization passes,
# is most of the suite's time. Without those passes the default suite takes about a quarter less; a
# program's numerics do not depend on them beyond rounding, and every comparison in the suite is
# between two runs under the same flags or against a reference with a tolerance.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after the cache variables, which JAX reads when imported)

jax.config.update("jax_numpy_rank_promotion", "raise")
# Four CPU devices for the data-parallel tests (tests/test_parallel.py); computations stay on
# device 0 unless a mesh says otherwise. XLA_FLAGS=--xla_force_host_platform_device_count=N, when
# set, takes precedence.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 4)


@pytest.fixture
def key():
    return jax.random.key(0)


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
