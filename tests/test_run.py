"""The run layer and the one host loop: coherent results, run folders, resumes, and no silent wrongs."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import checkpoint
from jaxnet.app import cli, files, recipes
from jaxnet.app import config as configlib
from jaxnet.app import run as runlib
from jaxnet.app.rundir import RunFolder, RunFolderBusy
from jaxnet.callbacks import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="moons", hidden=(4,), epochs=4, batch_size=128)


def _bytes(tree):
    def raw(a):
        return jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a

    return [np.asarray(raw(a)).tobytes() for a in jax.tree.leaves(tree)]


def _xor(n=60, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(np.int32)


@pytest.mark.parametrize("members", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_resuming_from_what_fit_returns_equals_the_straight_run_bitwise(members):
    x, y = _xor()
    net = jn.mlp([2, 8, 2])
    if members:
        keys = jn.member_keys([0, 1, 2])
        params, key = jn.init_members(net, keys), keys
    else:
        params, key = net.init(jax.random.key(0)), jax.random.key(1)
    args = dict(loss="cross_entropy", optimizer=optax.adam(0.01), batch_size=16, key=key, validation=_xor(20, 1))
    straight = jn.fit(net, params, x, y, epochs=6, **args)
    first = jn.fit(net, params, x, y, epochs=3, **args)
    # The returned state is the last epoch's (not the best params with the last optimizer state).
    assert _bytes(first.train.params) != _bytes(first.best_params) or first.best_epoch in (3, [3, 3, 3])
    resumed = jn.fit(net, None, x, y, epochs=6, resume=first, **args)
    assert _bytes(resumed.train) == _bytes(straight.train)
    assert _bytes(resumed.best_params) == _bytes(straight.best_params)
    assert resumed.best_epoch == straight.best_epoch
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]
    if not members:  # single-run records carry best_epoch like member records
        assert [r["best_epoch"] for r in straight.history][-1] == straight.best_epoch


def test_a_hand_written_model_checkpoints_and_resumes_through_the_library(tmp_path):
    x, y = _xor()
    net = jn.serial(jn.dense(2, 6, "tanh"), jn.dense(6, 2))  # not the CLI's MLP
    opt = optax.sgd(0.1, momentum=0.9)
    params, key = net.init(jax.random.key(0)), jax.random.key(1)
    args = dict(loss="cross_entropy", optimizer=opt, batch_size=8, key=key)
    straight = jn.fit(net, params, x, y, epochs=5, **args)
    saver = Checkpointer(tmp_path / "ckpt", every=2, keep=2, metadata={"note": "mine"})
    jn.fit(net, params, x, y, epochs=3, callbacks=[saver], **args)
    assert [e.epoch for e in checkpoint.entries(tmp_path / "ckpt")] == [2, 3]
    like = jax.eval_shape(lambda: jn.init_fit_state(params, opt, key))
    restored = checkpoint.restore(tmp_path / "ckpt", like)
    assert restored.metadata == {"note": "mine"} and restored.state.epoch == 3
    resumed = jn.fit(net, None, x, y, epochs=5, resume=restored.state, **args)
    assert _bytes(resumed.train) == _bytes(straight.train)


@pytest.mark.slow
def test_a_member_run_checkpoints_and_resumes_like_a_single_run(tmp_path):
    config = configlib.make_config(**SMALL, seeds=2, lrs=(0.01, 0.1))
    straight = runlib.run(config, out=tmp_path / "straight")
    short = runlib.run(
        configlib.make_config(**dict(SMALL, epochs=2), seeds=2, lrs=(0.01, 0.1)),
        out=tmp_path / "run",
        checkpoint_every=1,
    )
    assert [e.epoch for e in checkpoint.entries(tmp_path / "run" / "checkpoints")] == [1, 2] and short.finished
    extended = runlib.resume(tmp_path / "run", epochs=4)
    assert _bytes(extended.model.params) == _bytes(straight.model.params)
    untimed = [
        [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
        for h in (extended.history, straight.history)
    ]
    assert untimed[0] == untimed[1]


def test_resume_extends_a_finished_run_to_more_epochs_bitwise(tmp_path):
    straight = runlib.run(configlib.make_config(**dict(SMALL, epochs=6)), out=tmp_path / "six")
    runlib.run(configlib.make_config(**SMALL), out=tmp_path / "run")
    notes = []
    extended = runlib.resume(tmp_path / "run", epochs=6, notify=lambda m, always=False: notes.append(m))
    assert any("from its checkpoint of epoch 4" in n for n in notes)
    assert _bytes(extended.model.params) == _bytes(straight.model.params)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 6


def test_rerunning_the_same_config_continues_and_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    config = configlib.make_config(**SMALL)
    first = runlib.run(config, out=out)
    notes = []
    again = runlib.run(config, out=out, notify=lambda m, always=False: notes.append((m, always)))
    assert (f"{out.absolute()} already finished at epoch 4; not training further", True) in notes
    assert _bytes(again.model.params) == _bytes(first.model.params)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = configlib.make_config(**dict(SMALL, hidden=(5,), lr=0.1))
    with pytest.raises(ValueError, match=r"holds another run \(it differs in hidden, lr\)") as e:
        runlib.run(other, out=out)
    assert "--hidden, --lr" in e.value.render(cli.flag) and "(--overwrite)" in e.value.render(cli.flag)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # a refusal changes nothing
    replaced = runlib.run(other, out=out, overwrite=True)
    assert files.load_model(out).meta["sizes"] == [2, 5, 2] and replaced.summary["epochs"] == 4


def test_a_second_writer_is_refused_at_once_and_a_dead_holder_is_not_in_the_way(tmp_path):
    folder = RunFolder(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from jaxnet.app.rundir import RunFolder\nwith RunFolder(sys.argv[2]).lock():\n"
            " print('locked', flush=True); time.sleep(60)",
            str(ROOT),
            str(folder.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(RunFolderBusy, match=rf"in use by process {holder.pid} on "):
            runlib.run(configlib.make_config(**SMALL), out=folder.path)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (folder.path / ".lock").exists()  # left by the killed holder: stale, and recognized as such
    with folder.lock():
        pass


def test_weight_decay_is_applied_by_every_optimizer():
    for name in recipes.OPTIMIZERS:
        plain = configlib.make_config(**SMALL, optimizer=name, weight_decay=0.0)
        decayed = configlib.make_config(**SMALL, optimizer=name, weight_decay=0.5)
        params = {"w": np.ones(3, np.float32)}
        grads = {"w": np.zeros(3, np.float32)}
        opt_plain, opt_decayed = configlib.make_optimizer(plain), configlib.make_optimizer(decayed)
        up_plain, _ = opt_plain.update(grads, opt_plain.init(params), params)
        up_decayed, _ = opt_decayed.update(grads, opt_decayed.init(params), params)
        # pulled further towards zero than without decay (some optimizers move even on zero gradients)
        assert np.all(np.asarray(up_decayed["w"]) < np.asarray(up_plain["w"])), name
    sgd = configlib.make_optimizer(configlib.make_config(**SMALL, optimizer="sgd", lr=0.1, weight_decay=0.5))
    update, _ = sgd.update({"w": np.zeros(1)}, sgd.init({"w": np.ones(1)}), {"w": np.ones(1)})
    np.testing.assert_allclose(update["w"], [-0.1 * 0.5])  # PyTorch's SGD weight_decay: lr * wd * w
    assert configlib.make_config(**SMALL, optimizer="adamw").weight_decay == configlib.ADAMW_WEIGHT_DECAY


def test_many_distinct_integer_targets_are_refused_unless_the_task_is_given(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(442, 3)).astype(np.float32)
    y = rng.integers(25, 346, size=442)  # like scikit-learn's diabetes: integer-valued, many values
    np.savez(tmp_path / "d.npz", x=x, y=y)
    config = configlib.make_config(data=str(tmp_path / "d.npz"), hidden=(8,), epochs=2)
    with pytest.raises(ValueError, match=r"distinct integer values in 442 rows.*task") as e:
        runlib.run(config)
    assert "--task" in e.value.render(cli.flag)
    result = runlib.run(configlib.make_config(data=str(tmp_path / "d.npz"), hidden=(8,), epochs=2, task="regression"))
    summary = result.summary
    assert summary["task"] == "regression" and summary["test_accuracy"] is None
    assert {"test_mse", "test_mae", "test_r2"} <= set(summary)


def test_regression_evaluate_reports_mse_mae_and_r2(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0]) + 0.5).astype(np.float32)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    config = configlib.make_config(data=str(tmp_path / "r.npz"), hidden=(), epochs=40, lr=0.05)
    result = runlib.run(config, out=tmp_path / "run")
    saved = files.load_model(tmp_path / "run")
    from jaxnet.app import saved as savedlib

    metrics = savedlib.evaluate_saved(saved, *savedlib.load_features(saved, str(tmp_path / "r.npz")))
    outputs = savedlib.predict_saved(saved, savedlib.load_features(saved, str(tmp_path / "r.npz"))[0])[:, 0]
    np.testing.assert_allclose(metrics["mse"], np.mean((outputs - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(outputs - y)), rtol=1e-5)
    np.testing.assert_allclose(metrics["r2"], 1 - np.sum((outputs - y) ** 2) / np.sum((y - y.mean()) ** 2), rtol=1e-5)
    assert metrics["r2"] > 0.9 and result.summary["test_r2"] > 0.9


def _jaxnet(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "jaxnet.app", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kwargs,
    )


def test_help_does_not_import_jax():
    code = "import sys; from jaxnet.app import cli; cli.build_parser(); print('jax' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "False", proc.stderr
    bad = _jaxnet("train", "--lr", "fast")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.slow  # 17 s of subprocesses; the exit codes are also checked in-process by test_cli.py
def test_cli_exit_codes_streams_and_requeued_commands(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "moons", "--hidden", "4", "--epochs", "3", "--out", out]
    first = _jaxnet(*args)
    assert first.returncode == 0 and first.stdout == "" and "epoch 3:" in first.stderr  # progress on stderr
    assert first.stderr.startswith("task: classification, 2 classes")
    again = _jaxnet(*args, "--quiet")  # a requeued job reruns the same command
    assert again.returncode == 0 and "already finished at epoch 3" in again.stderr
    other = _jaxnet(*args[:-2], "--lr", "0.5", "--out", out)
    assert other.returncode == 2 and "differs in --lr" in other.stderr and other.stderr.count("\n") == 1
    np.savez(tmp_path / "x.npz", x=np.zeros((20000, 2), np.float32))
    head = subprocess.run(
        f"{sys.executable} -m jaxnet.app predict --model {out} --data {tmp_path / 'x.npz'} | head -2",
        shell=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert head.stdout.count("\n") == 2 and head.stderr == "", head.stderr


def test_a_nonfinite_loss_is_a_runtime_failure_exit_1(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    np.savez(tmp_path / "lin.npz", x=x, y=x @ np.array([1.0, -1.0], np.float32))
    proc = _jaxnet(
        "train",
        "--data",
        tmp_path / "lin.npz",
        "--hidden",
        "",
        "--optimizer",
        "sgd",
        "--lr",
        "3",
        "--epochs",
        "60",
        "--quiet",
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "(--skip-nonfinite); no checkpoint was saved (use --out DIR)" in proc.stderr
    args = ["--hidden", "", "--optimizer", "sgd", "--lr", "3", "--steps", "200", "--eval-every", "100", "--quiet"]
    steps = _jaxnet("train", "--data", tmp_path / "lin.npz", *args, "--out", tmp_path / "run")
    assert steps.returncode == 1 and steps.stderr.count("\n") == 1, steps.stderr
    assert re.search(r"non-finite at step \d+: .*no checkpoint was saved before it \(save every N steps: "
                     r"--checkpoint-steps N\)$", steps.stderr.strip()), steps.stderr  # fmt: skip


@pytest.mark.slow
def test_a_resume_does_not_depend_on_the_current_directory(tmp_path, monkeypatch):
    x, y = _xor(80)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "xor.npz", x=x, y=y)
    monkeypatch.chdir(tmp_path / "data")
    config = configlib.make_config(data="xor.npz", hidden=(4,), epochs=2, batch_size=16)
    assert config.data == str(tmp_path / "data" / "xor.npz")  # stored resolved
    runlib.run(config, out=tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert runlib.resume(tmp_path / "run", epochs=3).summary["epochs"] == 3


def test_regression_targets_in_any_units_train_with_the_defaults(tmp_path):
    # Prices in dollars: with the default Adam 1e-3 an unscaled target would not be learned in 30
    # epochs (R² far below 0); targets are standardized on the training split, outputs scaled back.
    rng = np.random.default_rng(0)
    x = rng.uniform([500, 1, 0], [3000, 6, 80], size=(1000, 3)).astype(np.float32)
    price = (100 * x[:, 0] + 20000 * x[:, 1] - 1000 * x[:, 2] + rng.normal(0, 20000, 1000)).astype(np.float32)
    np.savez(tmp_path / "houses.npz", x=x, y=price)
    result = runlib.run(configlib.make_config(data=str(tmp_path / "houses.npz"), hidden=(32,)), out=tmp_path / "run")
    assert result.summary["test_r2"] > 0.85, result.summary
    saved = files.load_model(tmp_path / "run")
    from jaxnet.app import saved as savedlib

    xs, ys = savedlib.load_features(saved, str(tmp_path / "houses.npz"))
    predictions = savedlib.predict_saved(saved, xs)[:, 0]
    assert abs(np.median(predictions) - np.median(price)) < 0.1 * np.median(price)  # in dollars
    metrics = savedlib.evaluate_saved(saved, xs, ys)
    np.testing.assert_allclose(metrics["mse"], np.mean((predictions - price) ** 2), rtol=1e-4)


def test_resume_to_fewer_epochs_than_done_is_refused_and_changes_nothing(tmp_path):
    runlib.run(configlib.make_config(**SMALL), out=tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"has trained 4 epochs, more than epochs 2") as e:
        runlib.resume(tmp_path / "run", epochs=2)
    assert "give --epochs above 4" in e.value.render(cli.flag)
    assert (tmp_path / "run" / "config.json").read_text() == before
    with pytest.raises(ValueError, match=r"holds this run with epochs 4: to extend it") as e:
        runlib.run(configlib.make_config(**dict(SMALL, epochs=6)), out=tmp_path / "run")
    assert "(--resume DIR --epochs N)" in e.value.render(cli.flag)


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_a_corrected_one(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    np.savez(tmp_path / "lin.npz", x=x, y=x @ np.array([1.0, -1.0], np.float32))
    bad = configlib.make_config(
        data=str(tmp_path / "lin.npz"), hidden=(), optimizer="sgd", lr=1e4, epochs=20, standardize=False
    )
    with pytest.raises(jn.NonFiniteLossError):
        runlib.run(bad, out=tmp_path / "run")
    good = configlib.make_config(data=str(tmp_path / "lin.npz"), hidden=(), optimizer="sgd", lr=0.1, epochs=5)
    assert runlib.run(good, out=tmp_path / "run").summary["epochs"] == 5


def test_an_unusable_out_is_refused_before_any_data_is_read(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for out, match in ((tmp_path / "file", "is a file, not a folder"), ("", "out is empty")):
        with pytest.raises(ValueError, match=match):
            runlib.run(configlib.make_config(data=str(tmp_path / "missing.npz")), out=out)
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        runlib.run(configlib.make_config(data=str(tmp_path / "missing.npz")), out=tmp_path / "run", keep=0)
    assert not (tmp_path / "run").exists()


def test_ties_on_accuracy_are_broken_by_validation_loss():
    history = [{"val_accuracy": [1.0, 1.0, 0.9], "val_loss": [0.3, 0.1, 0.05], "best_epoch": [1, 1, 1]}]
    assert jn.best_member(history, "val_accuracy") == 1


@pytest.mark.slow
def test_json_outputs_are_strict_json(tmp_path):
    x = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    np.savez(tmp_path / "lin.npz", x=x, y=x @ np.array([1.0, -1.0], np.float32))
    proc = _jaxnet(
        "train",
        "--data",
        tmp_path / "lin.npz",
        "--hidden",
        "",
        "--optimizer",
        "sgd",
        "--lr",
        "3",
        "--batch-size",
        "64",
        "--epochs",
        "14",
        "--skip-nonfinite",
        "--quiet",
        "--json",
        "--out",
        tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json"))
    assert summary["skipped"] > 0
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_an_unknown_option_names_the_subcommand_help(capsys):
    assert cli.main(["train", "--nonsense"]) == 2
    assert capsys.readouterr().err == "jaxnet: error: unrecognized arguments: --nonsense (see 'jaxnet train --help')\n"
