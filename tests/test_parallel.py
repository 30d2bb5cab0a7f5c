"""Data parallelism on emulated CPU devices, two processes on localhost, mixed precision."""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import fit, mlp, parallel
from jaxnet.app import data as datalib
from jaxnet.epoch import make_epoch
from jaxnet.step import init_state, make_update

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import multiprocess_worker  # noqa: E402

# Data-parallel results differ from one device's only in the order of the gradient sums.
ATOL, RTOL = 1e-5, 1e-4

needs_4 = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (see conftest.py)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b):
    return jax.tree.all(jax.tree.map(lambda u, v: np.allclose(u, v, atol=ATOL, rtol=RTOL), a, b))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The two-process run; the first test asks for it, so that it runs alongside the others."""
    yield from _two_processes(tmp_path_factory.mktemp("mp"))


@pytest.fixture(scope="module")
def two_streaming_processes(tmp_path_factory):
    """Two processes streaming the same memory-mapped arrays, each reading its share of every batch."""
    d = tmp_path_factory.mktemp("mp-stream")
    x, y = multiprocess_worker.problem()
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    yield from _two_processes(d, str(d))


def _two_processes(d, *more):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    address = f"127.0.0.1:{free_port()}"
    worker = Path(__file__).parent / "multiprocess_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), address, "2", str(i), str(d / f"p{i}.npz"), *more],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        yield procs, d
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()  # reaps the process and closes its pipe


@needs_4
def test_data_parallel_fit_equals_single_device(two_processes):
    x, y = multiprocess_worker.problem()
    mesh = parallel.make_data_mesh(4)
    one = multiprocess_worker.train(x, y)
    four = multiprocess_worker.train(x, y, mesh)
    assert close(one, four)
    for leaf in jax.tree.leaves(four):
        assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
        assert len(leaf.sharding.device_set) == 4


@needs_4
def test_each_batch_is_sharded_over_the_mesh():
    mesh = parallel.make_data_mesh(4)
    net = mlp([5, 3])
    opt = optax.sgd(0.1)
    seen = []

    def update(state, batch):
        jax.debug.inspect_array_sharding(batch[0], callback=seen.append)
        return make_update(net, "softmax_cross_entropy", opt)(state, batch)

    epoch = jax.jit(make_epoch(parallel.constrain_batch(update, mesh), 16, 8))
    state = parallel.put_replicated(init_state(net.init(jax.random.key(0)), opt, jax.random.key(1)), mesh)
    x = parallel.put_replicated(jnp.ones((16, 5)), mesh)
    y = parallel.put_replicated(jnp.zeros((16,), jnp.int32), mesh)
    compiled = epoch.lower(state, x, y).compile()
    assert seen and all(s.is_equivalent_to(parallel.batch_sharding(mesh), 2) for s in seen)
    assert len(seen[0].device_set) == 4
    assert "all-reduce" in compiled.as_text()  # the gradient sum over the batch shards


def test_batch_size_must_divide_over_devices():
    message = r"batch size 30 does not divide evenly over 4 devices: use a multiple of 4 \(e\.g\. 32\)"
    with pytest.raises(ValueError, match=message):
        parallel.check_batch_size(30, 4)
    parallel.check_batch_size(32, 4)
    if jax.device_count() >= 4:
        x, y = multiprocess_worker.problem()
        net = mlp([5, 3])
        with pytest.raises(ValueError, match="does not divide evenly"):
            fit(
                net,
                net.init(jax.random.key(0)),
                x,
                y,
                loss="softmax_cross_entropy",
                optimizer=optax.sgd(0.1),
                epochs=1,
                batch_size=6,
                key=jax.random.key(1),
                mesh=parallel.make_data_mesh(4),
            )


def test_mesh_and_process_rows_bad_input():
    with pytest.raises(ValueError, match=r"requested but \d+ available.*host_platform_device_count"):
        parallel.make_data_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        parallel.make_data_mesh("some")
    assert parallel.make_data_mesh("all").size == jax.device_count()
    shares = [parallel.process_rows(10, i, 3) for i in range(3)]
    assert shares == [slice(0, 3), slice(3, 6), slice(6, 9)]
    with pytest.raises(ValueError, match="out of range"):
        parallel.process_rows(10, 3, 3)
    with pytest.raises(ValueError, match="needs all of coordinator, num_processes and process_id"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_two_processes_train_together(two_processes):
    procs, d = two_processes
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    a, b = np.load(d / "p0.npz"), np.load(d / "p1.npz")
    assert int(a["processes"]) == 2 and int(a["devices"]) == 2
    leaves = [k for k in a.files if k.startswith("arr_")]
    for k in leaves:
        np.testing.assert_array_equal(a[k], b[k])  # replicated: the very same numbers
    # One process over the same global rows (each process's contiguous share, in process order).
    x, y = multiprocess_worker.problem()
    rows = 2 * (len(x) // 2)
    single = jax.tree.leaves(multiprocess_worker.train(x[:rows], y[:rows]))
    assert close(single, [a[k] for k in sorted(leaves, key=lambda k: int(k[4:]))])


@pytest.mark.slow
@needs_4
def test_two_processes_stream_their_shares_and_equal_one_process(two_streaming_processes):
    procs, d = two_streaming_processes
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    a, b = np.load(d / "p0.npz"), np.load(d / "p1.npz")
    assert int(a["processes"]) == 2
    leaves = sorted((k for k in a.files if k.startswith("arr_")), key=lambda k: int(k[4:]))
    for k in leaves:
        np.testing.assert_array_equal(a[k], b[k])
    # one process streaming all of every batch from the same files: the same training
    x, y = (np.load(d / f"{name}.npy", mmap_mode="r") for name in ("x", "y"))
    single = jax.tree.leaves(multiprocess_worker.train(x, y))
    assert close(single, [a[k] for k in leaves])


@pytest.mark.slow
def test_bfloat16_digits_accuracy_close_to_float32():
    ds = datalib.load_builtin("digits", seed=0)
    splits = datalib.split(ds, 0.0, 0.2, 0)
    std = datalib.fit_standardizer(splits.train.x)
    xtr, xte = datalib.standardize(splits.train.x, std), datalib.standardize(splits.test.x, std)
    net = mlp([xtr.shape[1], 32, 10])
    accuracy = {}
    for dtype in (None, jnp.bfloat16):
        state = fit(
            net,
            net.init(jax.random.key(0)),
            xtr,
            splits.train.y.astype(np.int32),
            loss="softmax_cross_entropy",
            optimizer=optax.adam(3e-3),
            epochs=5,
            batch_size=32,
            key=jax.random.key(1),
            compute_dtype=dtype,
        )
        predictions = jax.vmap(net.apply, in_axes=(None, 0))(state.params, xte)
        accuracy[dtype] = float(np.mean(np.argmax(predictions, -1) == splits.test.y))
        leaves = jax.tree.leaves((state.params, state.train.opt_state))
        floats = [a for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)]
        assert floats and all(a.dtype == jnp.float32 for a in floats)  # float32 master state
    assert accuracy[None] > 0.9
    assert abs(accuracy[jnp.bfloat16] - accuracy[None]) <= 0.01, accuracy


@pytest.mark.parametrize(
    "args, pattern",
    [
        (
            ["--devices", "99"],
            r"99 devices requested but \d+ available \(cpu\).*host_platform_device_count=N",
        ),
        (["--coordinator", "127.0.0.1:1"], "needs all of --coordinator, --num-processes and --process-id"),
        (["--dtype", "float16"], "unknown --dtype 'float16': use one of float32, bfloat16"),
        (["--devices", "two"], "--devices: 'two' is neither a number nor all"),
    ],
)
def test_cli_bad_parallel_options(capsys, args, pattern):
    from jaxnet.app import cli

    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxnet: error:") and re.search(pattern, err[0]), err


@needs_4
def test_cli_train_on_all_devices_in_bfloat16(capfd):
    from jaxnet.app import cli

    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "xor",
                "--epochs",
                "2",
                "--devices",
                "all",
                "--dtype",
                "bfloat16",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capfd.readouterr().out)  # stdout is the JSON object alone
    assert summary["epochs"] == 2 and math.isfinite(summary["train_loss"])
