"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, files left behind."""

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from csvfiles import write_csv

from jaxnet.app import cli
from jaxnet.app import data as datalib

ROOT = Path(__file__).resolve().parents[1]


def jaxnet(*args, cwd=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "jaxnet.app", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    good = [[*map(float, rng.normal(size=3)), int(rng.integers(0, 3))] for _ in range(60)]
    paths = {
        "good": write_csv(d / "good.csv", ["a", "b", "c", "label"], good),
        "text": write_csv(d / "text.csv", ["a", "b", "label"], [[1, 2, 0], [1, "x", 1], [3, 4, 0]]),
        "ragged": write_csv(d / "ragged.csv", ["a", "b", "label"], [[1, 2, 0], [1, 2], [3, 4, 1]]),
        "nan": write_csv(d / "nan.csv", ["a", "b", "label"], [[1, 2, 0], [1, "nan", 1], [3, 4, 0]]),
        "inf": write_csv(d / "inf.csv", ["a", "b", "label"], [[1, "inf", 0], [1, 2, 1], [3, 4, 0]]),
        "empty": write_csv(d / "empty.csv", ["a", "b", "label"], []),
        "other": write_csv(d / "other.csv", ["p", "q", "label"], [[1, 2, 0], [3, 4, 1]]),
        "baddir": d / "not-a-model",
    }
    np.savez(d / "wide.npz", x=np.zeros((5, 7), np.float32), y=np.zeros(5, np.int32))
    paths["wide"] = d / "wide.npz"
    np.savez(d / "range.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 7, 2]))
    paths["range"] = d / "range.npz"
    paths["baddir"].mkdir()
    model = d / "model"
    result = jaxnet("train", "--data", paths["good"], "--target", "label", "--epochs", "2", "--out", model, "--quiet")
    assert result.returncode == 0, result.stderr
    paths["model"] = model
    paths["quiet run"] = result
    return paths


# Checked as a user meets them: a real process, its exit code and its whole stderr (one per command
# path: a data file, an argument, a saved model).
BAD = {
    "missing file": (["train", "--data", "{d}/nope.csv", "--target", "label"], "not found"),
    "batch size 0": (["train", "--batch-size", "0"], "--batch-size.*positive integer"),
    "lm flag on a table": (["train", "--tokenizer", "char"], r"--tokenizer is for --task lm \(a language model\)"),
    "lm field on a table": (["train", "--context", "32"], "--context is for --task lm"),
    "not a model": (["predict", "--model", "{baddir}", "--data", "{good}"], "not a jaxnet model"),
    "data as the model": (
        ["predict", "--model", "{good}", "--data", "{good}"],
        r"not a jaxnet model: .*good\.csv is not a \.npz archive \(give the run folder of a training run\)",
    ),
}

# The same checks in-process (cli.main, the console script's entry point): the same code path,
# without a Python start-up each.
BAD_IN_PROCESS = {
    "directory as file": (["train", "--data", "{baddir}", "--target", "label"], "has no x.npy: a data folder holds"),
    "unreadable file": (["train", "--data", "{baddir}.csv", "--target", "label"], "not found"),
    "non-numeric cell": (
        ["train", "--data", "{text}", "--target", "label"],
        "row 2, column 'b': 'x' is not a number",
    ),
    "ragged row": (
        ["train", "--data", "{ragged}", "--target", "label"],
        "has 2 fields, expected 3 as in the header",
    ),
    "inf": (["train", "--data", "{inf}", "--target", "label"], "row 1, column 'b': inf is not a finite number"),
    "missing target": (
        ["train", "--data", "{good}", "--target", "y"],
        r"lacks the target column 'y' \(it has a, b, c, label\)",
    ),
    "labels out of range": (
        ["train", "--data", "{good}", "--target", "label", "--loss", "bce"],
        "labels out of range",
    ),
    "empty dataset": (["train", "--data", "{empty}", "--target", "label"], "empty dataset"),
    "negative batch": (["train", "--batch-size", "-4"], "--batch-size.*positive integer"),
    "lr 0": (["train", "--lr", "0"], "--lr.*greater than 0"),
    "lr nan": (["train", "--lr", "nan"], "--lr.*not a finite number"),
    "lr text": (["train", "--lr", "fast"], "--lr.*not a number"),
    "bad hidden": (["train", "--hidden", "64,0"], "--hidden.*positive integers"),
    "unknown activation": (["train", "--activation", "swish2"], "unknown --activation 'swish2'"),
    "unknown loss": (["train", "--loss", "hinge"], "unknown loss 'hinge'"),
    "unknown dataset": (["train", "--dataset", "mnist"], "unknown --dataset 'mnist'"),
    "feature mismatch csv": (
        ["predict", "--model", "{model}", "--data", "{other}"],
        "other.csv lacks the model's columns 'a', 'b', 'c'",
    ),
    "feature mismatch npz": (
        ["predict", "--model", "{model}", "--data", "{wide}"],
        "7 features but the model expects 3",
    ),
    "evaluate without targets": (
        ["evaluate", "--model", "{model}", "--data", "{other}"],
        "other.csv lacks the model's columns 'a', 'b', 'c'",
    ),
    "evaluate label range": (
        ["evaluate", "--model", "{model}", "--data", "{range}"],
        "labels out of range.*found 7",
    ),
    "evaluate unknown target": (
        ["evaluate", "--model", "{model}", "--data", "{good}", "--target", "y"],
        "has no column 'y': name its target column",
    ),
}


@pytest.fixture(scope="module")
def bad_results(files, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("outs")
    names = {k: str(v) for k, v in files.items() if k != "quiet run"} | {"d": str(files["good"].parent)}

    def run(item):
        case, (args, _) = item
        out = out_root / case.replace(" ", "-")
        extra = ["--out", out] if args[0] == "train" else []
        return case, (jaxnet(*[a.format(**names) for a in args], *extra), out)

    with ThreadPoolExecutor(max_workers=len(BAD)) as pool:
        return dict(pool.map(run, BAD.items()))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_results):
    import re

    result, out = bad_results[case]
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxnet: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(BAD[case][1], lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("case", sorted(BAD_IN_PROCESS))
def test_bad_input_in_process_is_one_line_exit_2_and_writes_nothing(case, files, tmp_path, capsys):
    import re

    from jaxnet.app.cli import main

    names = {k: str(v) for k, v in files.items() if k != "quiet run"} | {"d": str(files["good"].parent)}
    args, pattern = BAD_IN_PROCESS[case]
    out = tmp_path / "out"
    extra = ["--out", str(out)] if args[0] == "train" else []
    assert main([a.format(**names) for a in args] + extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxnet: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_train_predict_evaluate_agree(files, tmp_path):
    model = files["model"]
    assert {p.name for p in model.iterdir()} == {
        "model.npz",
        "metrics.jsonl",
        "curves.png",
        "checkpoints",
        "config.json",
        "config.toml",
        "data.json",  # what reading the table did: rows, gaps, categories
    }
    records = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    predicted = jaxnet("predict", "--model", model, "--data", files["good"], "--probabilities")
    assert predicted.returncode == 0, predicted.stderr
    rows = list(csv.DictReader(predicted.stdout.splitlines()))
    with open(files["good"]) as f:
        labels = [int(float(r["label"])) for r in csv.DictReader(f)]
    assert len(rows) == len(labels) == 60
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(3)] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean([int(r["prediction"]) == t for r, t in zip(rows, labels)])
    evaluated = jaxnet("evaluate", "--model", model, "--data", files["good"], "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_default_train_reaches_95_percent_on_digits_and_predict_reproduces_it(tmp_path, capsys):
    from jaxnet.app.cli import main

    out = tmp_path / "digits"
    result = jaxnet("train", "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {
        "dataset",
        "task",
        "epochs",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "test_loss",
        "test_accuracy",
        "seconds",
        "train_seconds",
        "steps_per_second",
        "best_epoch",
        "batch_size",
        "parameters",
        "trainable_parameters",
    }
    assert summary["dataset"] == "digits" and summary["test_accuracy"] >= 0.95 and summary["batch_size"] == 64
    assert summary["trainable_parameters"] == summary["parameters"] > 0
    assert "epoch 1:" in result.stderr  # plain progress lines: stderr is not a terminal
    # The test split, rebuilt from the seed, evaluates to the reported test accuracy.
    ds = datalib.load_builtin("digits")
    test = datalib.split(ds, 0.1, 0.2, 0).test
    np.savez(tmp_path / "test.npz", x=test.x, y=test.y)
    # (In-process: test_train_predict_evaluate_agree runs both commands as processes.)
    assert main(["evaluate", "--model", str(out), "--data", str(tmp_path / "test.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert main(["predict", "--model", str(out), "--data", str(tmp_path / "test.npz")]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    accuracy = np.mean([int(r["prediction"]) == t for r, t in zip(rows, test.y)])
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_quiet_prints_nothing(files):
    result = files["quiet run"]  # the fixture's model was trained with --quiet
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_the_peer_timeout_help_shows_the_library_default():
    from jaxnet import parallel

    assert cli.PEER_TIMEOUT_HELP == parallel.PEER_TIMEOUT
