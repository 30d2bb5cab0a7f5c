"""The edges of a run: outputs checked first, leftovers removed, input rules kept, sizes bounded."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxnet.app import cli
from jaxnet.app import config as configlib
from jaxnet.app import data as datalib
from jaxnet.app import run as runlib

ROOT = Path(__file__).resolve().parents[1]
MISSING = dict(data="/nonexistent/data.npz")  # a run that would fail on its data if it got that far


def one_line_error(capsys, argv, code=2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxnet: error: "), err
    return err


def test_out_problems_are_named_before_any_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    cases = {
        tmp_path / "file": "is a file, not a folder: give --out a folder that can be written",
        tmp_path / "file" / "run": "file is a file, so .* cannot be a folder",
        tmp_path / "dangling": "dangling is a link to .*gone, which does not exist",
    }
    for out, match in cases.items():
        err = one_line_error(capsys, ["train", "--data", MISSING["data"], "--out", str(out)])
        assert "not found" not in err and re.search(match, err), err
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_read_only_file_system_is_named_at_once(tmp_path):
    train = f"{sys.executable} -m jaxnet.app train --data {MISSING['data']} --out {tmp_path}/run"
    run = _in_private_mount(tmp_path, "ro", train)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        f"jaxnet: error: {tmp_path} is on a read-only file system: give --out a folder that can be written"
    )


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    config = configlib.make_config(dataset="xor", hidden=(2,), epochs=1)
    runlib.run(config, out=out)
    leftovers = [out / ".metrics.jsonl.k2j3h4.tmp", out / ".model.npz.x8y7z6.tmp"]
    for path in leftovers:
        path.write_text("half")
    keep = out / "notes.tmp"  # not a temporary file of ours
    keep.write_text("mine")
    runlib.run(config, out=out)  # the same run again: it is finished, and the folder is tidied
    assert not any(path.exists() for path in leftovers) and keep.exists()


def test_a_single_class_target_is_refused(tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text("a,b,label\n1,2,yes\n3,4,yes\n5,6,yes\n")
    err = one_line_error(capsys, ["train", "--data", str(path), "--target", "label"])
    assert "every target is the class 'yes': a classifier needs at least two classes" in err
    np.savez(tmp_path / "zeros.npz", x=np.ones((20, 2)), y=np.zeros(20, np.int64))
    err = one_line_error(capsys, ["train", "--data", str(tmp_path / "zeros.npz")])
    assert "every target is the class 0" in err
    assert not (tmp_path / "run").exists()


def test_features_that_overflow_when_centred_are_named():
    x = np.zeros((6, 3), np.float32)
    x[:, 1] = [3.4e38, 3.4e38, 3.4e38, 3.4e38, 3.4e38, -3.4e38]  # the last is 5.7e38 from the mean
    x[:, 2] = [1e30, -1e30, 0, 0, 0, 0]  # large, but centred it fits
    with pytest.raises(ValueError, match=r"'wide': values span more than float32 can hold once centred"):
        datalib.fit_standardizer(x, ["small", "wide", "big"])
    kept = datalib.fit_standardizer(x[:, [0, 2]])
    assert np.isfinite(datalib.standardize(x[:, [0, 2]], kept)).all()
    rows = np.random.default_rng(0).normal(size=(1000, 4))
    s = datalib.fit_standardizer(rows)
    np.testing.assert_allclose(s.mean, rows.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.std, rows.std(axis=0), rtol=1e-6)


def test_a_batch_beyond_the_data_is_the_data(tmp_path):
    config = dict(dataset="xor", hidden=(3,), epochs=3, seed=1)
    huge = runlib.run(configlib.make_config(**config, batch_size=10**9))  # no 10^9-row padded batch
    exact = runlib.run(configlib.make_config(**config, batch_size=4))
    assert huge.summary["train_loss"] == pytest.approx(exact.summary["train_loss"], rel=1e-6)


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**63)])
def test_seeds_outside_the_prngs_range_are_one_line(capsys, seed):
    err = one_line_error(capsys, ["train", "--dataset", "xor", "--seed", seed])
    assert "--seed must be an integer in [0, 4294967295]" in err


def test_a_model_too_large_for_memory_is_refused_before_compiling(capsys):
    err = one_line_error(capsys, ["train", "--dataset", "xor", "--hidden", "100000,100000,100000"])
    assert "the run needs about" in err and "train a smaller model or batch" in err


def test_out_checks_need_no_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX")}
    run = subprocess.run(
        [sys.executable, "-m", "jaxnet.app", "train", "--out", ""], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 2 and run.stderr.strip() == "jaxnet: error: --out is empty: name a folder for the run"


def _handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler installed (jaxnet's first line has run)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_signals_at_start_up_end_the_command_at_once_with_130_or_143():
    """Ctrl-C or SIGTERM from jaxnet's first line on (imports of jax included, whose native modules
    abort the process when an exception crosses them) ends the command with 128 + the signal.
    Each signal is sent a given time after the process has installed its handlers (Python's own
    start, before that, is the interpreter's)."""
    cases = [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.1), (signal.SIGINT, 0.25), (signal.SIGTERM, 0.45)]
    cases += [(signal.SIGINT, 0.7), (signal.SIGTERM, 1.0)]
    command = [sys.executable, "-m", "jaxnet.app", "train", "--dataset", "digits", "--epochs", "100000"]

    def signal_later(proc, signum, delay):
        deadline = time.monotonic() + 60
        while not _handles_sigterm(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signum)

    procs = [(subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True), *case) for case in cases]
    senders = [threading.Thread(target=signal_later, args=case) for case in procs]
    for sender in senders:
        sender.start()
    for (proc, signum, delay), sender in zip(procs, senders):
        err = proc.communicate(timeout=120)[1]
        sender.join()
        assert proc.returncode == 128 + signum, (delay, proc.returncode, err)
        assert "Traceback" not in err and "Exception ignored" not in err, err


def _in_private_mount(tmp_path, options: str, command: str) -> subprocess.CompletedProcess:
    """``command`` run with a fresh tmpfs (``options``) mounted on ``tmp_path``, in a private mount
    namespace; skips where this machine allows none."""
    script = f"mount -t tmpfs -o {options} tmpfs {tmp_path} && cd {ROOT} && {command}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    if run.returncode != 0 and "mount" in run.stderr and "jaxnet" not in run.stderr:
        pytest.skip(f"no private mounts here: {run.stderr.strip()}")
    return run


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_full_disk_during_a_checkpoint_is_one_line_and_exit_1(tmp_path):
    train = f"{sys.executable} -m jaxnet.app train --dataset moons --epochs 1 --out {tmp_path}/run --quiet"
    run = _in_private_mount(tmp_path, "size=24k", train)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not written (No space left on device)" in lines[0], run.stderr
    debug = _in_private_mount(tmp_path, "size=24k", train.replace("-m jaxnet.app", "-m jaxnet.app --debug"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # (orbax's threads may print after the line)
    assert lines[0] in debug.stderr.splitlines()


def test_orbax_thread_failures_stay_out_of_the_terminal_unless_debugging(capsys):
    from jaxnet.app.cli import _quiet_orbax

    saved = sys.unraisablehook, threading.excepthook
    fake = compile("raise RuntimeError('write failed')", "/site-packages/orbax/checkpoint/fake.py", "exec")
    try:
        for debug, shown in ((False, False), (True, True)):
            sys.unraisablehook, threading.excepthook = saved[0], threading.__excepthook__  # (prints)
            _quiet_orbax(debug)
            for code in (fake, compile("raise RuntimeError('ours')", "mine.py", "exec")):
                thread = threading.Thread(target=exec, args=(code,))
                thread.start()
                thread.join()
            err = capsys.readouterr().err
            assert ("write failed" in err) == shown and "ours" in err, err
    finally:
        sys.unraisablehook, threading.excepthook = saved


def test_a_callers_mistakes_are_named_before_anything_runs():
    """Each mistake raises TypeError or ValueError naming the argument, not an error from deep in JAX."""
    import jax
    import optax

    import jaxnet as jn
    from jaxnet import text

    net, V, C = jn.mlp([2, 4, 3]), 11, 8
    x, y = np.ones((8, 2), np.float32), np.zeros(8, np.int32)
    args = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=4, key=jax.random.key(1))
    cases = [
        ({"key": 0}, TypeError, "key must be a JAX PRNG key"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be an optax.GradientTransformation"),
        ({"mesh": "fsdp=8"}, TypeError, "mesh must be a jax.sharding.Mesh"),
        ({"mesh": jax.make_mesh((1,), ("batch",))}, ValueError, "mesh has the axis 'batch'"),
        ({"y": np.zeros((8, 1), np.int32)}, ValueError, r"y has targets of shape \(1,\) per example, but the model's"),
        ({"y": np.full(8, 0.5, np.float32)}, TypeError, "y holds float32 targets, but the loss takes integer class"),
        ({"loss": "mse"}, ValueError, r"y has targets of shape \(\) per example, but the model's outputs are \(3,\)"),
        (
            {"loss": "sigmoid_binary_cross_entropy", "y": np.full((8, 3), 2.0, np.float32)},
            ValueError,
            r"y holds 2.0 at row 0: binary cross-entropy takes targets in \[0, 1\]",
        ),
        (
            {"x": np.ones((8, 5), np.float32)},
            ValueError,
            r"^x: the model fails on an example of shape \(5,\) \(float32\): ",
        ),
        (
            {"x": np.ones((8, 5), np.float32), "loss": lambda out, t: ((out - t) ** 2).mean()},  # any loss: the same
            ValueError,
            r"^x: the model fails on an example of shape \(5,\) .* the layer expects 2 features",
        ),
        ({"shuffle_buffer": 16}, ValueError, "shuffle_buffer shuffles the rows of a sequential source"),  # not ignored
    ]
    for change, error, message in cases:
        given = {**args, "x": x, "y": y, **change}
        with pytest.raises(error, match=message):
            jn.fit(net, net.init(jax.random.key(0)), **given)
    other = jn.mlp([2, 8, 3]).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"params do not fit this model: 0/b is \(8,\), the model's is \(4,\)$"):
        jn.fit(net, other, x, y, **args)
    with pytest.raises(ValueError, match=r"0/b is \(\), the model's is \(4,\) \(after the leading member axis of 2\)"):
        jn.fit(net, net.init(jax.random.key(0)), x, y, **{**args, "key": jn.member_keys([0, 1])})
    gpt = jn.gpt(V, context=C, layers=1, heads=2, dim=16)
    params, state = gpt.init(jax.random.key(0))
    ids = np.zeros((4, C), np.int32)
    with pytest.raises(ValueError, match=r"y has targets of shape \(7,\) per example, .* y of shape \(n, 8\)"):
        jn.fit(gpt, params, ids, ids[:, 1:], model_state=state, **args)
    outside = ids.copy()
    outside[1, 5] = V
    with pytest.raises(ValueError, match=f"x holds the id {V} at row 1, position 5, outside the GPT's vocabulary"):
        jn.fit(gpt, params, outside, ids, model_state=state, **args)
    with pytest.raises(ValueError, match="validation's x holds the id -3 at row 0, position 0"):
        jn.fit(gpt, params, ids, ids, model_state=state, validation=(ids - 3, ids), **args)
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        jn.generate(gpt, params, [1, 2], 3, key=0)
    stacked = jn.init_members(gpt, jn.member_keys([0, 1]))[0]
    with pytest.raises(ValueError, match=r"params do not fit this model: .* take one with jaxnet.take_member"):
        jn.generate(gpt, stacked, [1, 2], 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="'top_50_accuracy' needs at least 50 classes; the model has 11"):
        jn.fit(gpt, params, ids, ids, model_state=state, metrics=["top_50_accuracy"], **args)
    with pytest.raises(ValueError, match="eot must be an integer in"):
        jn.gpt(V, context=C, layers=1, heads=2, dim=16, eot=V)
    for bad, match in [({"stride": 0}, "stride must be a positive integer"), ({"limit": -1}, "limit must be")]:
        with pytest.raises(ValueError, match=match):
            text.windows(np.arange(100, dtype=np.int32), C, **bad)
    with pytest.raises(TypeError, match="tokens must be a 1-d array of integer token ids"):
        text.windows(np.zeros(100, np.float32), C)


def test_the_text_apis_errors_name_python_arguments_and_the_cli_its_flags(tmp_path):
    from jaxnet import text
    from jaxnet.app.cli import _message

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "docs.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(text.TextError) as error:
        list(text.read_text(tmp_path / "latin1.txt"))
    assert str(error.value).endswith(
        "convert it to UTF-8, or train with the byte tokenizer (ByteTokenizer()), which reads any bytes"
    )
    assert _message(error.value).endswith("or train with the byte tokenizer (--tokenizer byte), which reads any bytes")
    with pytest.raises(text.TextError) as error:
        list(text.text_chunks(tmp_path / "docs.jsonl"))
    assert str(error.value).endswith("has no text field 'text': name the field (field=NAME)")
    assert _message(error.value).endswith("has no text field 'text': name the field (--text-field=NAME)")


def test_the_kind_of_each_argument_and_a_resumed_state_are_checked():
    """A wrong kind of argument, and a resume that does not fit the fit, name what is wrong."""
    import tempfile

    import jax
    import optax

    import jaxnet as jn
    from jaxnet.callbacks import Checkpointer

    net, x, y = jn.mlp([2, 4, 3]), np.ones((8, 2), np.float32), np.zeros(8, np.int32)
    params = net.init(jax.random.key(0))
    args = dict(loss="softmax_cross_entropy", optimizer=optax.adam(0.1), epochs=2, batch_size=4, key=jax.random.key(1))
    cases = [
        ({"params": None}, TypeError, "params: give the model's initial params"),
        ({"resume": "runs/x"}, TypeError, "resume must be a FitState"),
        ({"callbacks": print}, TypeError, "callbacks must be a list of callbacks"),
        ({"unroll": 0}, ValueError, "unroll must be a positive integer"),
        ({"compute_dtype": "float8"}, TypeError, "compute_dtype must be a floating dtype"),
        ({"x": x.astype(np.complex64)}, TypeError, "x holds complex64 values: give an array of numbers"),
        ({"validation": x}, TypeError, r"validation is an array without its targets: give a pair \(x_val, y_val\)"),
        ({"validation": (x, y, y)}, TypeError, "validation must be a pair .* got a tuple of 3"),
        ({"per_example_grads": True}, ValueError, "per_example_grads: the optimizer must reduce per-example"),
    ]
    with tempfile.TemporaryDirectory() as folder:
        cases.append(({"callbacks": [Checkpointer(folder, every_steps=3)]}, ValueError, "give chunk_steps=3 too"))
        for change, error, message in cases:
            given = {"params": params, "x": x, "y": y, **args, **change}
            with pytest.raises(error, match=message):
                jn.fit(net, given.pop("params"), given.pop("x"), given.pop("y"), **given)
    state = jn.fit(net, params, x, y, **args)
    for change, message in (
        ({"optimizer": optax.sgd(0.1)}, "resume: its optimizer state is not what this optimizer makes"),
        ({"ema": 0.9}, "resume: its optimizer state is not what this optimizer makes"),
        ({"epochs": 1}, "epochs 1 is fewer than the 2 the resumed state has trained"),
    ):
        with pytest.raises(ValueError, match=message):
            jn.fit(net, params, x, y, resume=state, **{**args, **change})
    with pytest.raises(ValueError, match=r"params do not fit this model: 0/b is \(4,\), the model's is \(8,\)"):
        jn.fit(jn.mlp([2, 8, 3]), params, x, y, resume=state, **args)
    stateful = jn.serial(jn.dense(2, 4), jn.batch_norm(4), jn.dense(4, 3))
    with pytest.raises(ValueError, match="model_state: a StatefulModel needs its initial state"):
        jn.predict(stateful, stateful.init(jax.random.key(0))[0], x)
    stacked = jn.init_members(net, jn.member_keys([0, 1]))
    with pytest.raises(ValueError, match="take one with jaxnet.take_member"):
        jn.evaluate(net, stacked, x, y, loss="softmax_cross_entropy")
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        jn.dp_optimizer(0.1, 1.0, 1.0, 7)
