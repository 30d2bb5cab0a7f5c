"""Defects a probe of the API found (issue 30), each fixed where it belongs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from incli import run_cli

import jaxnet as jn

ROOT = Path(__file__).resolve().parents[1]


def problem():
    x = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32)


def test_fit_never_donates_the_hyperparameters_a_caller_passes():
    net = jn.mlp([3, 4, 2])
    keys = jn.member_keys([0, 1])
    lr = jnp.array([1e-2, 1e-3])
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    jn.fit(net, jn.init_members(net, keys), *problem(), loss="softmax_cross_entropy", optimizer=opt, epochs=2,
           batch_size=8, key=keys, hyperparams={"learning_rate": lr})  # fmt: skip
    np.testing.assert_allclose(np.asarray(lr), [1e-2, 1e-3])  # before: RuntimeError: Array has been deleted


def test_a_dp_optimizer_without_per_example_gradients_names_the_option():
    net = jn.mlp([3, 4, 2])
    with pytest.raises(ValueError, match=r"clips per-example gradients .* per_example_grads=True"):
        jn.fit(net, net.init(jax.random.key(0)), *problem(), loss="softmax_cross_entropy",
               optimizer=jn.dp_optimizer(0.1, 1.0, 1.0, jax.random.key(2)), epochs=1, batch_size=8,
               key=jax.random.key(1))  # fmt: skip


def test_a_stateful_apply_that_returns_y_alone_names_the_contract():
    bad = jn.StatefulModel(lambda k: ({"w": jnp.ones((3, 2))}, {}), lambda p, s, x, ctx: x @ p["w"])
    with pytest.raises(TypeError, match=r"a StatefulModel's apply must return \(y, state\) .* got an array of shape"):
        jn.fit(bad, {"w": jnp.ones((3, 2))}, *problem(), loss="softmax_cross_entropy", optimizer=optax.sgd(0.1),
               epochs=1, batch_size=8, key=jax.random.key(1), model_state={})  # fmt: skip


def test_header_names_equal_up_to_spaces_are_refused_naming_both(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("f0, f0 ,y\n1,2,0\n3,4,1\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "jaxnet.app", "train", "--data", str(path), "--target", "y"],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "duplicate column names in the header: 'f0' and ' f0 '" in result.stderr, result.stderr


def test_a_run_folders_config_json_is_a_config_file(tmp_path):
    from jaxnet.app import configfile

    (tmp_path / "config.json").write_text('{"epochs": 3, "hidden": [8, 8], "patience": null}')
    assert configfile.load_config_file(tmp_path / "config.json") == {"epochs": 3, "hidden": (8, 8)}
    (tmp_path / "bad.json").write_text("{epochs")
    with pytest.raises(ValueError, match="is not valid JSON"):
        configfile.load_config_file(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "body, message",
    [
        ("def build(n):\n    return mlp([n, 4, 2])\n",
         "build() takes 1 positional argument but 2 were given: a factory is called as factory(in_features, out_dim)"),
        ("def build(n, k):\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom (a factory is called as"),
    ],
)  # fmt: skip
def test_an_arch_factory_that_does_not_fit_names_arch_and_the_contract(tmp_path, body, message):
    (tmp_path / "net.py").write_text("from jaxnet import mlp\n\n" + body)
    data = tmp_path / "t.csv"
    data.write_text("a,b,y\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(40)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", "train", "--data", str(data), "--target", "y", "--epochs", "1",
           "--arch", f"{tmp_path / 'net.py'}:build"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxnet: error: --arch ") and message in lines[0], result.stderr


def test_an_arch_factory_without_arguments_is_accepted(tmp_path):
    (tmp_path / "net.py").write_text("from jaxnet import mlp\n\ndef build():\n    return mlp([2, 4, 2])\n")
    data = tmp_path / "t.csv"
    data.write_text("a,b,y\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(40)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", "train", "--data", str(data), "--target", "y", "--epochs", "1",
           "--arch", f"{tmp_path / 'net.py'}:build", "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_rows_without_a_target_are_left_out_and_counted_and_ignored_columns_are_no_features(tmp_path):
    rows = ["id,a,b,y"] + [f"{i},{i % 5},{(i * 7) % 3},{'' if i % 10 == 3 else i % 2}" for i in range(60)]
    rows.append("60,1,2,nan")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    result = run_cli("train", "--data", tmp_path / "t.csv", "--target", "y", "--ignore", "id", "--epochs", "1",
                     "--out", tmp_path / "run", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "t.csv: 7 of 61 rows have no target value: left out" in result.stderr.splitlines()[1], result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["ignore"] == ["id"]
    from jaxnet.app import files

    assert list(files.load_model(tmp_path / "run").meta["feature_names"]) == ["a", "b"]
    bad = run_cli("train", "--data", tmp_path / "t.csv", "--target", "y", "--ignore", "nope", "--epochs", "1")
    assert bad.returncode == 2 and "lacks the column to ignore 'nope'" in bad.stderr, bad.stderr


def test_a_column_that_numbers_the_rows_is_refused_as_a_feature_until_ignored(tmp_path):
    # sorted by the target, with a row number: as a feature it predicts the target perfectly
    rows = ["rowid,a,y"] + [f"{i + 1},{(i * 7) % 5},{int(i >= 30)}" for i in range(60)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    refused = run_cli("train", "--data", tmp_path / "t.csv", "--target", "y", "--epochs", "1")
    assert refused.returncode == 2, refused.stderr
    assert "column 'rowid' numbers the rows (1, 2, 3 ...)" in refused.stderr and "--ignore rowid" in refused.stderr
    assert run_cli("train", "--data", tmp_path / "t.csv", "--target", "y", "--epochs", "1", "--ignore",
                   "rowid").returncode == 0  # fmt: skip


def test_predict_writes_its_output_file_whole_or_not_at_all(tmp_path):
    rows = ["a,b,y"] + [f"{i % 7},{i % 3},{i % 2}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    assert run_cli("train", "--data", tmp_path / "t.csv", "--target", "y", "--epochs", "1", "--out",
                   tmp_path / "run", "--quiet").returncode == 0  # fmt: skip
    out = tmp_path / "p.csv"
    done = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "t.csv", "--output", out)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert len(out.read_text().splitlines()) == 41
    (tmp_path / "bad.csv").write_text("a,b\n" + "1,2\n" * 30 + "x,2\n")  # a bad cell in the last row
    failed = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "bad.csv", "--output", out)
    assert failed.returncode == 2, failed.stderr
    assert len(out.read_text().splitlines()) == 41  # the earlier file, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.csv")]  # no temporary file left


def test_the_json_names_the_epoch_of_its_validation_figures(tmp_path):
    result = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 3 and summary["best_epoch"] in (1, 2, 3)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_separated_table_is_read_as_its_columns(tmp_path, sep):
    rows = [sep.join(["sepalLength", "sepalWidth", "species"])]
    rows += [
        sep.join([str(4 + i % 5 * 0.3), str(2 + i % 3 * 0.4), "setosa" if i % 2 else "virginica"]) for i in range(40)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    result = run_cli("train", "--data", tmp_path / "t.csv", "--target", "species", "--epochs", "1", "--out",
                     tmp_path / "run", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    predicted = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "t.csv")
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 41, predicted.stderr


def test_messages_point_at_the_flag_the_user_gave_and_the_row_at_fault(tmp_path):
    rows = ["a,b,species"] + [f"{i % 7},{i % 3},{'x' if i % 2 else 'z'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    mse = run_cli("train", "--data", tmp_path / "t.csv", "--target", "species", "--loss", "mse", "--epochs", "1")
    assert mse.returncode == 2 and "--loss 'mse' is a regression loss" in mse.stderr and "--task" not in mse.stderr
    rows[20] = "1,2,x,9"
    (tmp_path / "ragged.csv").write_text("\n".join(rows) + "\n")
    ragged = run_cli("train", "--data", tmp_path / "ragged.csv", "--target", "species", "--epochs", "1")
    assert ragged.returncode == 2 and "ragged.csv: row 20 has 4 fields, expected 3 as in the header" in ragged.stderr
    assert run_cli("train", "--data", tmp_path / "t.csv", "--target", "species", "--epochs", "1", "--out",
                   tmp_path / "run", "--quiet").returncode == 0  # fmt: skip
    (tmp_path / "features.csv").write_text("a,b\n1,2\n3,4\n")
    unlabelled = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "features.csv")
    assert unlabelled.returncode == 2
    assert "lacks the target column 'species' that the model was trained on" in unlabelled.stderr


def test_class_weights_take_class_names_and_the_class_order_is_printed(tmp_path):
    weather = ["drizzle", "rain", "snow"]
    rows = ["t,w,weather"] + [f"{i % 9},{i % 4},{weather[i % 3]}" for i in range(60)]
    (tmp_path / "w.csv").write_text("\n".join(rows) + "\n")
    args = ["train", "--data", tmp_path / "w.csv", "--target", "weather", "--epochs", "1"]
    named = run_cli(*args, "--class-weight", "snow:10,drizzle:5")
    assert named.returncode == 0, named.stderr
    assert named.stderr.startswith("task: classification, 3 classes (drizzle, rain, snow)")
    unknown = run_cli(*args, "--class-weight", "hail:3")
    assert (
        unknown.returncode == 2
        and "names the class 'hail', which the data lacks: its classes are drizzle, rain, snow" in unknown.stderr
    )


def test_a_rerun_that_starts_over_says_so(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "1", "--out", out, "--quiet")
    assert first.returncode == 0
    for name in ("model.npz", "metrics.jsonl", "curves.png"):  # as a run stopped before its first save leaves it
        (out / name).unlink(missing_ok=True)
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    again = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "1", "--out", out)
    assert again.returncode == 0, again.stderr
    assert "holds this run's config but no checkpoint (it stopped before its first save): training starts over" in (
        again.stderr
    )
    for name in ("model.npz", "metrics.jsonl", "curves.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    resumed = run_cli("train", "--resume", out)
    assert resumed.returncode == 2, resumed.stderr
    assert resumed.stderr.strip().endswith(
        f"cannot resume: the run in {out} stopped before its first checkpoint: "
        f"train it again (jaxnet train --config {out / 'config.toml'} --out {out})"
    )
    other = run_cli("train", "--dataset", "digits", "--hidden", "16", "--epochs", "1", "--out", out)
    assert other.returncode == 0, other.stderr
    assert f"{out} holds the config of another run but no checkpoint" in other.stderr
    shutil.rmtree(out / "checkpoints")  # a finished run's model, its checkpoints gone
    finished = run_cli("train", "--resume", out)
    assert finished.returncode == 2
    assert finished.stderr.strip().endswith(
        f"cannot resume: {out} holds a model but no checkpoints: train a new run to go on"
    )
    for name in ("model.npz", "metrics.jsonl", "curves.png"):
        (out / name).unlink()
    stored = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**stored, "from_a_later_version": 1}))
    again = run_cli("train", "--dataset", "digits", "--hidden", "16", "--epochs", "1", "--out", out)
    assert again.returncode == 0 and f"{out} holds the config of another run" in again.stderr, again.stderr


def test_named_metrics_show_in_the_epoch_lines_the_final_line_and_the_json():
    result = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "2", "--metrics", "f1", "--json")
    assert result.returncode == 0, result.stderr
    assert all("val_f1=" in line for line in result.stderr.splitlines() if line.startswith("epoch "))
    summary = json.loads(result.stdout)
    assert 0 <= summary["val_f1"] <= 1
    plain = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "2", "--metrics", "f1")
    assert "validation f1 " in plain.stderr.splitlines()[-1] or "validation f1 " in plain.stdout, plain.stderr
