import sys

import numpy as np
import pytest

from jaxnet.app import data

# ----------------------------------------------------------------------------- built-ins

EXPECTED = {
    # name: (x shape, y shape, task, num_classes)
    "seed": ((1, 3), (1, 2), "regression", None),
    "xor": ((4, 2), (4,), "classification", 2),
    "moons": ((1000, 2), (1000,), "classification", 2),
    "spirals": ((1000, 2), (1000,), "classification", 2),
    "digits": ((1797, 64), (1797,), "classification", 10),
}


@pytest.mark.parametrize("name", data.BUILTINS)
def test_builtin_shapes_dtypes_task(name):
    ds = data.load_builtin(name)
    x_shape, y_shape, task, num_classes = EXPECTED[name]
    assert ds.x.shape == x_shape and ds.x.dtype == np.float32
    assert ds.y.shape == y_shape
    assert ds.y.dtype == (np.float32 if task == "regression" else np.int32)
    assert (ds.task, ds.num_classes, ds.name) == (task, num_classes, name)
    assert len(ds.feature_names) == x_shape[1]
    assert np.all(np.isfinite(ds.x))
    if task == "classification":
        data.check_labels(ds.y, num_classes)
        assert set(np.unique(ds.y)) == set(range(num_classes))


def test_seed_is_the_worked_example():
    ds = data.load_builtin("seed")
    np.testing.assert_array_equal(ds.x, np.array([[0.5, 0.5, 0.1]], np.float32))
    np.testing.assert_array_equal(ds.y, np.array([[0.9, 0.1]], np.float32))


def test_xor_points_and_noisy_variant():
    ds = data.load_builtin("xor")
    labels = {tuple(p): int(t) for p, t in zip(ds.x.tolist(), ds.y)}
    assert labels == {(0.0, 0.0): 0, (0.0, 1.0): 1, (1.0, 0.0): 1, (1.0, 1.0): 0}
    noisy = data.load_builtin("xor", seed=3, num_examples=400)
    assert noisy.x.shape == (400, 2) and np.bincount(noisy.y).tolist() == [200, 200]
    # Each noisy point stays near a corner whose XOR is its label (noise std 0.1).
    corner = np.round(noisy.x).astype(int)
    assert np.mean((corner[:, 0] ^ corner[:, 1]) == noisy.y) > 0.99


@pytest.mark.parametrize("name", ["xor", "moons", "spirals"])
def test_generated_are_deterministic(name):
    a = data.load_builtin(name, seed=7, num_examples=100)
    b = data.load_builtin(name, seed=7, num_examples=100)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    c = data.load_builtin(name, seed=8, num_examples=100)
    assert not np.array_equal(a.x, c.x)


def test_moons_and_spirals_sizes_and_balance():
    for name in ("moons", "spirals"):
        ds = data.load_builtin(name, seed=1, num_examples=101)
        assert ds.x.shape == (101, 2)
        assert sorted(np.bincount(ds.y).tolist()) == [50, 51]


def test_moons_classes_are_the_two_half_circles():
    ds = data.load_builtin("moons", seed=0)
    # Class 0 is the upper arc around (0, 0), class 1 the lower arc around (1, 0.5), both radius 1;
    # with noise std 0.1 nearly all points lie within 0.3 of their own arc.
    centres = np.where((ds.y == 0)[:, None], [0.0, 0.0], [1.0, 0.5])
    radius = np.linalg.norm(ds.x - centres, axis=1)
    assert np.mean(np.abs(radius - 1.0) < 0.3) > 0.99


def test_digits_is_sklearn_digits():
    from sklearn.datasets import load_digits

    ds = data.load_builtin("digits")
    reference = load_digits()
    np.testing.assert_array_equal(ds.x, reference.data)
    np.testing.assert_array_equal(ds.y, reference.target)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    assert ds.x.shape == (1797, 64) and ds.num_classes == 10
    assert ds.x.min() == 0.0 and ds.x.max() == 16.0
    assert data.load_builtin("digits", num_examples=100).x.shape == (100, 64)


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxnet-trainer\[datasets\]'") as info:
        data.load_builtin("digits")
    assert isinstance(info.value, ValueError)  # the CLI reports it as a one-line error


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="mnist"), "unknown dataset 'mnist': use one of seed, xor, moons, spirals, digits"),
        (dict(name="moons", num_examples=1), "num_examples must be an integer >= 2"),
        (dict(name="moons", num_examples=2.5), "num_examples must be an integer"),
        (dict(name="moons", seed=-1), "seed must be an integer >= 0"),
        (dict(name="seed", num_examples=3), "exactly 1 example"),
        (dict(name="digits", num_examples=5000), "1797 examples"),
    ],
)
def test_builtin_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_builtin(**kwargs)


# ----------------------------------------------------------------------------- CSV


def write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_classification(tmp_path):
    path = write(tmp_path, 'a,label,b\n1.5,0,2\n-3,2.0,4e1\n\n 0 , 1 ,"7"\n')
    ds = data.load_csv(path, "label")
    np.testing.assert_array_equal(ds.x, np.array([[1.5, 2], [-3, 40], [0, 7]], np.float32))
    np.testing.assert_array_equal(ds.y, np.array([0, 2, 1], np.int32))
    assert (ds.task, ds.num_classes, ds.feature_names, ds.name) == (
        "classification",
        3,
        ("a", "b"),
        "data.csv",
    )
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32


def test_csv_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfa,y\r\n1,0\r\n2,1\r\n")
    ds = data.load_csv(path, "y")
    assert ds.feature_names == ("a",) and ds.y.tolist() == [0, 1]


def test_csv_regression_inferred_and_forced(tmp_path):
    path = write(tmp_path, "x,y\n1,0.5\n2,1.5\n")
    ds = data.load_csv(path, "y")
    assert ds.task == "regression" and ds.num_classes is None
    np.testing.assert_array_equal(ds.y, np.array([[0.5], [1.5]], np.float32))
    forced = data.load_csv(write(tmp_path, "x,y\n1,0\n2,3\n", "ints.csv"), "y", task="regression")
    assert forced.task == "regression" and forced.y.dtype == np.float32 and forced.y.shape == (2, 1)
    # Integer-valued targets with large values (years, prices) are taken as regression.
    years = data.load_csv(write(tmp_path, "x,year\n1,1999\n2,2020\n", "years.csv"), "year")
    assert years.task == "regression"


def test_csv_forced_classification_rejects_non_integer(tmp_path):
    path = write(tmp_path, "x,y\n1,0\n2,0.5\n")
    with pytest.raises(ValueError, match=r"data.csv row 2, column 'y': target 0.5 is not an integer"):
        data.load_csv(path, "y", task="classification")


def test_csv_negative_labels_out_of_range(tmp_path):
    path = write(tmp_path, "x,y\n1,1\n2,-1\n")
    with pytest.raises(ValueError, match=r"labels out of range: data.csv row 2, column 'y'.*-1"):
        data.load_csv(path, "y")


@pytest.mark.parametrize(
    "text, match",
    [
        ("a,b,y\n1,2,0\n3,abc,1\n", r"data.csv: row 2, column 'b': 'abc' is not a number, but the column's other"),
        ("a,b,y\n1,2,0\n\n3,4\n", r"data.csv: row 3 has 2 fields, expected 3 as in the header: '3,4'"),
        ("a,b,y\n1,2,0\n3,4,1,5\n", r"data.csv: row 2 has 4 fields, expected 3 as in the header"),
        ("a,b,y\n1,nan,0\n", r"data.csv: column 'b' is empty in every row; drop it"),
        ("a,b,y\n1,2,0\n-inf,2,1\n", r"data.csv: row 2, column 'a': -inf is not a finite number within float32"),
        ("a,b,y\n1,2,0\n1e39,2,1\n", r"data.csv: row 2, column 'a': 1e\+39 is not a finite number"),
        ("a,b,y\n1,2,\n3,4,0\n5,inf,1\n", r"data.csv: row 3, column 'b': inf"),  # the file's row, not the kept rows'
        ("a,b,y\n1,2,inf\n", r"data.csv: row 1, column 'y': inf is not a finite number"),
        ("a,b,label\n1,2,0\n", r"data.csv lacks the target column 'y' \(it has a, b, label\)"),
        ("a,y\n1_000,1\n2,0\n3,1\n", r"row 1, column 'a': '1_000' is not a number"),
        ("a,y\n0x10,1\n2,0\n", r"column 'a': '0x10' is not a number \(numbers are written like 1000"),
        ("a,y\n\u0661\u0662,1\n2,0\n3,1\n", r"row 1, column 'a': '\u0661\u0662' is not a number"),
        ("a,y\n12:30:00,1\n13:00:00,0\n", r"column 'a' holds time32\[s\] values: convert them"),
        (
            "a,y\n" + "".join(f"{i % 12 + 1:02d}/{i // 12 + 1:02d}/2012,{i % 2}\n" for i in range(60)),
            r"column 'a' holds dates written as '01/01/2012', a form that is not read as dates",
        ),
        ("y\n0\n1\n", r"no feature columns besides the target 'y'"),
        ("a,b,y\n", r"empty dataset: data.csv has a header but no data rows"),
        ("", r"empty dataset: data.csv is empty"),
        ("\n\n", r"empty dataset: data.csv is empty"),
        ("a,a,y\n1,2,0\n", r"duplicate column names in the header: 'a'"),
    ],
)
def test_csv_bad_input(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=match):
        data.load_csv(path, "y")


def test_csv_missing_and_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope.csv"):
        data.load_csv(tmp_path / "nope.csv", "y")
    with pytest.raises(OSError, match=r"cannot read data file .*: Is a directory"):
        data.load_csv(tmp_path, "y")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81\x82")
    with pytest.raises(ValueError, match=r"binary.csv is not a UTF-8 text CSV file \(save it as CSV, UTF-8\)"):
        data.load_csv(binary, "y")


# ----------------------------------------------------------------------------- npz


def test_npz_happy_path(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2, 1]), extra=np.zeros(2))
    ds = data.load_npz(path)
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    assert (ds.task, ds.num_classes, ds.feature_names, ds.name) == (
        "classification",
        3,
        ("x0", "x1", "x2"),
        "d.npz",
    )


def test_npz_regression_and_one_dimensional_x(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, x=np.array([1.0, 2.0, 3.0]), y=np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0]]))
    ds = data.load_npz(path)
    assert ds.x.shape == (3, 1) and ds.y.shape == (3, 2) and ds.y.dtype == np.float32
    assert ds.task == "regression" and ds.num_classes is None
    # Integer-valued float labels are class labels unless regression is asked for.
    np.savez(path, x=np.ones((2, 2)), y=np.array([1.0, 0.0]))
    assert data.load_npz(path).task == "classification"
    assert data.load_npz(path, task="regression").y.shape == (2, 1)


def test_npz_refuses_pickled_objects(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([[1.0], [2.0]]), y=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match=r"obj.npz: array 'y' holds Python objects.*refused"):
        data.load_npz(path)


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x=np.ones((2, 2))), r"lacks array\(s\) 'y'; arrays present: x"),
        (dict(features=np.ones((2, 2)), labels=np.ones(2)), r"lacks array\(s\) 'x', 'y'; arrays present"),
        (dict(x=np.ones((3, 2)), y=np.ones(2)), "x has 3 examples but y has 2"),
        (dict(x=np.ones((0, 2)), y=np.ones(0)), "empty dataset"),
        (dict(x=np.ones((2, 2, 2)), y=np.ones(2)), r"x must be 2-D .* got shape \(2, 2, 2\)"),
        (dict(x=np.array([[1.0, np.nan]]), y=np.ones(1)), r"x\[0, 1\] is .*nan"),
        (dict(x=np.ones((2, 1)), y=np.array([0.0, np.inf])), r"y\[1\] is .*inf"),
        (dict(x=np.array([["a"], ["b"]]), y=np.ones(2)), "x must be a numeric array"),
        (dict(x=np.ones((2, 1)), y=np.array([0, -2])), r"labels out of range: d.npz: y\[1\]"),
        (dict(x=np.ones((2, 0)), y=np.ones(2)), "no feature columns"),
    ],
)
def test_npz_bad_input(tmp_path, arrays, match):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        data.load_npz(path)


def test_npz_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.load_npz(tmp_path / "missing.npz")
    text = tmp_path / "text.npz"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="text.npz is not a readable .npz archive"):
        data.load_npz(text)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match="not a readable .npz archive .it holds a single .npy array"):
        data.load_npz(single)


def test_from_arrays_forced_classification_needs_one_column():
    with pytest.raises(ValueError, match="single column of class labels"):
        data.from_arrays(np.ones((2, 2)), np.ones((2, 2)), task="classification")


# ----------------------------------------------------------------------------- load


def test_load_dispatch(tmp_path):
    assert data.load_data().name == "digits"
    assert data.load_data(dataset="moons", seed=2).x.shape == (1000, 2)
    csv_path = write(tmp_path, "a,y\n1,0\n2,1\n")
    assert data.load_data(data=str(csv_path), target="y").num_classes == 2
    npz_path = tmp_path / "d.npz"
    np.savez(npz_path, x=np.ones((2, 1)), y=np.array([0.5, 1.5]))
    assert data.load_data(data=npz_path).task == "regression"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dataset="xor", data="d.csv"), "not both"),
        (dict(dataset="xor", target="y"), "applies only to a CSV"),
        (dict(data="d.csv"), "needs the name of its target column"),
        (dict(data="d.npz", target="y"), "applies only to CSV"),
        (dict(data="d.parquet"), "a Parquet file needs the name of its target column"),
        (dict(data="d.feather"), "unsupported data file 'd.feather': use a .csv, .npz or .parquet file"),
        (dict(dataset="xor", task="regression"), "'xor' is a classification dataset"),
        (dict(dataset="xor", task="ranking"), "unknown task 'ranking'"),
    ],
)
def test_load_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_data(**kwargs)


# ----------------------------------------------------------------------------- check_labels


def test_check_labels():
    data.check_labels(np.array([0, 9, 3]), 10)
    data.check_labels(np.array([[0.0], [2.0]]), 3)
    with pytest.raises(ValueError, match=r"labels out of range for 10 classes: found 10 at example 2"):
        data.check_labels(np.array([0, 9, 10]), 10)
    with pytest.raises(ValueError, match=r"labels out of range for 3 classes: found -1 at example 0"):
        data.check_labels(np.array([-1, 0]), 3)
    with pytest.raises(ValueError, match="integer class indices: found 0.5"):
        data.check_labels(np.array([0.0, 0.5]), 3)
    with pytest.raises(ValueError, match="1-D array"):
        data.check_labels(np.zeros((2, 2)), 3)


# ----------------------------------------------------------------------------- split


def ids_dataset(n):
    """A dataset whose single feature is the example's index, to track examples through splits."""
    return data.from_arrays(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 2, name="ids")


def ids(ds):
    return ds.x[:, 0].astype(int)


def test_split_sizes_disjoint_and_complete():
    splits = data.split(ids_dataset(100), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(splits.train.x), len(splits.val.x), len(splits.test.x)) == (70, 10, 20)
    parts = [set(ids(p)) for p in splits]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(100))
    # Labels travel with their examples.
    for part in splits:
        np.testing.assert_array_equal(part.y, ids(part) % 2)
        assert part.task == "classification" and part.num_classes == 2


def test_split_is_deterministic_and_seed_dependent():
    ds = ids_dataset(200)
    a = data.split(ds, 0.1, 0.2, seed=5)
    b = data.split(ds, 0.1, 0.2, seed=5)
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.x, pb.x)
    c = data.split(ds, 0.1, 0.2, seed=6)
    assert set(ids(a.test)) != set(ids(c.test))
    # The test split does not depend on the validation fraction.
    d = data.split(ds, 0.3, 0.2, seed=5)
    np.testing.assert_array_equal(ids(a.test), ids(d.test))


def test_split_small_and_empty_parts():
    tiny = data.split(ids_dataset(3), 0.01, 0.01, seed=0)
    assert (len(tiny.train.x), len(tiny.val.x), len(tiny.test.x)) == (1, 1, 1)
    none = data.split(ids_dataset(10), 0.0, 0.0, seed=0)
    assert none.val is None and none.test is None and len(none.train.x) == 10
    only_test = data.split(ids_dataset(10), 0.0, 0.25, seed=0)
    assert only_test.val is None and len(only_test.test.x) == 3  # 2.5 rounds half up


@pytest.mark.parametrize(
    "val, test, n, match",
    [
        (-0.1, 0.2, 10, r"validation fraction must be in \[0, 1\)"),
        (0.1, 1.0, 10, r"test fraction must be in \[0, 1\)"),
        (0.5, 0.5, 10, "sum to less than 1"),
        (float("nan"), 0.2, 10, r"validation fraction must be in \[0, 1\)"),
        ("0.1", 0.2, 10, "must be a number"),
        (0.1, 0.1, 2, "too few"),
    ],
)
def test_split_bad_fractions(val, test, n, match):
    with pytest.raises(ValueError, match=match):
        data.split(ids_dataset(n), val, test, seed=0)


# ----------------------------------------------------------------------------- standardization


def test_standardizer_fit_on_train_split():
    rng = np.random.default_rng(0)
    x = rng.normal([3.0, -50.0, 0.0], [2.0, 10.0, 1e-3], size=(500, 3)).astype(np.float32)
    ds = data.from_arrays(x, np.zeros(500, np.int32))
    splits, s = data.standardize_splits(data.split(ds, 0.1, 0.2, seed=0))
    train = data.split(ds, 0.1, 0.2, seed=0).train.x
    # The transform comes from the training split alone (float32 data: tolerances of ~1e-5).
    np.testing.assert_allclose(s.mean, train.astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(splits.train.x.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(splits.train.x.std(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(splits.test.x, data.standardize(data.split(ds, 0.1, 0.2, 0).test.x, s))
    assert s.mean.dtype == s.std.dtype == splits.val.x.dtype == np.float32
    # Held-out parts are close to, but not exactly, standardized.
    assert np.abs(splits.test.x.mean(0)).max() > 1e-4


def test_standardizer_constant_column_is_safe():
    x = np.array([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]], np.float32)
    s = data.fit_standardizer(x)
    np.testing.assert_allclose(s.mean, [3.0, 7.0])
    np.testing.assert_allclose(s.std, [np.sqrt(8 / 3), 1.0], rtol=1e-6)
    z = data.standardize(x, s)
    assert np.all(np.isfinite(z))
    np.testing.assert_array_equal(z[:, 1], 0.0)


def test_standardize_feature_count_mismatch():
    s = data.fit_standardizer(np.ones((4, 64)))
    with pytest.raises(ValueError, match="feature count mismatch: the data has 3 features, expected 64"):
        data.standardize(np.ones((2, 3)), s)
