import os
import shutil
import sys
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

# The default suite's programs are small and run briefly: their compilation, mostly LLVM's optimization
# passes, is most of its time, and without those passes it takes about a seventh less. A program's
# numerics do not depend on them beyond rounding, and every comparison in the suite is between two runs
# under the same flags or against a reference with a tolerance. The slow tests train real models for
# many steps (a CNN runs 5x longer unoptimized), so a session that selects them (`-m slow`) keeps the
# passes. JAXNET_TESTS_FAST_COMPILE=0|1 decides instead; xdist workers inherit the session's choice.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _selects_slow(argv: list[str]) -> bool:
    """Whether the command line's marker expression (``-m EXPR``) selects the slow tests."""
    for i, arg in enumerate(argv):
        expr = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else arg[2:] if arg.startswith("-m") else None
        if expr is not None and "slow" in expr and expr.strip() != "not slow":
            return True
    return False


if "JAXNET_TESTS_FAST_COMPILE" not in os.environ:
    os.environ["JAXNET_TESTS_FAST_COMPILE"] = "0" if _selects_slow(sys.argv) else "1"
_FAST = os.environ["JAXNET_TESTS_FAST_COMPILE"] == "1"
if _FAST and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
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
