"""Checkpoints: round trips, exact resume after kills and signals, damaged files, non-finite losses.

The subprocess tests run in two concurrent chains (module fixture ``jobs``): the fault-injection
chain (one run killed again and again, resumed each time) and everything else.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxnet import callbacks, checkpoint
from jaxnet.app import cli, files
from jaxnet.app import config as configlib
from jaxnet.app import run as runlib

ORBAX_AT_IMPORT = any(name.split(".")[0] == "orbax" for name in sys.modules)

ROOT = Path(__file__).resolve().parents[1]
# Epochs enough for five kills: a kill during a save needs two more saves to come, and a run
# resumed between kills may train several epochs in the 1-3 s before the next one.
EPOCHS = 120
RUN = ["--dataset", "moons", "--hidden", "4", "--epochs", str(EPOCHS), "--batch-size", "64"]


def env():
    # (conftest.py's compilation cache, inherited: each resumed process loads the programs that the
    # first one compiled)
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def command(*args):
    return [sys.executable, "-m", "jaxnet.app", *map(str, args)]


def jaxnet(*args, timeout=120):
    return subprocess.run(command(*args), capture_output=True, text=True, env=env(), timeout=timeout)


def start(*args):
    return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def ckpt_dir(out):
    return Path(out).absolute() / "checkpoints"


def steps(out):
    """The epochs of the checkpoints in ``out`` (named by their step counts)."""
    return [entry.epoch for entry in checkpoint.entries(ckpt_dir(out))]


def tmp_dirs(out):
    d = ckpt_dir(out)
    return [p for p in d.iterdir() if "tmp" in p.name] if d.is_dir() else []


def interrupt(proc, out, sig, *, during_save=False, delay=0.0, timeout=60):
    """Waits until ``proc`` writes a checkpoint newer than the ones there now, then sends ``sig``
    (at once when a save is under way if ``during_save``, else after ``delay`` seconds).
    Returns ``(returncode, stderr, killed_mid_save)``."""
    before = max(steps(out), default=0)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if max(steps(out), default=0) > before and (not during_save or tmp_dirs(out)):
            break
        time.sleep(0.005)
    time.sleep(delay)
    mid_save = False
    if proc.poll() is None:
        proc.send_signal(sig)
        mid_save = bool(tmp_dirs(out))
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr, mid_save


def params_bytes(out):
    saved = files.load_model(out)
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(saved.params)]


def saved_params(out):
    return [np.asarray(a) for a in jax.tree.leaves(files.load_model(out).params)]


def metrics(out):
    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
    ]


def fault_chain(root):
    """One run killed with SIGKILL five times: three times during a save, twice at a random moment
    of start-up, restore or training; resumed after each kill and finally run to the end."""
    out = root / "faulty"
    rng = random.Random()
    log = []
    proc = start("train", *RUN, "--checkpoint-every", "1", "--out", out)
    for i in range(5):
        if i % 2 == 0:
            code, stderr, mid = interrupt(proc, out, signal.SIGKILL, during_save=True)
        else:
            time.sleep(rng.uniform(0.5, 2.0))
            proc.kill()
            code, stderr, mid = proc.wait(), proc.communicate()[1], False
        log.append((code, mid, stderr[-300:]))
        proc = start("train", "--resume", out, *(["--json"] if i == 4 else []))
    stdout, stderr = proc.communicate()
    return out, log, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def other_chain(root):
    r = {}
    r["baseline"] = jaxnet("train", *RUN, "--out", root / "baseline", "--json")
    stopped = root / "sigint"
    proc = start("train", *RUN, "--checkpoint-every", "2", "--out", stopped)
    r["sigint"] = interrupt(proc, stopped, signal.SIGINT)
    r["sigint_steps"] = steps(stopped)
    r["sigint_resumed"] = jaxnet("train", "--resume", stopped)
    return r


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """Starts the two subprocess chains at once; the in-process tests run meanwhile."""
    root = tmp_path_factory.mktemp("jobs")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = pool.submit(fault_chain, root), pool.submit(other_chain, root)
    yield root, futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def jobs(background):
    root, (fault, other) = background
    return root, fault.result(), other.result()


# ---- in-process API tests -------------------------------------------------------------------

CONFIG = dict(dataset="moons", hidden=(4,), epochs=4, batch_size=128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    config = configlib.make_config(**CONFIG)
    result = runlib.run(config, out=out, checkpoint_every=1, keep=3)
    return out, config, result


def test_round_trip_restores_the_whole_state(saved):
    out, config, result = saved
    assert steps(out) == [2, 3, 4]  # keep=3
    stored, restored = runlib.restore_run(out)
    assert stored == config and restored.path.name == str(restored.state.steps) and not restored.damaged
    state = restored.state
    assert state.epoch == 4 and state.history == result.history and result.finished
    assert int(state.train.step) == sum(r["steps"] for r in result.history)
    final = state.best_params if state.best_params is not None else state.train.params
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(result.model.params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(restored.metadata["norm"]["mean"], np.float32), result.model.mean)
    assert jax.random.key_impl(state.train.key) == jax.random.key_impl(jax.random.key(0))


def test_resume_from_an_older_checkpoint_is_bitwise_identical(saved, tmp_path):
    out, config, result = saved
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    name = {entry.epoch: str(entry.steps) for entry in checkpoint.entries(ckpt_dir(copy))}
    for epoch in (3, 4):
        shutil.rmtree(ckpt_dir(copy) / name[epoch])
    resumed = runlib.resume(copy)
    for a, b in zip(jax.tree.leaves(resumed.model.params), jax.tree.leaves(result.model.params)):
        assert a.tobytes() == b.tobytes()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in result.history]
    assert resumed.summary["test_accuracy"] == result.summary["test_accuracy"]


def test_arrays_are_written_uncompressed(tmp_path):
    """The write's CPU is what an asynchronous save takes from training: no zstd (zeros would
    compress to almost nothing)."""
    import optax

    from jaxnet.loop import init_fit_state

    params = {"w": jax.numpy.zeros((256, 256), jax.numpy.float32)}
    path = checkpoint.save(tmp_path, init_fit_state(params, optax.sgd(0.1), jax.random.key(0)))
    stored = sum(p.stat().st_size for p in (path / "state").rglob("*") if p.is_file())
    assert stored >= 256 * 256 * 4
    restored = checkpoint.restore(
        tmp_path, jax.eval_shape(lambda: init_fit_state(params, optax.sgd(0.1), jax.random.key(0)))
    )
    np.testing.assert_array_equal(np.asarray(restored.state.train.params["w"]), np.zeros((256, 256), np.float32))


def _files(path):
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.stat().st_size > 0)


def truncate(path):
    for f in _files(path / "state"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


def flip(path):
    for f in _files(path / "state" / "d") or _files(path / "state"):
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 3, len(data), max(1, len(data) // 7)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))


def empty(path):
    for f in _files(path):
        f.write_bytes(b"")


def foreign(path):
    shutil.rmtree(path)
    path.mkdir()
    (path / "weights.bin").write_bytes(os.urandom(64))


def other_meta(path):
    (path / "meta" / "metadata").write_text(json.dumps({"format": "something-else"}))


# orbax's I/O threads report a failed read of a damaged file once more, as an unraisable
# "Event loop is closed" (the CLI silences it: checkpoint.quiet_failed_reads).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [truncate, flip, empty, foreign, other_meta])
def test_damaged_newest_checkpoint_falls_back_and_all_damaged_is_refused(saved, tmp_path, damage):
    out, _, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    name = {entry.epoch: str(entry.steps) for entry in checkpoint.entries(ckpt_dir(copy))}
    damage(ckpt_dir(copy) / name[4])
    restored = runlib.restore_run(copy)[1]
    assert restored.path.name == name[3] and [p.name for p, _ in restored.damaged] == [name[4]]
    for epoch in (2, 3):
        damage(ckpt_dir(copy) / name[epoch])
    expected = rf"no usable checkpoint .*checkpoint {name[4]}: .*checkpoint {name[2]}: "
    with pytest.raises(ValueError, match=expected) as e:
        runlib.restore_run(copy)
    assert "\n" not in str(e.value)


def test_missing_run_folder_or_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        runlib.resume(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no checkpoints"):
        runlib.resume(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder: give resume the out folder of an earlier run"):
        runlib.resume(tmp_path / "file")
    with pytest.raises(ValueError, match="has no checkpoints"):
        checkpoint.restore(tmp_path, None)


def test_a_run_without_its_config_says_so(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved[0], copy)
    (copy / "config.json").unlink()
    with pytest.raises(ValueError, match="has checkpoints but no config.json, the run's config: put it back"):
        runlib.resume(copy)


def test_check_overrides_names_the_conflicting_option(saved):
    _, config, _ = saved
    configlib.check_overrides(config, dict(dataset="moons", hidden=(4,), loss=None, lr=None))
    with pytest.raises(ValueError, match="batch_size 32 conflicts with the run's 128") as e:
        configlib.check_overrides(config, dict(batch_size=32))
    assert e.value.render(cli.flag).startswith("--batch-size 32 conflicts with the run's 128")
    with pytest.raises(ValueError, match="dataset xor conflicts"):
        configlib.check_overrides(config, dict(dataset="xor"))


def blowup_args(root):
    x = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    np.savez(root / "linear.npz", x=x, y=x @ np.array([1.0, -1.0], np.float32))
    # Plain gradient descent on a quadratic with a step size past stability: the error grows by
    # a constant factor per step until it overflows, several epochs in.
    return [
        "--data",
        str(root / "linear.npz"),
        "--hidden",
        "",
        "--optimizer",
        "sgd",
        "--lr",
        "3",
        "--batch-size",
        "64",
        "--quiet",
    ]


def test_nonfinite_loss_stops_cleanly_naming_epoch_step_and_intact_checkpoint(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            *blowup_args(tmp_path),
            "--epochs",
            "40",
            "--checkpoint-every",
            "2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    line = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in line and "Traceback" not in line, line
    match = re.search(r"non-finite at epoch (\d+), step (\d+).*--skip-nonfinite.*last good checkpoint: (\S+)$", line)
    assert match, line
    epoch, step, path = int(match.group(1)), int(match.group(2)), Path(match.group(3))
    restored = runlib.restore_run(tmp_path / "run")[1]
    per_epoch = restored.state.history[0]["steps"]
    assert restored.state.epoch == 2 * ((epoch - 1) // 2)  # the newest checkpoint before the bad epoch
    assert epoch >= 3 and (epoch - 1) * per_epoch < step <= epoch * per_epoch
    assert restored.path == path and int(path.name) == restored.state.epoch * per_epoch and not restored.damaged
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.state.train.params))


def test_skip_nonfinite_trains_on_and_counts_skips(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *blowup_args(tmp_path), "--epochs", "14", "--skip-nonfinite", "--out", str(out)]) == 0
    records = metrics(out)
    assert len(records) == 14 and all("skipped" in r for r in records)
    assert sum(r["skipped"] for r in records) > 0
    assert all(np.isfinite(a).all() for a in saved_params(out))  # skipped steps left no trace
    assert runlib.restore_run(out)[0].skip_nonfinite is True


def test_cli_resume_refuses_conflicts_and_reports_a_finished_run(saved, capsys):
    out, config, result = saved
    assert cli.main(["train", "--resume", str(out), "--hidden", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--hidden 8 conflicts with the run's 4" in err
    for flags, shown in ((["--skip-nonfinite"], "--skip-nonfinite on conflicts with the run's off"),
                         (["--patience", "2"], "--patience 2 conflicts with the run's none")):  # fmt: skip
        assert cli.main(["train", "--resume", str(out), *flags]) == 2
        assert shown in capsys.readouterr().err
    assert cli.main(["train", "--checkpoint-every", "2", "--dataset", "xor"]) == 2
    assert "--checkpoint-every N needs --out DIR" in capsys.readouterr().err
    before = steps(out)
    assert cli.main(["train", "--resume", str(out), "--dataset", "moons", "--json"]) == 0
    captured = capsys.readouterr()
    assert "already finished at epoch 4" in captured.err
    summary = json.loads(captured.out)
    assert summary["epochs"] == 4 and summary["test_accuracy"] == result.summary["test_accuracy"]
    assert summary["train_seconds"] == pytest.approx(sum(r["seconds"] for r in result.history))
    assert summary["train_seconds"] == pytest.approx(result.summary["train_seconds"])  # the run's, not this command's
    assert cli.main(["train", "--resume", str(out), "--dataset", "moons"]) == 0
    assert f"4 epochs in {summary['train_seconds']:.1f}s" in capsys.readouterr().err
    assert steps(out) == before


def test_cli_resume_of_damaged_or_missing_checkpoints_is_one_line(saved, tmp_path, capsys):
    out, _, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for step in checkpoint.steps(ckpt_dir(copy)):
        empty(ckpt_dir(copy) / str(step))
    for target in (copy, tmp_path / "nope", tmp_path):
        assert cli.main(["train", "--resume", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxnet: error: cannot resume") and "\n" not in err, err


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0] > 0).astype(np.int32))
    config = configlib.make_config(data=str(tmp_path / "data.npz"), hidden=(2,), epochs=1, batch_size=8)
    runlib.run(config, out=tmp_path / "run")
    np.savez(tmp_path / "data.npz", x=x * 2, y=(x[:, 0] > 0).astype(np.int32))
    with pytest.raises(ValueError, match="data of .* changed since the checkpoint"):
        runlib.resume(tmp_path / "run")


# ---- subprocesses ------------------------------------------------------------------------


def test_killed_and_resumed_run_equals_uninterrupted_run_bitwise(jobs):
    """Also the determinism test: three runs of one seed and config (uninterrupted, killed five
    times, stopped by Ctrl-C) end with the same bytes of parameters."""
    root, (out, log, final), other = jobs
    assert other["baseline"].returncode == 0, other["baseline"].stderr
    assert [code for code, _, _ in log] == [-signal.SIGKILL] * 5, log
    assert any(mid for _, mid, _ in log), f"no kill landed during a save: {log}"
    assert final.returncode == 0, final.stderr
    assert params_bytes(out) == params_bytes(root / "baseline")
    assert metrics(out) == metrics(root / "baseline")
    assert json.loads(final.stdout)["epochs"] == json.loads(other["baseline"].stdout)["epochs"] == EPOCHS
    assert steps(out) == [EPOCHS - 2, EPOCHS - 1, EPOCHS] and not tmp_dirs(out)


def test_sigint_stops_at_epoch_boundary_with_a_checkpoint_that_resumes_to_the_same_result(jobs):
    root, _, other = jobs
    code, stderr, _ = other["sigint"]
    assert code == 130, stderr
    match = re.search(
        r"interrupted at epoch (\d+); checkpoint in (\S+); resume with: jaxnet train --resume (\S+)", stderr
    )
    assert match, stderr
    epoch = int(match.group(1))
    per_epoch = json.loads((root / "sigint" / "metrics.jsonl").read_text().splitlines()[0])["steps"]
    assert match.group(3) == str(root / "sigint") and match.group(2).endswith(f"checkpoints/{epoch * per_epoch}")
    assert other["sigint_steps"][-1] == epoch and epoch < EPOCHS
    assert other["sigint_resumed"].returncode == 0, other["sigint_resumed"].stderr
    assert params_bytes(root / "sigint") == params_bytes(root / "baseline")
    assert metrics(root / "sigint") == metrics(root / "baseline")


def test_orbax_is_not_imported_without_checkpoints():
    assert not ORBAX_AT_IMPORT


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_at_the_next_boundary_and_a_second_signal_acts_at_once(signum):
    previous = signal.getsignal(signum)
    with callbacks.Interrupt() as stop:
        assert not stop(None, None)
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert stop(None, None) and stop.exit_code == 128 + signum
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                time.sleep(0.5)
        else:
            assert signal.getsignal(signum) == signal.SIG_DFL
    assert signal.getsignal(signum) == previous


def test_extending_a_run_that_stopped_early_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "early"
    flags = ["train", "--dataset", "moons", "--epochs", "400", "--patience", "2", "--out", str(out), "--quiet"]
    assert cli.main(flags) == 0
    stopped = len(metrics(out))
    assert stopped < 400  # early stopping ended it
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "500", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxnet: error: ") and "\n" not in err
    assert f"stopped early at epoch {stopped}: its validation figure had not improved" in err
    assert "so more --epochs would not train it: start a new run from its weights (--init-from" in err
    assert json.loads((out / "config.json").read_text())["epochs"] == 400  # untouched
    assert cli.main(flags) == 0  # the command that started it still reports it finished
    assert f"already finished at epoch {stopped}" in capsys.readouterr().err
