"""Tables as they come (issue 30): dates, what reading a table did, the figures people look for."""

import csv
import datetime
import gc
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from incli import run_cli

import jaxnet as jn
from jaxnet import callbacks
from jaxnet.app import data as datalib
from jaxnet.app import tables

pytest.importorskip("pyarrow")


def test_the_calendar_of_a_day_count_is_pythons_for_numpy_and_jax():
    days = np.concatenate([np.arange(-700000, 2900000, 8191), np.arange(-800, 800)]).astype(np.float64)
    found = tables.calendar(days)
    for d, row in zip(days, found):
        day = datetime.date(1970, 1, 1) + datetime.timedelta(days=int(d))
        assert tuple(int(v) for v in row[:4]) == (day.year, day.month, day.weekday(), day.timetuple().tm_yday), d
    np.testing.assert_array_equal(found[:, 4], days)
    small = days[np.abs(days) < 100000]  # float32: exact days within 2^24
    on_device = np.asarray(tables.calendar(jnp.asarray(small, jnp.float32), jnp))
    np.testing.assert_array_equal(on_device[:, :4], tables.calendar(small)[:, :4])


def dated(tmp_path, rows=80):
    path = tmp_path / "dated.csv"
    lines = ["when,stamp,x,y"]
    for i in range(rows):
        day = datetime.date(2012, 1, 1) + datetime.timedelta(days=37 * i)
        when = "" if i == 5 else day.isoformat()
        lines.append(f"{when},{day.isoformat()} 18:00:00,{i % 7},{day.month > 6 and 'late' or 'early'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_date_and_datetime_columns_become_calendar_features(tmp_path):
    ds = datalib.load_table(dated(tmp_path), "y")
    names = list(ds.feature_names)
    assert names[:5] == [f"when ({p})" for p in tables.DATE_FEATURES]
    assert "when (missing)" in names and "stamp (days)" in names
    row = ds.x[7]  # 2012-01-01 + 259 days = 2012-09-16, a Sunday, day 260 of a leap year
    day = datetime.date(2012, 9, 16)
    assert list(row[:5]) == [2012, 9, 6, 260, (day - datetime.date(1970, 1, 1)).days]
    stamp = ds.x[7][names.index("stamp (days)")]
    assert stamp == pytest.approx((day - datetime.date(1970, 1, 1)).days + 0.75)
    gap = ds.x[5][:5]  # filled with the mean date, flagged
    assert ds.x[5][names.index("when (missing)")] == 1 and 2012 <= gap[0] <= 2020
    encoder = ds.encoder  # written once for numpy and jax: an exported program encodes the same
    raw = tables.raw_matrix(tables.read_table(dated(tmp_path)), encoder)
    np.testing.assert_allclose(np.asarray(tables.encode(jnp.asarray(raw, jnp.float32), encoder, jnp)),
                               tables.encode(raw, encoder), rtol=1e-6)  # fmt: skip


def test_gaps_and_unseen_categories_are_reported_on_stderr_and_in_the_run_folder(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["name,island,mass,target"]
    for i in range(90):
        island = "" if i % 30 == 4 else ["Biscoe", "Dream"][i % 2]
        mass = "nan" if i % 20 == 3 else f"{rng.normal(4000, 300):.0f}"
        lines.append(f"p{i:03d},{island},{mass},{'' if i == 50 else ['a', 'b'][i % 2]}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    result = run_cli("train", "--data", tmp_path / "t.csv", "--target", "target", "--ignore", "name", "--epochs",
                     "2", "--out", tmp_path / "run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "t.csv: 1 of 90 rows have no target value: left out" in result.stderr
    line = next(x for x in result.stderr.splitlines() if "gaps filled" in x)
    assert "'island' 3 as no category (flagged in 'island (missing)')" in line, line
    assert "'mass' 5 with the training rows' mean " in line, line
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    assert report["rows"] == 90 and report["rows_without_target"] == 1 and report["ignored"] == ["name"]
    assert report["gaps"]["island"] == {"cells": 3, "filled_with": None, "indicator": True}
    assert report["gaps"]["mass"]["cells"] == 5 and 3500 < report["gaps"]["mass"]["filled_with"] < 4500
    (tmp_path / "new.csv").write_text("name,island,mass\n007,Atlantis,\nq2,Dream,4100\n")
    predicted = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "new.csv", "--id-column", "name")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.splitlines()[0] == "name,prediction"
    assert [r.split(",")[0] for r in predicted.stdout.splitlines()[1:]] == ["007", "q2"]  # the text as written
    assert "new.csv: gaps filled: 'mass' 1 with the training rows' mean" in predicted.stderr, predicted.stderr
    assert "new.csv: categories the training rows lacked, encoded as no category: 'island' 1" in predicted.stderr
    missing = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "new.csv", "--id-column", "nom")
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("jaxnet: error: --id-column 'nom': new.csv has no such column (it has name, "
                                      "island, mass)")  # fmt: skip


def test_evaluate_and_the_test_split_report_named_metrics(tmp_path):
    result = run_cli("train", "--dataset", "digits", "--hidden", "8", "--epochs", "2", "--metrics", "f1,precision",
                     "--out", tmp_path / "run", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert 0 < summary["test_f1"] <= 1 and 0 < summary["test_precision"] <= 1
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 10, 50))
    by_default = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "d.npz", "--json")
    assert by_default.returncode == 0, by_default.stderr
    assert {"loss", "accuracy", "f1", "precision"} <= json.loads(by_default.stdout).keys()
    asked = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "d.npz", "--metrics", "recall")
    assert asked.returncode == 0 and " recall " in asked.stdout and " f1 " not in asked.stdout, asked.stdout
    bad = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "d.npz", "--metrics", "r2")
    assert bad.returncode == 2 and bad.stderr.startswith("jaxnet: error: --metrics: 'r2' compares"), bad.stderr


def test_several_regression_targets_are_each_scored_in_their_own_units(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    big, small = 100 + 40 * x[:, 0] + rng.normal(size=300) * 5, 15 + 2 * x[:, 1] + rng.normal(size=300) * 0.3
    rows = "\n".join(f"{a:.4f},{b:.4f},{c:.3f},{d:.4f}" for a, b, c, d in zip(*x.T, big, small))
    (tmp_path / "m.csv").write_text("a,b,hp,acc\n" + rows + "\n")
    result = run_cli("train", "--data", tmp_path / "m.csv", "--target", "hp,acc", "--epochs", "20", "--out",
                     tmp_path / "run", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    per = json.loads(result.stdout)["test_per_target"]
    assert per.keys() == {"hp", "acc"} and per["hp"]["mse"] > 10 * per["acc"]["mse"]
    scored = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "m.csv", "--json")
    predicted = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "m.csv")
    outputs = np.asarray([[float(v) for v in r] for r in list(csv.reader(predicted.stdout.splitlines()))[1:]])
    figures = json.loads(scored.stdout)["per_target"]
    for j, (name, target) in enumerate([("hp", big), ("acc", small)]):  # numpy on the printed predictions
        error = outputs[:, j] - np.round(target, 4 - j)
        assert figures[name]["mse"] == pytest.approx(np.mean(error**2), rel=1e-4)
        assert figures[name]["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-4)
        r2 = 1 - np.sum(error**2) / np.sum((target - target.mean()) ** 2)
        assert figures[name]["r2"] == pytest.approx(r2, abs=1e-4)
    text = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "m.csv")
    assert text.stdout.splitlines()[1].startswith("per target: hp MSE "), text.stdout


def test_a_library_batch_norm_refuses_a_partial_batch_unless_it_is_dropped():
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        norm: eqx.nn.BatchNorm

        def __init__(self, key):
            self.lin, self.norm = eqx.nn.Linear(3, 2, key=key), eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")

        def __call__(self, x, state, key=None):
            return self.norm(self.lin(x), state)

    model = jn.from_equinox(eqx.nn.make_with_state(Net))
    assert model.batch_statistics and not jn.from_equinox(eqx.nn.Linear(3, 2, key=jax.random.key(0))).batch_statistics
    params, state = model.init(jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    common = dict(optimizer=optax.sgd(0.1), loss="softmax_cross_entropy", epochs=1, key=jax.random.key(1),
                  model_state=state)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_size 4 leaves a final batch of 2 .* drop_remainder=True"):
        jn.fit(model, params, x, y, batch_size=4, **common)
    jn.fit(model, params, x, y, batch_size=4, drop_remainder=True, **common)
    jn.fit(model, params, x, y, batch_size=5, **common)
    jn.fit(jn.serial(model), [params], x, y, batch_size=5, **{**common, "model_state": [state]})
    with pytest.raises(ValueError, match="drop_remainder"):
        jn.fit(jn.serial(model), [params], x, y, batch_size=4, **{**common, "model_state": [state]})


def test_a_second_interrupt_that_lands_in_a_gc_callback_is_delivered_again():
    pending = [1]

    def collecting(phase, info):
        if phase == "start" and pending:
            pending.pop()
            raise KeyboardInterrupt  # Python cannot raise it here: before, it printed "Exception ignored in"

    with callbacks.Interrupt() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.signum == signal.SIGINT
        gc.callbacks.append(collecting)
        try:
            with pytest.raises(KeyboardInterrupt):
                gc.collect()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            gc.callbacks.remove(collecting)


def test_a_time_with_a_zone_reads_alike_when_training_and_predicting(tmp_path):
    lines = ["when,x,y"] + [f"2012-0{i % 9 + 1}-1{i % 9}T10:00:00+02:00,{i % 5},{i % 2}" for i in range(40)]
    (tmp_path / "tz.csv").write_text("\n".join(lines) + "\n")
    ds = datalib.load_table(tmp_path / "tz.csv", "y")
    chunks = list(datalib.feature_chunks(tmp_path / "tz.csv", ds.encoder, "y", rows=16))
    np.testing.assert_array_equal(np.concatenate([c.x for c in chunks]), ds.x)
    assert ds.x[0][3] == datetime.date(2012, 1, 10).timetuple().tm_yday  # 08:00 UTC, the same day


def test_wrappers_keep_a_library_batch_norm_known():
    eqx = pytest.importorskip("equinox")
    model = jn.from_equinox(eqx.nn.make_with_state(lambda key: eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")))
    assert all(m.batch_statistics for m in (jn.residual(model), jn.serial(jn.residual(model)), jn.repeat(model, 2)))
    from jaxnet import loop

    assert loop.counts_padding(jn.lora(jn.serial(model, jn.dense(3, 2)), 1), {})


def test_top_k_accuracy_beyond_the_classes_is_refused_by_name():
    from jaxnet.app import saved

    meta = {"loss": "softmax_cross_entropy", "task": "classification", "sizes": [4, 2]}
    with pytest.raises(ValueError, match="'top_5_accuracy' needs at least 5 classes; the model has 2"):
        saved.Tally(meta, metrics=["top_5_accuracy"])
    tally = saved.Tally(meta, metrics=["f1"])
    tally.add(np.zeros((0, 2), np.float32), np.zeros((0,), np.int32))  # an empty chunk counts nothing
    tally.add(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([0, 1], np.int32))
    assert tally.metrics()["accuracy"] == 1.0 and tally.n == 2


def table_of(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


@pytest.mark.parametrize(
    "header, row, message",
    [
        (
            "d,y",
            lambda i: f"{'01/02/2012' if i == 7 else f'2012-03-{i % 28 + 1:02d}'},{i % 2}",
            r"row 8, column 'd': '01/02/2012' is not a date, but the column's other values are",
        ),
        (
            "d,y",
            lambda i: f"{'2013-02-30' if i == 3 else f'2012-03-{i % 28 + 1:02d}'},{i % 2}",
            r"row 4, column 'd': '2013-02-30' is not a date",
        ),
        ("x;y", lambda i: f"{i},{i % 7};{i % 2}", r"column 'x' holds numbers written with a decimal comma \('0,0'\)"),
        ("a,,y", lambda i: f"{i % 3},{i % 5},{i % 2}", r"column 2 has no name in the header: name it"),
    ],
)
def test_a_column_read_wrong_is_named_with_its_fix(tmp_path, header, row, message):
    path = table_of(tmp_path, "t.csv", header + "\n" + "".join(row(i) + "\n" for i in range(60)))
    with pytest.raises(ValueError, match=message):
        datalib.load_table(path, "y")


def test_a_saved_index_is_left_out_also_of_a_filtered_frame_and_a_wrong_delimiter_is_named(tmp_path):
    rows = "".join(f"{i * 3},{i % 4},{i % 2}\n" for i in range(40))  # DataFrame.to_csv of a filtered frame
    ds = datalib.load_table(table_of(tmp_path, "f.csv", ",x,y\n" + rows), "y")
    assert list(ds.feature_names) == ["x"] and ds.report.index == 1
    with pytest.raises(ValueError, match=r"the header reads as one column, 'x;y': its fields look separated by ';'"):
        datalib.load_table(table_of(tmp_path, "s.csv", "x;y\n1;0\n2;1\n"), "y", delimiter=",")
    with pytest.raises(ValueError, match=r"the header reads as one column, 'x y': give the file's delimiter"):
        datalib.load_table(table_of(tmp_path, "t.csv", "x y\n1 0\n2 1\n"), "y")  # spaces: none it knows


def test_train_through_a_closed_pipe_trains_on_and_saves_its_model(tmp_path):
    import subprocess
    import sys

    command = (
        f"{sys.executable} -m jaxnet.app train --dataset moons --epochs 30 --out {tmp_path / 'run'} 2>&1 | head -1"
    )
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=180,
                            env=run_env())  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("task: classification"), result
    assert (tmp_path / "run" / "model.npz").is_file()


def run_env():
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_predict_and_evaluate_read_a_csv_with_the_training_runs_delimiter_or_their_own(tmp_path):
    rows = "".join(f"{i % 7};{(i * 3) % 5};{i % 2}\n" for i in range(60))
    table_of(tmp_path, "semi.csv", "width, cm;height, cm;y\n" + rows)  # commas in the names: sniffed as one
    trained = run_cli("train", "--data", tmp_path / "semi.csv", "--target", "y", "--delimiter", ";", "--epochs",
                      "2", "--out", tmp_path / "run")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    predicted = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "semi.csv")  # the run's ';'
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.splitlines()[0] == "prediction" and len(predicted.stdout.splitlines()) == 61
    evaluated = run_cli("evaluate", "--model", tmp_path / "run", "--data", tmp_path / "semi.csv", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads(evaluated.stdout)
    assert set(figures) == {"loss", "accuracy"} and 0 <= figures["accuracy"] <= 1, figures
    table_of(tmp_path, "tabs.csv", "width, cm\theight, cm\ty\n" + rows.replace(";", "\t"))
    tabs = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "tabs.csv", "--delimiter", "\t")
    assert tabs.returncode == 0 and tabs.stdout == predicted.stdout, tabs.stderr
    table_of(tmp_path, "commas.csv", '"width, cm","height, cm",y\n' + rows.replace(";", ","))  # no ';' in it
    commas = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "commas.csv")  # sniffed
    assert commas.returncode == 0 and commas.stdout == predicted.stdout, commas.stderr
    for extra, message in [
        (["--delimiter", ";;"], "jaxnet: error: --delimiter is one character, such as ';' or a tab, got ';;'"),
        (
            ["--delimiter", ","],
            "row 1 has 1 fields, expected 3 as in the header: '0;0;0': its fields look "
            "separated by ';', give --delimiter ';'",
        ),  # the file's delimiter is not ','
    ]:
        refused = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "semi.csv", *extra)
        assert refused.returncode in (1, 2) and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == "", refused.stderr
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 2), np.float32))
    npz = run_cli("predict", "--model", tmp_path / "run", "--data", tmp_path / "x.npz", "--delimiter", ";")
    assert npz.returncode == 2 and "--delimiter separates a CSV's fields; x.npz is not a CSV" in npz.stderr
    for data, extra, message in [  # train: options that would be ignored are refused
        (["--dataset", "digits"], ["--delimiter", ";"], "--delimiter separates a CSV file's fields (a data file .csv)"),
        (["--dataset", "digits"], ["--ignore", "id"], "--ignore is for CSV and Parquet tables"),
        (["--data", tmp_path / "semi.csv", "--target", "y"], ["--embedding-dim", "3"],
         "--embedding-dim sizes the vectors of --encoding embedding: give --encoding embedding, or drop"),
    ]:  # fmt: skip
        refused = run_cli("train", *data, *extra, "--epochs", "1", "--out", tmp_path / "refused")
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()
