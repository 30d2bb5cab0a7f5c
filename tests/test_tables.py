"""Tables as they come: categories, booleans, gaps, class names, columns by name, several targets."""

import csv
import json

import numpy as np
import pytest
from csvfiles import write_csv as write

from jaxnet.app import cli, files, tables
from jaxnet.app import data as datalib
from jaxnet.app import saved as savedlib

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def cells(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def read_csv_out(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


# ----------------------------------------------------------------------------- encoding, by hand


MIXED = [
    ["size", "weight", "fresh", "colour", "kind"],
    [["small", "1.5", "true", "3", "apple"], ["large", "", "false", "1", "pear"], ["", "2.5", "", "3", "apple"]],
]


def test_fit_and_encode_match_a_plain_python_loop(tmp_path):
    path = write(tmp_path / "t.csv", *MIXED)
    table = tables.read_table(path)
    encoder = tables.fit_encoder(
        table, ["size", "weight", "fresh", "colour"], categorical=["colour"], rows=np.array([0, 1])
    )
    kinds = [c.kind for c in encoder.columns]
    assert kinds == ["categorical", "numeric", "boolean", "categorical"]
    size, weight, fresh, colour = encoder.columns
    assert size.categories == ("large", "small") and not size.indicator  # fitted on rows 0 and 1: no gap there
    assert weight.fill == 1.5 and weight.indicator  # the mean of the training rows' values
    assert fresh.fill == 0.5 and not fresh.indicator
    assert colour.categories == ("1", "3")
    x = tables.encode(tables.raw_matrix(table, encoder), encoder)
    expected = []
    for size_v, weight_v, fresh_v, colour_v, _ in MIXED[1]:
        row = [float(size_v == "large"), float(size_v == "small")]
        row += [float(weight_v) if weight_v else 1.5, float(not weight_v)]
        row += [{"true": 1.0, "false": 0.0}.get(fresh_v, 0.5)]
        row += [float(colour_v == "1"), float(colour_v == "3")]
        expected.append(row)
    np.testing.assert_array_equal(x, np.asarray(expected, np.float32))
    assert encoder.feature_names == (
        "size=large", "size=small", "weight", "weight (missing)", "fresh", "colour=1", "colour=3",
    )  # fmt: skip
    assert encoder.scaled.tolist() == [False, False, True, False, False, False, False]


def test_a_parquet_file_reads_as_the_csv_of_the_same_cells(tmp_path):
    """A text cell a CSV reads as a gap ("", "NA", ...) is a gap in Parquet too, not a category."""
    header, rows = MIXED[0], [*MIXED[1], ["NA", "3", "true", "1", "pear"]]
    path = write(tmp_path / "t.csv", header, rows)
    text = {name: pa.array([r[j] for r in rows]) for j, name in enumerate(header)}
    pq.write_table(pa.table(text), tmp_path / "t.parquet")
    features = ["size", "colour"]
    csv_encoder = tables.fit_encoder(tables.read_table(path), features, categorical=["colour"], rows=np.arange(4))
    table = tables.read_table(tmp_path / "t.parquet")
    encoder = tables.fit_encoder(table, features, categorical=["colour"], rows=np.arange(4))
    assert encoder == csv_encoder and encoder.columns[0].categories == ("large", "small")
    streamed = next(tables.batches(tmp_path / "t.parquet", features, None, 100))
    assert streamed.column("size").null_count == 2  # predict's reader alike


def test_unseen_categories_and_embedding_codes(tmp_path):
    table = tables.read_table(write(tmp_path / "t.csv", ["c", "y"], [["a", 1], ["b", 0], ["", 1], ["zebra", 0]]))
    onehot = tables.fit_encoder(table, ["c"], rows=np.array([0, 1, 2]))
    raw = tables.raw_matrix(table, onehot)
    assert raw[:, 0].tolist()[:2] == [0.0, 1.0] and np.isnan(raw[2, 0]) and raw[3, 0] == -1.0
    np.testing.assert_array_equal(tables.encode(raw, onehot), [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    embed = tables.fit_encoder(table, ["c"], encoding="embedding", rows=np.array([0, 1, 2]))
    assert tables.encode(raw, embed)[:, 0].tolist() == [0.0, 1.0, 2.0, 2.0]  # a gap or unseen: row V
    assert embed.embedded == [(0, 3)]
    assert tables.Encoder.from_json(json.loads(json.dumps(embed.to_json()))) == embed


def test_encode_is_the_same_in_jax(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    table = tables.read_table(write(tmp_path / "t.csv", *MIXED))
    encoder = tables.fit_encoder(table, ["size", "weight", "fresh", "colour"])
    raw = tables.raw_matrix(table, encoder)
    np.testing.assert_array_equal(
        np.asarray(tables.encode(jnp.asarray(raw, jnp.float32), encoder, jnp)), tables.encode(raw, encoder)
    )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[f"id{i}", 0] for i in range(60)], r"column 'c' has 60 distinct values in 60 training rows: an identifier"),
        ([["", 0], ["", 1]], r"column 'c' is empty in every row; drop it"),
        ([["1", 0], ["2", 1], ["3,5", 0]], r"row 3, column 'c': '3,5' is not a number, but the column's other"),
    ],
)
def test_columns_that_are_not_features_are_refused(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        datalib.load_csv(write(tmp_path / "t.csv", ["c", "y"], rows), "y")


def test_integer_columns_stay_numbers_unless_named(tmp_path):
    path = write(tmp_path / "t.csv", ["rooms", "y"], [[1, 0], [3, 1], [2, 0]])
    assert datalib.load_csv(path, "y").feature_names == ("rooms",)
    named = datalib.load_csv(path, "y", categorical=("rooms",))
    assert named.feature_names == ("rooms=1", "rooms=2", "rooms=3")
    with pytest.raises(ValueError, match=r"lacks the categorical columns 'room'"):
        datalib.load_csv(path, "y", categorical=("room",))


# ----------------------------------------------------------------------------- through the CLI


def damaged_breast_cancer(path, damaged: bool, seed: int = 0):
    """scikit-learn's breast cancer table; ``damaged``: one column binned into named sizes, one a
    boolean, 5% of the feature cells blank, the labels as names."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    rng = np.random.default_rng(seed)
    names = [n.replace(" ", "_") for n in d.feature_names]
    if not damaged:
        rows = [[f"{v:.6g}" for v in row] + [int(t)] for row, t in zip(d.data, d.target)]
        return write(path, [*names, "diagnosis"], rows)
    edges = np.quantile(d.data[:, 0], [0.25, 0.5, 0.75])
    median = np.median(d.data[:, 5])
    rows = []
    for row, t in zip(d.data, d.target):
        cells = [("small", "medium", "large", "huge")[int(np.digitize(row[0], edges))]]
        cells += [f"{v:.6g}" for v in row[1:5]] + [str(row[5] > median).lower()] + [f"{v:.6g}" for v in row[6:]]
        cells = ["" if rng.random() < 0.05 else c for c in cells]
        rows.append([*cells, ("malignant", "benign")[t]])
    return write(path, ["size", *names[1:5], "smooth", *names[6:], "diagnosis"], rows)


def train(capsys, path, out, *flags):
    assert cli.main(["train", "--data", str(path), "--out", str(out), "--json", "--quiet", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_a_damaged_table_trains_predicts_names_and_matches_the_clean_one(tmp_path, capsys):
    clean = damaged_breast_cancer(tmp_path / "clean.csv", damaged=False)
    damaged = damaged_breast_cancer(tmp_path / "damaged.csv", damaged=True)
    gaps = sum(cell == "" for row in cells(damaged) for cell in row)
    assert gaps > 0.04 * 569 * 30
    accuracy = {"clean": [], "damaged": []}
    for seed in (0, 1):
        for name, path in (("clean", clean), ("damaged", damaged)):
            summary = train(capsys, path, tmp_path / f"{name}{seed}", "--target", "diagnosis", "--seed", str(seed))
            accuracy[name].append(summary["test_accuracy"])
    assert np.mean(accuracy["damaged"]) >= np.mean(accuracy["clean"]) - 0.02, accuracy
    assert min(accuracy["damaged"]) > 0.9
    model = files.load_model(tmp_path / "damaged0")
    assert model.meta["classes"] == ["benign", "malignant"]
    assert cli.main(["predict", "--model", str(tmp_path / "damaged0"), "--data", str(damaged), "--probabilities"]) == 0
    rows = read_csv_out(capsys.readouterr().out)
    assert list(rows[0]) == ["prediction", "prob_benign", "prob_malignant"]
    truth = [r[-1] for r in cells(damaged)[1:]]
    assert np.mean([r["prediction"] == t for r, t in zip(rows, truth)]) > 0.9
    for r in rows:
        probs = [float(r["prob_benign"]), float(r["prob_malignant"])]
        assert r["prediction"] == ("benign", "malignant")[int(np.argmax(probs))]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    # the preprocessing was fitted on the training split only
    train_rows = datalib.split_indices(569, 0.1, 0.2, 0).train
    texture = np.array([float(r[1]) if r[1] else np.nan for r in cells(damaged)[1:]])[train_rows]
    fill = {c["name"]: c["fill"] for c in model.meta["columns"]["columns"]}["mean_texture"]
    assert fill == pytest.approx(np.nanmean(texture), rel=1e-12)


@pytest.fixture(scope="module")
def fruit_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fruit")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(300):
        kind = rng.choice(["apple", "pear", "plum"])
        weight = {"apple": 150, "pear": 180, "plum": 40}[kind] + rng.normal(0, 10)
        colour = {"apple": "red", "pear": "green", "plum": "purple"}[kind] if rng.random() > 0.2 else "brown"
        rows.append([f"{weight:.2f}" if rng.random() > 0.05 else "", colour, str(rng.random() > 0.5).lower(), kind])
    path = write(d / "fruit.csv", ["weight", "colour", "ripe", "kind"], rows)
    out = d / "run"
    flags = ["--data", str(path), "--target", "kind", "--epochs", "40", "--out", str(out), "--quiet"]
    assert cli.main(["train", *flags]) == 0
    return d, path, out, rows


def predictions(capsys, out, path, *flags):
    assert cli.main(["predict", "--model", str(out), "--data", str(path), *flags]) == 0
    return read_csv_out(capsys.readouterr().out)


def test_predict_finds_columns_by_name_in_any_order(fruit_run, capsys):
    d, path, out, rows = fruit_run
    base = predictions(capsys, out, path, "--probabilities")
    assert {r["prediction"] for r in base} <= {"apple", "pear", "plum"}
    shuffled = write(d / "shuffled.csv", ["note", "ripe", "colour", "weight"], [["x", r[2], r[1], r[0]] for r in rows])
    assert predictions(capsys, out, shuffled, "--probabilities") == base
    table = pa.table({"colour": [r[1] for r in rows], "weight": [float(r[0]) if r[0] else None for r in rows],
                      "ripe": [r[2] == "true" for r in rows]})  # fmt: skip
    pq.write_table(table, d / "fruit.parquet")
    parquet = predictions(capsys, out, d / "fruit.parquet", "--probabilities")
    for a, b in zip(parquet, base):
        assert a["prediction"] == b["prediction"]
        assert float(a["prob_apple"]) == pytest.approx(float(b["prob_apple"]), abs=1e-5)
    write(d / "lacking.csv", ["weight", "ripe"], [r[::2][:2] for r in rows])
    assert cli.main(["predict", "--model", str(out), "--data", str(d / "lacking.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxnet: error: lacking.csv lacks the model's columns 'colour' (it has weight, ripe)"


def test_evaluate_reads_class_names_and_refuses_unknown_ones(fruit_run, capsys):
    d, path, out, rows = fruit_run
    assert cli.main(["evaluate", "--model", str(out), "--data", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.9
    write(d / "odd.csv", ["weight", "colour", "ripe", "kind"], [*rows[:3], ["100", "red", "true", "banana"]])
    assert cli.main(["evaluate", "--model", str(out), "--data", str(d / "odd.csv")]) == 2
    assert "row 4: class 'banana' is not one the model knows (apple, pear, plum)" in capsys.readouterr().err
    header = ["weight", "colour", "ripe", "kind"]
    write(d / "gap.csv", header, [*rows[:3], ["100", "red", "true", ""], *rows[3:6]])  # a row with no target
    write(d / "six.csv", header, rows[:6])
    outputs = []
    for name in ("gap.csv", "six.csv"):
        assert cli.main(["evaluate", "--model", str(out), "--data", str(d / name), "--json"]) == 0
        outputs.append(capsys.readouterr())
    assert "gap.csv: 1 of 7 rows have no target value: left out" in outputs[0].err  # as in training
    assert json.loads(outputs[0].out) == json.loads(outputs[1].out)


def test_export_of_a_table_model_equals_predict(fruit_run, tmp_path, capsys):
    jax = pytest.importorskip("jax")
    pytest.importorskip("flatbuffers")
    d, path, out, rows = fruit_run
    assert cli.main(["export", "--model", str(out), "--out", str(tmp_path / "m.jaxexport")]) == 0
    program = jax.export.deserialize((tmp_path / "m.jaxexport").read_bytes())
    inputs = json.loads((tmp_path / "m.jaxexport.json").read_text())
    encoder = tables.Encoder.from_json(inputs)
    raw = tables.raw_matrix(tables.read_table(path), encoder)
    exported = np.asarray(program.call(raw.astype(np.float32)))
    base = predictions(capsys, out, path, "--probabilities")
    expected = np.array([[float(r[f"prob_{k}"]) for k in inputs["classes"]] for r in base])
    np.testing.assert_allclose(exported, expected, atol=2e-6)


@pytest.mark.slow
def test_embedding_encoding_trains_and_predicts(fruit_run, tmp_path, capsys):
    d, path, out, rows = fruit_run
    flags = ["--target", "kind", "--epochs", "40", "--encoding", "embedding", "--embedding-dim", "3"]
    summary = train(capsys, path, tmp_path / "emb", *flags)
    assert summary["test_accuracy"] > 0.9
    model = files.load_model(tmp_path / "emb")
    assert model.meta["embed"] == {"features": [2], "rows": [5], "dim": 3}  # weight, weight (missing), colour, ripe
    x, _ = savedlib.load_features(model, str(path))
    assert x.shape == (300, 4)
    assert len(predictions(capsys, tmp_path / "emb", path)) == 300


def test_several_targets_are_a_multi_output_regression(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    rows = [[*(f"{v:.5f}" for v in r), f"{r[0] + 2 * r[1]:.5f}", f"{r[2] - r[0]:.5f}"] for r in x]
    path = write(tmp_path / "two.csv", ["a", "b", "c", "sum", "diff"], rows)
    summary = train(capsys, path, tmp_path / "run", "--target", "sum,diff", "--epochs", "60")
    assert summary["task"] == "regression" and summary["test_r2"] > 0.95
    out = predictions(capsys, tmp_path / "run", path)
    assert list(out[0]) == ["prediction_sum", "prediction_diff"]
    assert cli.main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["r2"] > 0.95
