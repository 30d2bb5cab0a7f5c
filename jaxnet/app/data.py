"""Datasets as numpy arrays: built-ins, CSV and ``.npz`` files, splits and standardization.

Everything here is numpy in, numpy out: no models and no device placement. A :class:`Dataset`
holds ``x`` as ``(n, d)`` float32 and ``y`` as ``(n,)`` int32 class labels (classification) or
``(n, k)`` float32 targets (regression).

Task inference (CSV and ``.npz``, when ``task`` is None) decides only when the targets leave no
doubt: values that are not all integers, or integer values of ``MAX_INFERRED_CLASSES`` or more (a
year, a price), are a regression target; a single integer column with few distinct values (at
most ``FEW_CLASSES``, or at most one per ``ROWS_PER_CLASS`` rows) is class labels, with
``num_classes = max + 1`` (negative labels are refused as out of range). Anything else, such as
scikit-learn's diabetes target (214 distinct integers in 442 rows), is ambiguous and refused:
pass ``task`` to decide.

Randomness (generated datasets, splits) comes only from ``np.random.default_rng(seed)``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxnet import _npz as npz
from jaxnet import sources
from jaxnet._checks import ArgumentError, escape
from jaxnet.app import tables

TASKS = ("classification", "regression")
BUILTINS: tuple[str, ...] = ("seed", "xor", "moons", "spirals", "digits")
DEFAULT_DATASET = "digits"
MAX_INFERRED_CLASSES = 1000
"""An integer-valued target is inferred as classification only if its largest value is below this."""
FEW_CLASSES = 20
ROWS_PER_CLASS = 5
"""Integer targets with at most ``max(FEW_CLASSES, rows // ROWS_PER_CLASS)`` distinct values are class labels."""

DATASETS_EXTRA = "pip install 'jaxnet-trainer[datasets]'"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Dataset(NamedTuple):
    """Examples as numpy arrays.

    Attributes:
      x: ``(n, d)`` float32 features.
      y: ``(n,)`` int32 labels in ``[0, num_classes)`` (classification) or ``(n, k)`` float32
        targets (regression).
      task: ``"classification"`` or ``"regression"``.
      num_classes: number of classes, or None for regression.
      feature_names: ``d`` column names.
      name: the built-in's name or the file's name.
      validation: the validation examples a source holds apart (a folder's ``x_val.npy``), or None.
      encoder: for a table (CSV, Parquet), how its columns became ``x`` (:mod:`jaxnet.app.tables`).
      classes: the class names, when the labels were names (text or boolean), else None.
      report: for a table, what reading it did: rows left out, gaps filled, categories unseen.

    ``x`` is a numpy array, or for data larger than memory (a folder of ``.npy`` arrays) rows read
    lazily (:class:`jaxnet.sources.RowView`, a ``np.memmap``): :func:`subset`,
    :func:`fit_standardizer` and :func:`standardize` keep such rows lazy, reading them in chunks.
    """

    x: np.ndarray
    y: np.ndarray
    task: str
    num_classes: int | None
    feature_names: tuple[str, ...]
    name: str
    validation: Dataset | None = None
    encoder: tables.Encoder | None = None
    classes: tuple[str, ...] | None = None
    report: tables.Report | None = None  # a table's: what reading it did (rows left out, gaps filled)


class Splits(NamedTuple):
    """Train, validation and test parts of a dataset; ``val``/``test`` are None when not requested."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None


class Standardizer(NamedTuple):
    """Per-feature affine transform ``(x - mean) / std``; both ``(d,)`` float32."""

    mean: np.ndarray
    std: np.ndarray


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed; the message names the extra to install."""


# ----------------------------------------------------------------------------- checks


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use 'classification', 'regression' or None (infer)")


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(_count("seed", seed, 0))


def _labels_message(num_classes: int, detail: str) -> str:
    return (
        f"labels out of range for {num_classes} classes: {detail}; class labels must be integers 0..{num_classes - 1}"
    )


def check_labels(y, num_classes: int) -> None:
    """Raises ValueError unless ``y`` holds integer class labels in ``[0, num_classes)``.

    Args:
      y: ``(n,)`` (or ``(n, 1)``) labels, integer or integer-valued float.
      num_classes: the number of classes (a model's output size).

    Examples:
      >>> check_labels(np.array([0, 2, 1]), 3)
      >>> check_labels(np.array([0, 3]), 3)
      Traceback (most recent call last):
      ...
      ValueError: labels out of range for 3 classes: found 3 at example 1; class labels must be integers 0..2
    """
    num_classes = _count("num_classes", num_classes, 1)
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.size == 0:
        return
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"labels must be integer class indices: found {y[i].item()!r} at example {i}")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        i = int(bad[0])
        value = int(y[i])
        raise ValueError(_labels_message(num_classes, f"found {value} at example {i}"))


def _targets(
    values: np.ndarray, task: str | None, integral_dtype: bool, where: Callable[[int], str]
) -> tuple[np.ndarray, str, int | None]:
    """Infers or checks the task of finite ``(n, k)`` target values; returns ``(y, task, num_classes)``.

    ``where(i)`` names example ``i`` in error messages (a file line, an array index).
    """
    values = np.asarray(values)
    n, k = values.shape
    as_float = values.astype(np.float64)
    integral = integral_dtype or bool(np.all(as_float == np.round(as_float)))
    if task is None:
        task = _infer_task(as_float, integral)
    if task == "regression":
        return values.astype(np.float32), task, None
    if k != 1:
        raise ValueError(f"classification needs a single column of class labels, got {k} target columns")
    labels = as_float[:, 0]
    if not integral:
        i = int(np.flatnonzero(labels != np.round(labels))[0])
        raise ArgumentError(
            f"{escape(where(i))}: target {labels[i].item()!r} is not an integer class label "
            "(for a numeric target set {0} to 'regression')",
            "task",
        )
    low = int(np.argmin(labels))
    if labels[low] < 0:
        raise ArgumentError(
            f"labels out of range: {escape(where(low))}: class label {int(labels[low])} is negative; class labels "
            "must be integers 0..C-1 (for a numeric target set {0} to 'regression')",
            "task",
        )
    num_classes = int(labels.max()) + 1
    return labels.astype(np.int32), task, num_classes


def _infer_task(values: np.ndarray, integral: bool) -> str:
    """The task of finite ``(n, k)`` targets when unambiguous (see the module docstring)."""
    n, k = values.shape
    if not integral or float(values.max()) >= MAX_INFERRED_CLASSES:
        return "regression"
    distinct = np.unique(values).size if k == 1 else None
    if distinct is not None and distinct <= max(FEW_CLASSES, n // ROWS_PER_CLASS):
        return "classification"
    what = f"{distinct} distinct integer values in {n} rows" if distinct else f"{k} columns of integer values"
    raise ArgumentError(
        f"the target holds {what}: class labels or a numeric target? Set {{0}} to 'classification' or 'regression'",
        "task",
    )


def _finite32(array: np.ndarray) -> np.ndarray:
    """Mask of entries that are finite once cast to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(array.astype(np.float32))


def from_arrays(
    x,
    y,
    task: str | None = None,
    name: str = "arrays",
    feature_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Builds a checked :class:`Dataset` from in-memory arrays, inferring the task like CSV files.

    Args:
      x: ``(n, d)`` numeric features; a 1-D ``(n,)`` array is taken as one feature ``(n, 1)``.
      y: ``(n,)`` or ``(n, k)`` numeric targets.
      task: ``"classification"``, ``"regression"`` or None to infer (see the module docstring).
      name: the dataset's name, used in messages.
      feature_names: ``d`` names; default ``x0, x1, ...``.

    Returns:
      A Dataset with float32 ``x`` and int32 labels or float32 targets.
    """
    _check_task(task)
    x, y = np.asarray(x), np.asarray(y)
    for label, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{name}: {label} must be a numeric array, got dtype {array.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be 2-D (examples, features), got shape {x.shape}; reshape it")
    if y.ndim not in (1, 2):
        raise ValueError(f"{name}: y must be 1-D or 2-D (examples[, outputs]), got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"empty dataset: {name} has no examples")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: x has no feature columns; at least one is needed")
    if y.ndim == 2 and y.shape[1] == 0:
        raise ValueError(f"{name}: y has no target columns")
    for label, array in (("x", x), ("y", y)):
        bad = np.argwhere(~_finite32(array))
        if bad.size:
            index = ", ".join(str(int(i)) for i in bad[0])
            raise ValueError(
                f"{name}: {label}[{index}] is {array[tuple(bad[0])].item()!r}: NaN, inf and values beyond "
                "float32 range are not allowed"
            )
    if feature_names is None:
        feature_names = tuple(f"x{j}" for j in range(x.shape[1]))
    feature_names = tuple(str(f) for f in feature_names)
    if len(feature_names) != x.shape[1]:
        raise ValueError(f"{name}: {len(feature_names)} feature names for {x.shape[1]} features")
    y2 = y if y.ndim == 2 else y[:, None]
    labels, task, num_classes = _targets(y2, task, y.dtype.kind in "biu", lambda i: f"{name}: y[{i}]")
    return Dataset(x.astype(np.float32), labels, task, num_classes, feature_names, name)


# ----------------------------------------------------------------------------- built-ins


def _seed_sample() -> Dataset:
    x = np.array([[0.5, 0.5, 0.1]], np.float32)
    y = np.array([[0.9, 0.1]], np.float32)
    return Dataset(x, y, "regression", None, ("x0", "x1", "x2"), "seed")


def _xor(rng: np.random.Generator, num_examples: int | None, noise: float = 0.1) -> Dataset:
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    if num_examples is None:
        x, y = corners, labels
    else:
        which = rng.permutation(np.arange(num_examples) % 4)
        x = corners[which] + noise * rng.standard_normal((num_examples, 2))
        y = labels[which]
    return Dataset(x.astype(np.float32), y, "classification", 2, ("x0", "x1"), "xor")


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes).astype(np.int32)


def _moons(rng: np.random.Generator, n: int, noise: float = 0.1) -> Dataset:
    y = _balanced_labels(rng, n, 2)
    angle = rng.uniform(0.0, np.pi, n)
    # Class 0: upper half circle centred at (0, 0); class 1: lower one centred at (1, 0.5).
    x = np.where(
        (y == 0)[:, None],
        np.stack([np.cos(angle), np.sin(angle)], axis=1),
        np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1),
    )
    x = x + noise * rng.standard_normal((n, 2))
    return Dataset(x.astype(np.float32), y, "classification", 2, ("x0", "x1"), "moons")


def _spirals(rng: np.random.Generator, n: int, noise: float = 0.05, turns: float = 1.25) -> Dataset:
    y = _balanced_labels(rng, n, 2)
    t = rng.uniform(0.05, 1.0, n)  # radius; the arm's angle grows with it
    angle = 2.0 * np.pi * turns * t + np.pi * y
    x = t[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = x + noise * rng.standard_normal((n, 2))
    return Dataset(x.astype(np.float32), y, "classification", 2, ("x0", "x1"), "spirals")


def _digits(num_examples: int | None) -> Dataset:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the digits dataset needs scikit-learn, which is not installed: {DATASETS_EXTRA}")
    # The file behind sklearn.datasets.load_digits, read directly: importing scikit-learn takes
    # seconds, reading this file milliseconds (tests/test_data.py checks both agree).
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1].astype(np.int32)
    else:  # another scikit-learn layout
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int32)
    if num_examples is not None:
        if num_examples > x.shape[0]:
            raise ValueError(f"digits has {x.shape[0]} examples; num_examples={num_examples} is too many")
        x, y = x[:num_examples], y[:num_examples]
    names = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    return Dataset(x, y, "classification", 10, names, "digits")


def load_builtin(name: str, seed: int = 0, num_examples: int | None = None) -> Dataset:
    """Loads or generates a built-in dataset.

    - ``seed``: the worked example's single sample, ``x = [[0.5, 0.5, 0.1]]``, ``y = [[0.9, 0.1]]``
      (regression; ``num_examples`` must be None or 1).
    - ``xor``: the 4 XOR points, 2 classes. With ``num_examples``, that many points drawn evenly
      from the 4 corners with Gaussian noise (std 0.1).
    - ``moons``: two interleaved half circles, noise std 0.1; 1000 examples by default.
    - ``spirals``: two interleaved spiral arms (1.25 turns, radius up to 1), noise std 0.05;
      1000 examples by default.
    - ``digits``: scikit-learn's 8x8 handwritten digits, 1,797 images, 64 features (0..16),
      10 classes; ``num_examples`` takes the first ones. Needs scikit-learn (the ``datasets`` extra).

    Args:
      name: one of ``BUILTINS``.
      seed: non-negative integer for the generated datasets (``xor`` with noise, ``moons``,
        ``spirals``); the same seed gives identical arrays.
      num_examples: number of examples, or None for the default.

    Returns:
      The :class:`Dataset`; generated classes are balanced and the examples shuffled.
    """
    if name not in BUILTINS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(BUILTINS)}")
    rng = _rng(seed)
    if num_examples is not None:
        num_examples = _count("num_examples", num_examples, 2 if name in ("moons", "spirals") else 1)
    if name == "seed":
        if num_examples not in (None, 1):
            raise ValueError(f"the seed dataset has exactly 1 example, got num_examples={num_examples}")
        return _seed_sample()
    if name == "xor":
        return _xor(rng, num_examples)
    if name == "moons":
        return _moons(rng, 1000 if num_examples is None else num_examples)
    if name == "spirals":
        return _spirals(rng, 1000 if num_examples is None else num_examples)
    return _digits(num_examples)


# ----------------------------------------------------------------------------- files


def _file_error(path, e: OSError) -> OSError:
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"data file not found: {os.fspath(path)}")
    reason = e.strerror or str(e)
    return OSError(f"cannot read data file {os.fspath(path)}: {reason}")


def load_table(
    path,
    target: str,
    task: str | None = None,
    *,
    categorical: Sequence[str] = (),
    encoding: str = "onehot",
    fit_rows: Callable[[int], np.ndarray] | None = None,
    ignore: Sequence[str] = (),
    delimiter: str | None = None,
) -> Dataset:
    """Reads a CSV or Parquet table: numeric, boolean and categorical columns, gaps, text class labels.

    Rows without a target value (an empty cell, or NaN) are left out, and counted in
    ``Dataset.report`` (:class:`jaxnet.app.tables.Report`, with the gaps filled and the categories
    the training rows lacked): nothing can be learned from them.

    Every column other than the target(s) is a feature, encoded by a :class:`jaxnet.app.tables.Encoder`
    (see :mod:`jaxnet.app.tables`) fitted on the rows ``fit_rows(n)`` (the training split; default: all
    rows) and kept as ``Dataset.encoder``. A text or boolean target is class labels, their names
    (sorted) kept as ``Dataset.classes``; numeric targets are inferred as for arrays (see the
    module docstring).

    Args:
      path: the ``.csv`` or ``.parquet`` file (a header row of unique names).
      target: the target column, or several separated by commas (a multi-output regression).
      task: ``"classification"``, ``"regression"`` or None to infer.
      categorical: integer columns to treat as categories (text columns always are).
      encoding: categories ``onehot`` or as codes for an ``embedding`` layer.
      fit_rows: ``n -> indices`` of the rows that the preprocessing is fitted on.
      ignore: columns that are not features (ids, leaks, free notes).
      delimiter: a CSV's field separator (default: sniffed from its header, :func:`jaxnet.app.tables.sniff_delimiter`).

    Returns:
      The :class:`Dataset`, named after the file; ``x`` ``(n, d)`` float32 encoded features.
    """
    _check_task(task)
    name = os.path.basename(os.fspath(path))
    table = tables.read_table(path, delimiter=delimiter)
    targets = target_columns(target)
    header = table.column_names
    if len(header) == 1 and len(targets) == 1 and targets[0] != header[0] and targets[0] in header[0]:
        sniffed = tables.sniff_delimiter(os.fspath(path))
        fix = "give the file's delimiter with {0} (e.g. ';')"
        if delimiter is not None and sniffed != delimiter and sniffed in header[0]:
            fix = f"its fields look separated by {escape(repr(sniffed))}: leave {{0}} out (it is found) or give that"
        raise ArgumentError(f"{escape(name)}: the header reads as one column, {escape(repr(header[0]))}: " + fix,
                            "delimiter")  # fmt: skip
    tables.missing_columns(table.column_names, targets, name, "the target column")
    tables.missing_columns(table.column_names, list(ignore), name, "the column to ignore")
    if set(ignore) & set(targets):
        raise ArgumentError(f"{{0}} names the target {escape(sorted(set(ignore) & set(targets))[0])!r}: "
                            "the target is never a feature; drop it from {0}", "ignore")  # fmt: skip
    features = [c for c in table.column_names if c not in targets and c not in ignore]
    index = tables.saved_index(table)
    if index is not None:  # DataFrame.to_csv's row index: left out, and said
        features.remove(index)
    unnamed = [i + 1 for i, c in enumerate(table.column_names) if not c.strip() and c in features]
    if unnamed:
        raise ValueError(f"{name}: column {unnamed[0]} has no name in the header: name it (a column without a name "
                         "cannot be matched when predicting)")  # fmt: skip
    ids = tables.row_numbers(table, features)
    if ids:
        first = table.column(ids[0])[0].as_py()
        leak = (f"{name}: column {escape(ids[0])!r} numbers the rows ({first}, {first + 1}, {first + 2} ...): as a "
                "feature it would leak the file's order; leave it out with {0} ")  # fmt: skip
        raise ArgumentError(leak + escape(",".join(ids)), "ignore")
    if not features:
        raise ValueError(f"{name}: no feature columns besides the target {target!r}; at least one is needed")
    if table.num_rows == 0:
        raise ValueError(f"empty dataset: {name} has a header but no data rows")
    read = table.num_rows
    tables.check_finite(table, features, name)  # (rows numbered as in the file, before any is left out)
    table, dropped = tables.rows_with_targets(table, targets)
    if table.num_rows == 0:
        raise ValueError(f"{name}: no row has a value in the target column {target!r}")
    y, task, num_classes, classes = _table_targets(table, targets, task, name)
    rows = np.arange(table.num_rows) if fit_rows is None else np.asarray(fit_rows(table.num_rows))
    encoder = tables.fit_encoder(table, features, categorical, encoding, name, rows)
    raw = tables.raw_matrix(table, encoder, name)
    index = None if index is None else 1  # (the first column)
    report = tables.report_of(raw, encoder, rows=read, dropped=dropped, ignored=tuple(ignore), index=index)
    return Dataset(tables.encode(raw, encoder), y, task, num_classes, encoder.feature_names, name, encoder=encoder,
                   classes=classes, report=report)  # fmt: skip


def target_columns(target: str) -> list[str]:
    """The target column names of ``target`` (several separated by commas)."""
    names = [t.strip() for t in str(target).split(",")]
    if not all(names):
        raise ArgumentError(f"{{0}} {escape(target)!r} has an empty column name", "target")
    return names


def _table_targets(table, targets: list[str], task, name: str):
    """``(y, task, num_classes, classes)`` of a table's target columns."""
    named = tables.class_names(table, targets[0], name) if len(targets) == 1 else None
    if named is not None:
        if task == "regression":
            raise ArgumentError(
                f"{name}: the target {targets[0]!r} holds class names, not numbers: a {{0}} 'regression' needs numbers",
                "task",
            )
        labels, classes = named
        return labels, "classification", len(classes), classes
    values = tables.target_values(table, targets, name)
    y, task, num_classes = _targets(values, task, False, lambda i: f"{name} row {i + 1}, column {targets[0]!r}")
    return y, task, num_classes, None


def load_csv(path, target: str, task: str | None = None, **options) -> Dataset:
    """A CSV file: :func:`load_table`."""
    return load_table(path, target, task, **options)


def load_npz(path, task: str | None = None) -> Dataset:
    """Reads arrays ``x`` and ``y`` from a ``.npz`` archive (``numpy.savez``), never unpickling.

    ``x`` is ``(n, d)`` numeric (a 1-D ``(n,)`` array is one feature); ``y`` is ``(n,)`` or
    ``(n, k)`` numeric. Integer or integer-valued ``y`` is inferred as class labels (see the module
    docstring). Other arrays in the archive are ignored. Object arrays, which would need pickle,
    are refused.

    Args:
      path: the ``.npz`` file.
      task: ``"classification"``, ``"regression"`` or None to infer.

    Returns:
      The :class:`Dataset`, named after the file; features are named ``x0, x1, ...``.
    """
    _check_task(task)
    name = os.path.basename(os.fspath(path))
    arrays = _read_npz(path, name)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        present = ", ".join(npz.names(path)) or "none"
        raise ValueError(f"{name} lacks array(s) {', '.join(repr(k) for k in missing)}; arrays present: {present}")
    return from_arrays(arrays["x"], arrays["y"], task=task, name=name)


CHUNK_ROWS = 65536
"""Rows per chunk when data is read in chunks (predict and evaluate)."""


class InputRows(NamedTuple):
    """Rows of inputs for a trained model (:func:`feature_chunks`).

    Attributes:
      x: ``(m, d)`` float32 features, not standardized.
      y: the raw targets ``(m,)`` or ``(m, k)`` when the data has them, else None.
      ids: the ``m`` values (as text) of the id column asked for, else None.
      report: a table's :class:`jaxnet.app.tables.Report` of these rows (gaps filled, unseen
        categories), else None.
    """

    x: np.ndarray
    y: np.ndarray | None
    ids: list[str] | None = None
    report: tables.Report | None = None


def feature_chunks(
    path,
    encoder,
    target: str | None = None,
    classes=None,
    rows: int = CHUNK_ROWS,
    id_column: str | None = None,
    delimiter: str | None = None,
):
    """Inputs for a trained model in chunks of at most ``rows`` rows, memory bounded by the chunk.

    ``path`` is a CSV file (``-``: CSV on standard input) or a ``.parquet`` file, whose columns are
    found by name (in any order; others are ignored) and encoded by ``encoder`` (a
    :class:`jaxnet.app.tables.Encoder`, or feature names: numeric columns); an ``.npz`` (``x``,
    optionally ``y``) or a folder of ``x.npy`` (memory-mapped) and optionally ``y.npy``, whose
    ``x`` is the raw matrix (:func:`jaxnet.app.tables.raw_matrix`; numeric features as they are).

    Args:
      target: the target column(s) of a table, returned as ``y`` when the file has them.
      classes: the model's class names, if its labels were names: ``y`` is then their indices.
      id_column: a table's column whose values each chunk carries as ``ids`` (as text).
      delimiter: a CSV's field separator (default: sniffed from its header).

    Yields:
      :class:`InputRows` s.
    """
    path = os.fspath(path)
    if not isinstance(encoder, tables.Encoder):
        encoder = tables.numeric(encoder)
    if id_column is not None and not (path == "-" or tables.is_table_file(path)):
        raise ArgumentError("{0} needs a table (CSV or Parquet); " + escape(os.path.basename(path)) + " has no "
                            "named columns", "id_column")  # fmt: skip
    count = 0
    for chunk in _feature_chunks(path, encoder, target, classes, rows, id_column, delimiter):
        count += len(chunk.x)
        yield chunk
    if count == 0:
        raise ValueError(f"empty dataset: {'standard input' if path == '-' else os.path.basename(path)} has no rows")


def _feature_chunks(path: str, encoder, target, classes, rows, id_column, delimiter):
    if path == "-" or tables.is_table_file(path):
        yield from _table_chunks(path, encoder, target, classes, rows, id_column, delimiter)
        return
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        arrays = sources.npy_folder(path, need_y=False)
        x = arrays["x"].reshape(len(arrays["x"]), -1)
        for start, block in zip(range(0, len(x), rows), sources.chunks_of(x, rows)):
            y = arrays["y"][start : start + rows] if "y" in arrays else None
            x_block = _raw_features(_checked_features(block, name, start), encoder, name)
            yield InputRows(x_block, None if y is None else np.asarray(y))
        return
    if os.path.splitext(path)[1].lower() != ".npz":
        raise ValueError(f"unsupported data file {path!r}: use .csv, .npz, .parquet, a folder of .npy files, or -")
    x, y = _npz_inputs(path, name)
    for start in range(0, len(x), rows):
        part = None if y is None else y[start : start + rows]
        yield InputRows(_raw_features(x[start : start + rows], encoder, name), part)


def _raw_features(x: np.ndarray, encoder, name: str) -> np.ndarray:
    if x.shape[1] != len(encoder.columns):
        raise ValueError(f"{name} has {x.shape[1]} features but the model expects {len(encoder.columns)}")
    return tables.encode(x, encoder)


def _read_npz(path, name: str) -> dict[str, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz`` (others never read), checked before allocation (:mod:`jaxnet._npz`)."""
    try:
        return npz.read_arrays(path, lambda member: member in ("x", "y"), what=name)
    except OSError as e:
        raise _file_error(path, e) from None


def _npz_inputs(path: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    arrays = _read_npz(path, name)
    if "x" not in arrays:
        raise ValueError(f"{name} has no array 'x' (the model's inputs)")
    x = np.asarray(arrays["x"])
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"{name}: 'x' must be a finite numeric (n, d) array, got {x.dtype} {x.shape}")
    return x.astype(np.float32), arrays.get("y")


def _table_chunks(path: str, encoder, target, classes, rows, id_column, delimiter):
    name = "standard input" if path == "-" else os.path.basename(path)
    types = tables.types_of(encoder)
    targets = target_columns(target) if target else []
    if classes is not None and tuple(classes) != ("false", "true"):
        types.update(dict.fromkeys(targets, tables.string_type()))
    if id_column is not None and id_column not in types:  # its text as written ("007" stays so)
        types[id_column] = tables.string_type()
    first = True
    for table in tables.batches(path, None, types, rows, delimiter):
        if first:
            tables.missing_columns(table.column_names, encoder.names, name, "the model's columns")
            if id_column is not None and id_column not in table.column_names:
                raise ArgumentError(f"{{0}} {escape(id_column)!r}: {escape(name)} has no such column (it has "
                                    f"{escape(', '.join(table.column_names[:8]))})", "id_column")  # fmt: skip
            has_y = bool(targets) and all(t in table.column_names for t in targets)
            first = False
        read, dropped = table.num_rows, 0
        if has_y:  # rows with no target value are left out (and reported), as in training
            table, dropped = tables.rows_with_targets(table, targets)
        raw = tables.raw_matrix(table, encoder, name)
        y = None
        if has_y:
            if classes is not None:
                y = tables.class_indices(tables.text_of(table.column(targets[0])), classes, name)
            else:
                values = tables.target_values(table, targets, name)
                y = values[:, 0] if len(targets) == 1 else values
        ids = None if id_column is None else [_id_text(v) for v in table.column(id_column).to_pylist()]
        yield InputRows(tables.encode(raw, encoder), y, ids, tables.report_of(raw, encoder, rows=read, dropped=dropped))


def _id_text(value) -> str:
    """An id cell as text: as written for a text column; a whole number without ``.0`` (an id
    column that is also a feature is read as numbers)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _checked_features(block: np.ndarray, name: str, first_row: int = 0) -> np.ndarray:
    """``block`` as float32, refused (naming the row and column) if a value is not finite in float32."""
    bad = np.argwhere(~_finite32(block))
    if bad.size:
        row, *col = (int(i) for i in bad[0])
        raise ValueError(
            f"{name}: row {first_row + row}{f', column {col[0]}' if col else ''} is "
            f"{block[tuple(bad[0])].item()!r}: NaN, inf and values beyond float32 range are not allowed"
        )
    return block.astype(np.float32)


def load_data(
    dataset: str | None = None,
    data=None,
    target: str | None = None,
    seed: int = 0,
    task: str | None = None,
    **table_options,
) -> Dataset:
    """Loads a built-in dataset by name or a data file (``.csv``, ``.npz``, ``.parquet``, or a
    folder of ``.npy`` arrays, kept on disk: :func:`load_npy_folder`).

    Args:
      dataset: a name in ``BUILTINS``; when neither ``dataset`` nor ``data`` is given,
        ``DEFAULT_DATASET`` (digits).
      data: a ``.csv`` or ``.npz`` file (exclusive with ``dataset``).
      target: the CSV target column (required for CSV; not used by other sources).
      seed: the seed of generated built-ins.
      task: for files, ``"classification"``, ``"regression"`` or None to infer; for built-ins,
        None or the built-in's own task.
      table_options: for CSV and Parquet, :func:`load_table`'s ``categorical``, ``encoding`` and ``fit_rows``.

    Returns:
      The :class:`Dataset`.
    """
    _check_task(task)
    if dataset is not None and data is not None:
        raise ValueError("give either a built-in dataset name or a data file, not both")
    if data is None:
        if target is not None:
            raise ValueError("a target column applies only to a CSV data file, not to a built-in dataset")
        ds = load_builtin(DEFAULT_DATASET if dataset is None else dataset, seed=seed)
        if task is not None and task != ds.task:
            raise ValueError(f"dataset {ds.name!r} is a {ds.task} dataset, not {task}")
        return ds
    if os.path.isdir(data):
        ds = load_npy_folder(data, task=task)
        if target is not None:
            raise ValueError(f"{os.fspath(data)}: a data folder holds x.npy and y.npy; a target column applies to CSV")
        return ds
    suffix = os.path.splitext(os.fspath(data))[1].lower()
    if suffix == ".csv":
        if target is None:
            raise ValueError(f"{os.fspath(data)}: a CSV file needs the name of its target column (target)")
        return load_table(data, target, task, **table_options)
    if suffix == ".npz":
        if target is not None:
            raise ValueError(
                f"{os.fspath(data)}: an .npz file holds arrays 'x' and 'y'; a target column applies only to CSV"
            )
        return load_npz(data, task=task)
    if suffix == ".parquet":
        if target is None:
            raise ValueError(f"{os.fspath(data)}: a Parquet file needs the name of its target column (target)")
        return load_table(data, target, task, **table_options)
    raise ValueError(
        f"unsupported data file {os.fspath(data)!r}: use a .csv, .npz or .parquet file, or a folder of x.npy and y.npy"
    )


def _check_finite_rows(x, name: str) -> None:
    """One pass over lazy rows in chunks: refuses NaN, inf and values beyond float32 range."""
    chunk = sources.block_rows(x)
    for start, block in zip(range(0, len(x), chunk), sources.chunks_of(x, chunk)):
        _checked_features(block, name, start)


def _folder_part(x, y, task, name: str, classes: int | None = None) -> Dataset:
    """A Dataset of memory-mapped ``x`` (rows kept lazy, viewed as ``(n, d)``) and targets ``y`` read whole."""
    for label, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{name}: {label} must be numeric, got dtype {array.dtype}")
    if x.ndim == 1:
        x = x.reshape(x.shape[0], 1)
    if x.ndim > 2:  # images and the like: one row of features each (a view, nothing is read)
        x = x.reshape(x.shape[0], -1)
    if y.ndim not in (1, 2) or len(x) == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: x must be (examples, features...) and y (examples[, outputs]), got {y.shape}")
    _check_finite_rows(x, f"{name} x")
    y = np.asarray(y[:])  # the targets are read whole
    bad = np.argwhere(~_finite32(y))
    if bad.size:
        raise ValueError(f"{name}: y[{int(bad[0][0])}] is not finite: NaN, inf and values beyond float32 range")
    y2 = y if y.ndim == 2 else y[:, None]
    labels, task, num_classes = _targets(y2, task, y.dtype.kind in "biu", lambda i: f"{name}: y[{i}]")
    if classes is not None and num_classes is not None:
        num_classes = max(num_classes, classes)
    view = sources.RowView(x, dtype=np.float32, transform=lambda block: block.astype(np.float32))
    return Dataset(view, labels, task, num_classes, tuple(f"x{j}" for j in range(x.shape[1])), name)


def load_parquet(path, target: str, task: str | None = None, **options) -> Dataset:
    """A Parquet file, read into memory: :func:`load_table`."""
    return load_table(path, target, task, **options)


def load_npy_folder(path, task: str | None = None) -> Dataset:
    """A folder of ``.npy`` arrays: ``x.npy`` (examples first; more than 2-D is flattened per
    example) and ``y.npy``, optionally ``x_val.npy`` and ``y_val.npy`` as the validation split.

    ``x`` is memory-mapped and stays on disk: its rows are read in chunks when used (one pass
    now checks that they are finite). ``y`` is read whole (its task inferred as for CSV files).
    """
    _check_task(task)
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    try:
        arrays = sources.npy_folder(path)
    except sources.DataError as e:
        raise ValueError(str(e)) from None
    ds = _folder_part(arrays["x"], arrays["y"], task, f"{name}/x.npy, y.npy")
    if "x_val" in arrays:
        val = _folder_part(arrays["x_val"], arrays["y_val"], ds.task, f"{name}/x_val.npy, y_val.npy", ds.num_classes)
        if val.x.shape[1:] != ds.x.shape[1:]:
            raise ValueError(f"{name}: x_val.npy rows have {val.x.shape[1]} features, x.npy rows {ds.x.shape[1]}")
        ds = ds._replace(num_classes=max(ds.num_classes, val.num_classes) if ds.num_classes else None, validation=val)
    return ds._replace(name=name)


# ----------------------------------------------------------------------------- splits


def subset(ds: Dataset, indices) -> Dataset:
    """The examples of ``ds`` at ``indices`` (an integer array), with the same metadata (lazy rows
    stay lazy: a view of those rows)."""
    indices = np.asarray(indices, np.intp)
    x = ds.x[indices] if sources.is_resident(ds.x) else sources.RowView(ds.x, indices)
    return ds._replace(x=x, y=ds.y[indices], validation=None)


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """``(train, val, test)`` sizes for ``n`` examples; each fraction > 0 gets at least 1 example.

    Sizes are rounded half up from ``fraction * n``. Raises ValueError for fractions outside
    ``[0, 1)``, fractions summing to 1 or more, or too few examples to leave a training set.
    """
    for label, f in (("validation fraction", val_fraction), ("test fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)):
            raise ValueError(f"{label} must be a number in [0, 1), got {f!r}")
        if not (0.0 <= f < 1.0):
            raise ValueError(f"{label} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation ({val_fraction}) and test ({test_fraction}) fractions must sum to less than 1 "
            "to leave a training set"
        )

    def size(f: float) -> int:
        return max(1, int(math.floor(f * n + 0.5))) if f > 0 else 0

    n_val, n_test = size(val_fraction), size(test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"{n} examples are too few for a {n_val}-example validation split and a {n_test}-example test "
            "split and a training set: use smaller fractions or more data"
        )
    return n_train, n_val, n_test


def split(ds: Dataset, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Splits a dataset at random into train, validation and test parts.

    One permutation is drawn from ``np.random.default_rng(seed)``: the test split takes its first
    ``test`` examples, the validation split the next ``val``, and training the rest. So the test
    split depends only on the seed, the dataset size and ``test_fraction``. Within each part the
    examples keep their original order.

    Args:
      ds: the dataset.
      val_fraction: fraction of all examples held out for validation, in ``[0, 1)``; 0 for none.
      test_fraction: fraction of all examples held out for testing, in ``[0, 1)``; 0 for none.
      seed: non-negative integer; the same seed gives the same splits.

    Returns:
      :class:`Splits`; ``val``/``test`` are None when their fraction is 0.
    """
    if ds.validation is not None:  # the source's own validation split: only the test split is drawn
        val_fraction = 0.0
    train, val, test = split_indices(ds.x.shape[0], val_fraction, test_fraction, seed)
    own = ds.validation
    return Splits(
        subset(ds, train),
        own if own is not None else (subset(ds, val) if len(val) else None),
        subset(ds, test) if len(test) else None,
    )


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """The sorted row indices of :func:`split`'s train, validation and test parts of ``n`` rows."""
    _, n_val, n_test = split_sizes(n, val_fraction, test_fraction)
    order = _rng(seed).permutation(n)
    return Splits(np.sort(order[n_test + n_val :]), np.sort(order[n_test : n_test + n_val]), np.sort(order[:n_test]))


# ----------------------------------------------------------------------------- standardization


def fit_standardizer(x: np.ndarray, names: Sequence[str] | None = None) -> Standardizer:
    """Per-feature mean and standard deviation of ``x`` (fit on the training split only).

    A (near-)constant feature, whose std is below float32 resolution of its mean, gets std 1, so
    it maps to 0 instead of dividing by zero. A feature whose values, centred, leave float32's
    range is refused by name (``names``, else its index).

    Args:
      x: ``(n, d)`` features, ``n >= 1``.
      names: ``d`` feature names for errors.

    Returns:
      A :class:`Standardizer` with ``(d,)`` float32 ``mean`` and ``std``.

    Examples:
      >>> s = fit_standardizer(np.array([[0.0, 5.0], [2.0, 5.0]]))
      >>> s.mean.tolist(), s.std.tolist()
      ([1.0, 5.0], [1.0, 1.0])
    """
    if len(x.shape) != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_standardizer needs (examples, features) with at least one example, got shape {x.shape}")
    return _standardizer(*_column_moments(x), names)


def _standardizer(mean: np.ndarray, std: np.ndarray, spread: np.ndarray, names=None) -> Standardizer:
    """The float32 Standardizer of moments, a (near-)constant column's std set to 1; refuses
    columns whose largest distance from the mean (``spread``) overflows float32."""
    wide = np.flatnonzero(spread > np.finfo(np.float32).max)
    if wide.size:
        named = ", ".join(repr(names[i]) if names is not None else f"column {i}" for i in wide[:5])
        more = f" and {wide.size - 5} more" if wide.size > 5 else ""
        raise ValueError(
            f"{named}{more}: values span more than float32 can hold once centred "
            f"(up to {spread[wide[0]]:.3g} from the mean): rescale the column (e.g. to other units) or drop it"
        )
    tiny = np.finfo(np.float32).eps * np.maximum(1.0, np.abs(mean))
    std = np.where(std > tiny, std, 1.0)
    return Standardizer(mean.astype(np.float32), std.astype(np.float32))


def _column_moments(x, reshape=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std and largest distance from the mean per column of ``x`` (viewed as ``reshape``):
    at once in memory, by blocks for lazy rows."""
    blocks = [np.asarray(x)] if sources.is_resident(x) else sources.chunks_of(x)
    return _moments(blocks, reshape)


def _moments(blocks, reshape=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, (population) std and largest distance from the mean per column over row blocks,
    merged exactly in float64 (Chan et al.)."""
    count, mean, m2, low, high = 0, 0.0, 0.0, np.inf, -np.inf
    for block in blocks:
        block = np.asarray(block, np.float64)
        block = block if reshape is None else block.reshape(reshape)
        low, high = np.minimum(low, block.min(axis=0)), np.maximum(high, block.max(axis=0))
        n = len(block)
        block_mean = block.mean(axis=0)
        centred = block - block_mean
        centred *= centred  # (in place: one float64 copy of the block, not two)
        block_m2 = centred.sum(axis=0)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta**2 * (count * n / total)
        count = total
    mean = np.asarray(mean)
    return mean, np.sqrt(np.asarray(m2) / count), np.maximum(high - mean, mean - low)


def standardize(x: np.ndarray, s: Standardizer) -> np.ndarray:
    """``(x - mean) / std`` per feature.

    Args:
      x: ``(n, d)`` features; ``d`` must match the standardizer (a saved model's input size).
      s: the :class:`Standardizer`.

    Returns:
      ``(n, d)`` float32.
    """
    d = s.mean.shape[0]
    if len(x.shape) != 2 or x.shape[1] != d:
        got = x.shape[1] if len(x.shape) == 2 else f"shape {x.shape}"
        raise ValueError(f"feature count mismatch: the data has {got} features, expected {d}")
    if not sources.is_resident(x):  # lazy rows: standardized as they are read
        return sources.RowView(x, transform=lambda block: standardize(block, s), dtype=np.float32)
    x = np.asarray(x, np.float32)
    return ((x - s.mean) / s.std).astype(np.float32)


def fit_channel_standardizer(x: np.ndarray, channels: int) -> Standardizer:
    """One mean and std per channel of image rows ``(n, h * w * channels)`` (channels last), over
    all of the channel's pixels, spread to ``(d,)`` vectors. Images keep their relative
    intensities: a per-pixel std would blow up the pixels that are nearly always blank."""
    repeats = x.shape[1] // channels
    per_channel = _standardizer(*_column_moments(x, (-1, channels)))
    return Standardizer(np.tile(per_channel.mean, repeats), np.tile(per_channel.std, repeats))


def standardize_splits(
    splits: Splits, channels: int | None = None, scaled: np.ndarray | None = None
) -> tuple[Splits, Standardizer]:
    """Fits a :class:`Standardizer` on ``splits.train`` (per feature, or per image channel when
    ``channels`` is given: :func:`fit_channel_standardizer`) and applies it to every part;
    ``scaled`` ``(d,)`` bool marks the features it may scale (the others keep mean 0, std 1)."""
    train = splits.train
    if channels is None:
        s = fit_standardizer(train.x, train.feature_names)
    else:
        s = fit_channel_standardizer(train.x, channels)
    if scaled is not None and not np.all(scaled):
        s = Standardizer(np.where(scaled, s.mean, 0).astype(np.float32), np.where(scaled, s.std, 1).astype(np.float32))

    def apply(ds: Dataset | None) -> Dataset | None:
        return None if ds is None else ds._replace(x=standardize(ds.x, s))  # lazy rows stay lazy

    return Splits(apply(splits.train), apply(splits.val), apply(splits.test)), s
