"""Loggers: a digits run with --log tensorboard,mlflow,csv reads back the same epochs from each."""

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from jaxnet import loggers
from jaxnet.app import cli

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

# MLflow's SQLite store (through SQLAlchemy 2.1) warns about its own use of deprecated options.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("logged") / "run"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        args = ["train", "--epochs", "3", "--out", str(out), "--log", "tensorboard,mlflow,csv", "--quiet"]
        args += ["--metrics", "f1,recall", "--log-every-steps", "10"]
        assert cli.main(args) == 0
    finally:
        mp.undo()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    return out, records


def validation(records):
    return [(r["epoch"], r["val_loss"], r["val_accuracy"], r["val_f1"], r["train_f1"]) for r in records]


def logged_steps(out) -> list[dict]:
    rows = list(csv.DictReader((out / "steps.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]  # digits: 20 steps per epoch
    assert all(float(r["learning_rate"]) == pytest.approx(1e-3) and float(r["grad_norm"]) > 0 for r in rows)
    return rows


@pytest.mark.slow
def test_csv_holds_the_same_epochs(logged):
    out, records = logged
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    columns = ("epoch", "val_loss", "val_accuracy", "val_f1", "train_f1")
    assert [tuple(float(r[c]) for c in columns) for r in rows] == validation(records)
    logged_steps(out)


@pytest.mark.slow
def test_tensorboard_events_read_back_with_tensorboards_reader(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = logged
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("val_loss", "val_accuracy", "train_loss", "val_f1", "train_recall"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2, 3]
        assert all(abs(v - r[tag]) <= 1e-6 * max(1.0, abs(r[tag])) for (_, v), r in zip(got, records))  # float32
    rows = logged_steps(out)
    for name in ("loss", "grad_norm", "learning_rate"):
        got = [(e.step, e.value) for e in events.Scalars(f"step/{name}")]
        assert got == [(int(r["step"]), pytest.approx(float(r[name]), rel=1e-6)) for r in rows]


@pytest.mark.slow
def test_mlflow_run_holds_params_metrics_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    out, records = logged
    stored = json.loads((out / "mlflow-run.json").read_text())
    client = MlflowClient(stored["tracking_uri"])
    run = client.get_run(stored["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
    for tag in ("val_loss", "val_accuracy", "val_f1", "train_f1"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(stored["run_id"], tag))
        assert history == [(r["epoch"], r[tag]) for r in records]
    steps = sorted((m.step, m.value) for m in client.get_metric_history(stored["run_id"], "step/grad_norm"))
    assert steps == [(int(r["step"]), pytest.approx(float(r["grad_norm"]), rel=1e-6)) for r in logged_steps(out)]
    artifacts = {a.path for a in client.list_artifacts(stored["run_id"])}
    assert {"model.npz", "curves.png", "metrics.jsonl", "config.json"} <= artifacts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_live_tensorboard_serves_the_same_scalars(logged):
    out, records = logged
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(out / "tensorboard"), "--port", str(port)]
    server = subprocess.Popen([*command, "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=val_loss"
        deadline, body = time.monotonic() + 90, None
        while body is None and time.monotonic() < deadline:
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        assert body is not None, "tensorboard did not answer"
        assert [step for _, step, _ in body] == [1, 2, 3]
        assert all(abs(v - r["val_loss"]) <= 1e-6 * max(1.0, r["val_loss"]) for (_, _, v), r in zip(body, records))
        text = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/text/tags", timeout=5).read())
        assert text == {".": ["config"]}
    finally:
        server.kill()
        server.communicate()


def test_member_records_become_one_row_or_series_per_member(tmp_path):
    record = {"epoch": 2, "train_loss": [0.5, None], "val_loss": [0.4, 0.3], "seconds": 1.0}
    assert loggers.scalars(record) == [
        ("train_loss/member_0", 0.5),
        ("val_loss/member_0", 0.4),
        ("val_loss/member_1", 0.3),
        ("seconds", 1.0),
    ]
    writer = loggers.CSVLogger(tmp_path / "m.csv")

    class State:
        history = []

    writer.on_run_start(State())
    writer(None, record)
    rows = list(csv.DictReader((tmp_path / "m.csv").read_text().splitlines()))
    assert [(r["member"], r["train_loss"], r["val_loss"]) for r in rows] == [("0", "0.5", "0.4"), ("1", "", "0.3")]


def test_bad_logger_names_are_one_line_usage_errors(tmp_path, capsys):
    assert cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "r"), "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxnet: error: --log: unknown logger 'wandb': use csv, tensorboard, mlflow (comma-separated)"
    assert not (tmp_path / "r").exists()
    assert cli.main(["train", "--epochs", "1", "--log", "csv"]) == 2
    assert "--log NAMES needs --out DIR" in capsys.readouterr().err
    # steps logged to no logger: refused, not ignored
    assert cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "s"), "--log-every-steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxnet: error: --log-every-steps N logs steps to the loggers of --log NAMES (csv, tensorboard, " + (
        "mlflow): give it"
    )


def test_a_resumed_run_logs_on_to_its_loggers(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "moons", "--epochs", "2", "--out", str(out), "--log", "csv", "--quiet"]) == 0
    assert cli.main(["train", "--resume", str(out), "--epochs", "4", "--quiet"]) == 0  # --log not given again
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_fit_is_silent_by_default_and_talks_when_asked(capsys):
    import jax
    import numpy as np
    import optax

    import jaxnet as jn

    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    net = jn.mlp([3, 2])
    args = dict(loss="cross_entropy", optimizer=optax.sgd(0.1), epochs=2, batch_size=8, key=jax.random.key(0))
    jn.fit(net, net.init(jax.random.key(0)), x, y, **args)
    assert capsys.readouterr() == ("", "")
    jn.fit(net, net.init(jax.random.key(0)), x, y, verbose="lines", validation=(x, y), **args)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["epoch 1", "epoch 2"] and "val_acc=" in err[-1]
    with pytest.raises(ValueError, match="verbose must be False, True, 'bar' or 'lines'"):
        jn.fit(net, net.init(jax.random.key(0)), x, y, verbose=2, **args)
