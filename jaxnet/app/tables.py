"""Tables as they come: CSV and Parquet files read by pyarrow, their columns encoded as features.

A table's columns are numeric (integers or floats), boolean (``true``/``false``), categorical
(text, or integer columns named in ``categorical``) or dates (``2012-01-31``, or a date and time:
five features, :data:`DATE_FEATURES`). :func:`fit_encoder` learns an :class:`Encoder` from
the training rows only: each column's kind, the mean that fills its gaps (with a ``name (missing)``
0/1 indicator column when the training rows had gaps) and a categorical column's categories.
:func:`raw_matrix` turns a table into the raw matrix ``(n, c)`` (NaN for a gap, a category's index
in its vocabulary, -1 for a category the training rows did not have) and :func:`encode` that
into features ``(n, d)``: numbers as they are (gaps filled), dates as their calendar, categories one-hot or as one code
column each for an embedding layer (``encoding="embedding"``). :func:`encode` is written once for
numpy and ``jax.numpy`` (``xp``), so that an exported program does the same.

Numbers follow one grammar: an optional sign, ASCII digits with an optional decimal point, an
optional exponent (``-2.5``, ``1e3``, ``.5``), spaces around allowed. Thousands separators
(``1,000`` in a quoted cell, ``1_000``), hexadecimal, non-ASCII digits, ``inf`` and ``infinity``
are not numbers. A gap is an empty cell or one of :data:`GAPS`.

pyarrow is imported when a table is read (the ``data`` extra, also in ``cli``).

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import codecs
import csv
import mmap
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxnet._checks import ArgumentError, escape

ENCODINGS = ("onehot", "embedding")
KINDS = ("numeric", "boolean", "categorical", "date")
DATE_FEATURES = ("year", "month", "day of week", "day of year", "days")
"""The features of a date column ``d``, named ``d (year)`` etc.: the year, the month 1..12, the day
of the week 0..6 (Monday 0), the day of the year 1..366 and the days since 1970-01-01 (with a
time of day, its fraction of a day; in UTC for a time with a zone). In the raw matrix a date is
its days since 1970-01-01."""
GAPS = ("", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "?")
"""The cells that are read as a gap (missing value)."""
MAX_CATEGORIES = 1000
ID_CATEGORIES = 20
"""A text column with more distinct values in the training rows than ``MAX_CATEGORIES``, or than
``ID_CATEGORIES`` and half its rows, is refused (an identifier or free text)."""
NUMBER = r"^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"
GRAMMAR = "numbers are written like 1000, -2.5 or 1e3"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
EXTRA = "pip install 'jaxnet-trainer[data]'"


class TableError(ValueError):
    """A table that cannot be used as it is; the message names the column (and row) and the fix."""


class Column(NamedTuple):
    """One column's encoding, fitted on the training rows.

    Attributes:
      name: the column's name in the table.
      kind: ``numeric``, ``boolean``, ``categorical`` or ``date``.
      fill: the value of a gap (numeric, boolean, date): the training rows' mean (a date's: in days
        since 1970-01-01).
      indicator: the training rows had gaps: a ``name (missing)`` 0/1 feature follows.
      categories: a categorical column's values in the training rows, sorted.
    """

    name: str
    kind: str
    fill: float = 0.0
    indicator: bool = False
    categories: tuple[str, ...] = ()


class Encoder(NamedTuple):
    """The columns of a table and how they become features (saved with a model as JSON).

    ``encoding``: ``onehot`` (one 0/1 feature per category) or ``embedding`` (one code feature per
    categorical column, 0..V-1, V for a gap or an unseen category: an embedding layer's input).
    """

    columns: tuple[Column, ...]
    encoding: str = "onehot"

    @property
    def names(self) -> tuple[str, ...]:
        """The table columns it reads, in order (the raw matrix's columns)."""
        return tuple(c.name for c in self.columns)

    def width(self, c: Column) -> int:
        """How many features column ``c`` makes before its gap indicator."""
        if c.kind == "date":
            return len(DATE_FEATURES)
        return len(c.categories) if c.kind == "categorical" and self.encoding == "onehot" else 1

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The names of the ``d`` features it makes."""
        out = []
        for c in self.columns:
            if c.kind == "categorical" and self.encoding == "onehot":
                out += [f"{c.name}={v}" for v in c.categories]
            elif c.kind == "date":
                out += [f"{c.name} ({part})" for part in DATE_FEATURES]
            else:
                out.append(c.name)
            if c.indicator:
                out.append(f"{c.name} (missing)")
        return tuple(out)

    @property
    def scaled(self) -> np.ndarray:
        """``(d,)`` bool: the features that standardization may scale (numbers, dates); the 0/1 and
        code features pass through as they are."""
        out = []
        for c in self.columns:
            out += [c.kind in ("numeric", "date")] * self.width(c) + [False] * c.indicator
        return np.asarray(out, bool)

    @property
    def embedded(self) -> list[tuple[int, int]]:
        """``(feature index, rows)`` of each code feature for an embedding layer (V + 1 rows)."""
        if self.encoding != "embedding":
            return []
        out, j = [], 0
        for c in self.columns:
            if c.kind == "categorical":
                out.append((j, len(c.categories) + 1))
            j += self.width(c) + c.indicator
        return out

    def to_json(self) -> dict:
        return {
            "encoding": self.encoding,
            "columns": [c._asdict() | {"categories": list(c.categories)} for c in self.columns],
        }

    @classmethod
    def from_json(cls, value: Any, where: str = "the model") -> Encoder:
        """The encoder of a model's metadata, every field checked (a hand-made file is not trusted)."""
        try:
            columns = tuple(_column_of(c) for c in value["columns"])
            encoding = value["encoding"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed 'columns' metadata ({type(e).__name__}: {e})") from None
        if encoding not in ENCODINGS or not columns:
            raise ValueError(f"{where}: malformed 'columns' metadata (encoding {encoding!r})")
        return cls(columns, encoding)


def _column_of(c: dict) -> Column:
    column = Column(
        str(c["name"]), str(c["kind"]), float(c["fill"]), bool(c["indicator"]), tuple(str(v) for v in c["categories"])
    )
    if column.kind not in KINDS or not np.isfinite(column.fill):
        raise ValueError(f"column {column.name!r} kind {column.kind!r} fill {column.fill!r}")
    return column


def numeric(names: Sequence[str]) -> Encoder:
    """The encoder of numeric columns without gaps: features are the columns as they are."""
    return Encoder(tuple(Column(str(n), "numeric") for n in names))


# ----------------------------------------------------------------------------- reading


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError(f"reading CSV and Parquet files needs pyarrow, which is not installed: {EXTRA}") from None
    return pa


def is_table_file(path) -> bool:
    return is_csv(path) or os.path.splitext(os.fspath(path))[1].lower() == ".parquet"


def is_csv(path) -> bool:
    """Whether ``path`` names a CSV file (``-``, standard input, is one)."""
    return os.fspath(path) == "-" or os.path.splitext(os.fspath(path))[1].lower() == ".csv"


def _csv_options(pa, types: dict | None, columns: Sequence[str] | None):
    return pa.csv.ConvertOptions(
        null_values=list(GAPS),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        true_values=["true", "True", "TRUE"],
        false_values=["false", "False", "FALSE"],
        column_types=types,
        timestamp_parsers=[pa.csv.ISO8601, *TIME_FORMATS],
        include_columns=list(columns) if columns is not None else None,
        include_missing_columns=False,
    )


def _has_hex(path) -> bool:
    """Whether the file holds ``0x``/``0X`` anywhere (pyarrow reads ``0x10`` as the integer 16)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(b"x") < 0 and m.find(b"X") < 0:  # one byte: a fast scan
                return False
            return re.search(rb"0[xX]", m) is not None


WIDE = 2000
"""A CSV with more columns than this is read in one block by one thread: pyarrow's cost per block
and column would otherwise grow with the square of the columns."""


def _read_options(pa, path: str):
    with open(path, "rb") as f:
        header = f.readline()
    if header.count(b",") < WIDE:
        return pa.csv.ReadOptions()
    return pa.csv.ReadOptions(use_threads=False, block_size=int(min(max(len(header) * 256, 1 << 20), 1 << 30)))


_RAGGED = re.compile(r"Expected (\d+) columns, got (\d+): (.*)")
_BAD_CELL = re.compile(r"In CSV column #(\d+): .*invalid value '(.*)'")


def _arrow_error(
    name: str, e: Exception, header: Sequence[str] = (), row_of=None, path=None, delimiter=None
) -> TableError:
    """pyarrow's error about a file, as one line that names the problem and the fix (``row_of(j,
    value)``: where the bad cell ``value`` of column ``j`` is, e.g. ``"row 12, "``; ``path``: the
    file, read again to number a ragged row; ``delimiter``: the one it was read with)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Empty CSV file" in text:
        return TableError(f"empty dataset: {name} is empty (expected a header row and data rows)")
    ragged = _RAGGED.search(text)
    if ragged:
        want, got, row = ragged.groups()
        where = _line_of(path, row) if path not in (None, "-") else None
        which = f"row {where}" if where else "a row"
        hint = next((f": its fields look separated by {_DELIMITER_NAMES.get(d, repr(d))}, give --delimiter "
                     + _DELIMITER_FLAGS.get(d, repr(d)) for d in DELIMITERS
                     if d != delimiter and row.count(d) == int(want) - 1), "")  # fmt: skip
        return TableError(f"{name}: {which} has {got} fields, expected {want} as in the header: {row[:80]!r}{hint}")
    cell = _BAD_CELL.search(text)
    if cell:
        j = int(cell[1])
        column = repr(header[j]) if j < len(header) else f"#{j + 1}"
        where = row_of(j, cell[2]) if row_of is not None else ""
        return TableError(f"{name}: {where}column {column}: {cell[2]!r} is not a number ({GRAMMAR})")
    return TableError(f"{name} cannot be read as a table: {text}")


_DELIMITER_NAMES = {"\t": "tabs"}
_DELIMITER_FLAGS = {"\t": "$'\\t' (a tab)"}


def _check_text(path: str, name: str) -> None:
    """Refuses a file whose start is not UTF-8 text (a spreadsheet, UTF-16, an archive)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        head = b"\x00"
    if b"\x00" in head:
        raise TableError(f"{name} is not a UTF-8 text CSV file (save it as CSV, UTF-8)")


DELIMITERS = (",", ";", "\t", "|")
TIME_FORMATS = ("%Y/%m/%d", "%Y/%m/%d %H:%M", "%Y/%m/%d %H:%M:%S")
"""The forms read as dates and times: ISO 8601 (``2012-01-31``, ``2012-01-31 18:00:00``) and the
same with slashes (``2012/01/31``). Day-first or month-first forms (``01/02/2012``) are ambiguous
and stay text."""
_DATE_LIKE = r"^\s*\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T]\d{1,2}:\d{2}(:\d{2})?)?\s*$"


def sniff_delimiter(path: str, prefer: str | None = None) -> str:
    """A CSV's delimiter: ``prefer`` (a training run's ``--delimiter``) when its header line has
    it, else a comma when it has one, else whichever of ``;``, tab and ``|`` it has most of (a
    comma again when none: one column). Standard input: ``prefer``, else a comma."""
    if path == "-":
        return prefer or ","
    with open(path, "rb") as f:
        header = f.readline(1 << 20).decode("utf-8", errors="replace")
    counts = {d: header.count(d) for d in DELIMITERS}
    if prefer is not None and prefer in header:
        return prefer
    if counts[","]:
        return ","
    best = max(DELIMITERS[1:], key=lambda d: counts[d])
    return best if counts[best] else ","


def read_table(path, columns: Sequence[str] | None = None, types: dict | None = None, delimiter: str | None = None):
    """A CSV or Parquet file as a ``pyarrow.Table`` (``columns``: only those, by name; ``types``:
    ``{column: pyarrow type}`` to read them as; ``delimiter``: a CSV's, default
    :func:`sniff_delimiter`). Refuses duplicate column names and empty tables."""
    pa = _pyarrow()
    path = os.fspath(path)
    name = os.path.basename(path)
    if os.path.isdir(path):
        raise OSError(f"cannot read data file {path}: Is a directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    table = None
    try:
        if path.lower().endswith(".parquet"):
            wanted = list(columns) if columns is not None else None
            table = _gaps_as_nulls(pa, pa.parquet.read_table(path, columns=wanted))
        else:
            _check_text(path, name)
            options = _read_options(pa, path)
            delimiter = delimiter or sniff_delimiter(path)
            parse = pa.csv.ParseOptions(delimiter=delimiter)
            table = pa.csv.read_csv(
                path, read_options=options, parse_options=parse, convert_options=_csv_options(pa, types, columns)
            )
            integers = [f.name for f in table.schema if pa.types.is_integer(f.type)]
            if integers and _has_hex(path):  # read them again as floats, which refuse 0x10
                table = pa.csv.read_csv(
                    path,
                    read_options=options,
                    parse_options=parse,
                    convert_options=_csv_options(
                        pa, {**(types or {}), **dict.fromkeys(integers, pa.float64())}, columns
                    ),
                )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        if isinstance(e, PermissionError):
            raise OSError(f"cannot read data file {path}: permission denied") from None
        header = table.column_names if table is not None else ()
        raise _arrow_error(name, e, header, path=path, delimiter=delimiter) from None
    _check_names(table.column_names, name)
    return table


def _gaps_as_nulls(pa, table):
    """``table`` with each text cell that a CSV reads as a gap (:data:`GAPS`, the empty string
    among them) made null, so that a Parquet file and a CSV of the same values give the same
    features (a gap, not a category ``""``)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            gap = pa.compute.is_in(column, value_set=pa.array(GAPS, field.type))
            table = table.set_column(i, field, pa.compute.if_else(gap, pa.scalar(None, field.type), column))
    return table


def _check_names(names: list[str], name: str) -> None:
    """Refuses a header whose names repeat, also up to spaces around them (``f0`` and `` f0 ``:
    a column a user could not tell apart when ``predict`` matches columns by name)."""
    seen: dict[str, str] = {}
    for n in names:
        other = seen.get(n.strip())
        seen.setdefault(n.strip(), n)
        if other is not None:
            shown = repr(n) if other == n else f"{other!r} and {n!r}"
            raise TableError(f"{name}: duplicate column names in the header: {shown} (spaces around names do "
                             "not tell columns apart): rename one")  # fmt: skip


def missing_columns(available: Sequence[str], wanted: Sequence[str], name: str, what: str) -> None:
    """Refuses a table that lacks one of the ``wanted`` columns, naming them."""
    have = set(available)
    missing = [c for c in wanted if c not in have]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        has = ", ".join(list(available)[:8]) + (" ..." if len(available) > 8 else "")
        raise TableError(f"{name} lacks {what} {shown} (it has {has})")


def _block_bytes(rows: int) -> int:
    return int(min(max(rows * 64, 1 << 16), 1 << 26))


def batches(
    path, columns: Sequence[str] | None, types: dict | None, rows: int, delimiter: str | None = None
) -> Iterator:
    """A CSV (``-``: standard input) or Parquet file's ``columns`` (None: all) as ``pyarrow.Table`` s
    of about ``rows`` rows each (CSV: blocks of about 64 bytes a row), memory bounded by the batch.
    ``types``: ``{column: pyarrow type}`` for a CSV's columns (inferred from its first block otherwise);
    ``delimiter``: a CSV's (default: :func:`sniff_delimiter`'s)."""
    pa = _pyarrow()
    path = os.fspath(path)
    name = "standard input" if path == "-" else os.path.basename(path)
    if path != "-" and not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    header, done = [], 0
    try:
        if path.lower().endswith(".parquet"):
            file = pa.parquet.ParquetFile(path)
            for batch in file.iter_batches(batch_size=rows, columns=None if columns is None else list(columns)):
                yield _gaps_as_nulls(pa, pa.Table.from_batches([batch]))
            return
        source = _stdin() if path == "-" else path
        delimiter = delimiter or sniff_delimiter(path)
        reader = pa.csv.open_csv(
            source,
            read_options=pa.csv.ReadOptions(block_size=_block_bytes(rows)),
            parse_options=pa.csv.ParseOptions(delimiter=delimiter),
            convert_options=_csv_options(pa, types, columns),
        )
        header = reader.schema.names if columns is None else []  # pyarrow numbers the file's columns
        for batch in reader:
            yield pa.Table.from_batches([batch])
            done += batch.num_rows
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        header = header or (_csv_header(path, delimiter) if path != "-" else [])
        where = lambda j, value: _row_of(path, j, value, done, delimiter)  # noqa: E731
        raise _arrow_error(name, e, header, where, path=path, delimiter=delimiter) from None


def _line_of(path: str, text: str) -> int | None:
    """The first row after the header (numbered as :func:`_row_of` numbers them) whose line is
    ``text``, or None."""
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f, None)
        for i, line in enumerate(f, 1):
            if line.rstrip("\r\n") == text.rstrip("\r\n"):
                return i
    return None


def _csv_header(path: str, delimiter: str) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _row_of(path: str, column: int, value: str, after: int, delimiter: str) -> str:
    """Where a bad cell is, for an error: the first data row after ``after`` (those read well)
    whose cell in ``column`` (0-based) is ``value``, found by reading the file again (standard
    input cannot be read again)."""
    if path != "-":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = csv.reader(f, delimiter=delimiter)
            next(rows, None)
            for i, row in enumerate(rows, 1):
                if i > after and column < len(row) and row[column].strip() == value.strip():
                    return f"row {i}, "
    return f"a row after row {after}, " if after else ""


def _stdin():
    import sys

    return sys.stdin.buffer


# ----------------------------------------------------------------------------- kinds and fitting


def _kind(pa, column, name: str, where: str, categorical: bool) -> str:
    t = column.type
    if pa.types.is_null(t):
        raise TableError(f"{where}: column {name!r} is empty in every row; drop it")
    if categorical and (pa.types.is_integer(t) or pa.types.is_string(t)):
        return "categorical"
    if categorical and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        holds = f"{escape(where)}: {{0}} names {escape(repr(name))}, which holds {escape(str(t))} values: "
        raise ArgumentError(holds + "it takes integer columns (text columns are categories already)", "categorical")
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        if categorical:
            raise TableError(f"{where}: column {name!r} holds fractional numbers, which cannot be categories")
        return "numeric"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "date"
    if pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        text = column.cast(pa.string()) if pa.types.is_dictionary(t) else column
        _refuse_numbers_in_text(pa, text, name, where)
        _refuse_dates_in_text(pa, text, name, where)
        return "categorical"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        raise TableError(f"{where}: column {name!r} is not UTF-8 text; save the file as UTF-8")
    raise TableError(f"{where}: column {name!r} holds {t} values: convert them to numbers or categories, or drop it")


def _refuse_numbers_in_text(pa, column, name: str, where: str) -> None:
    """A text column whose values are mostly numbers is a numeric column with a bad cell: named here."""
    import pyarrow.compute as pc

    valid = column.drop_null()
    if len(valid) == 0:
        return
    numbers = pc.match_substring_regex(valid, NUMBER)
    count = pc.sum(numbers.cast(pa.int64())).as_py() or 0
    if count * 2 < len(valid):
        return
    flags = pc.match_substring_regex(column, NUMBER).to_numpy(zero_copy_only=False)
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    row = int(np.flatnonzero(~nulls & ~flags.astype(bool))[0])
    raise TableError(
        f"{where}: row {row + 1}, column {name!r}: {column[row].as_py()!r} is not a number, but the column's other "
        f"values are ({GRAMMAR}); fix the cell, or list the column as categorical"
    )


_DECIMAL_COMMA = r"^\s*[+-]?[0-9]+,[0-9]+\s*$"


def _mostly(pa, valid, pattern: str) -> bool:
    """Whether at least half of the text values ``valid`` (no gaps) match ``pattern``."""
    import pyarrow.compute as pc

    count = pc.sum(pc.match_substring_regex(valid, pattern).cast(pa.int64())).as_py() or 0
    return len(valid) > 0 and count * 2 >= len(valid)


def _refuse_dates_in_text(pa, column, name: str, where: str) -> None:
    """A text column of mostly dates whose cells did not all read as dates (an ambiguous form, or
    a bad cell among good ones), or of numbers with a decimal comma: refused, saying which."""
    valid = column.drop_null()
    if _mostly(pa, valid, _DECIMAL_COMMA):
        example = next(v for v in valid.to_pylist() if re.match(_DECIMAL_COMMA, v))
        raise TableError(f"{where}: column {name!r} holds numbers written with a decimal comma ({example!r}): "
                         "write them with a decimal point (1.5), or leave the column out")  # fmt: skip
    if not _mostly(pa, valid, _DATE_LIKE):
        return
    values = column.to_pylist()
    if not any(_reads_as_date(v) for v in values if v is not None):
        first = next(v for v in values if v is not None)
        raise ArgumentError(
            f"{escape(where)}: column {escape(repr(name))} holds dates written as {escape(repr(first))}, a form that "
            "is not read as dates (day and month could be either way round): write them as 2012-01-31, or leave "
            "the column out with {0}",
            "ignore",
        )
    raise _not_dates(values, where, name, ", but the column's other values are")


def _not_dates(values: list, where: str, name: str, others: str = "") -> TableError:
    """The error of a date column read as text (``values``): its first cell that is not a date,
    named by its row; or, when every cell is one, its mixed forms."""
    row = next((i for i, v in enumerate(values) if v is not None and not _reads_as_date(v)), None)
    if row is None:
        return TableError(f"{where}: column {name!r} mixes forms of dates (times with and without a zone, or - and "
                          "/), which are not read as one column of dates: write every cell in one form")  # fmt: skip
    return TableError(f"{where}: row {row + 1}, column {name!r}: {values[row]!r} is not a date{others} "
                      f"({DATE_FORMS}): fix the cell")  # fmt: skip


DATE_FORMS = "dates are written like 2012-01-31 or 2012/01/31, with or without a time such as 18:00:00"


def _reads_as_date(text: str) -> bool:
    """Whether ``text`` is a date (and time) in a form :data:`TIME_FORMATS` reads, and a real one."""
    import datetime

    text = text.strip()
    if not re.match(r"^\d{4}[-/]\d{2}[-/]\d{2}([ T]|$)", text):
        return False
    try:
        datetime.datetime.fromisoformat(text[:10].replace("/", "-") + text[10:].replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def fit_encoder(
    table,
    names: Sequence[str],
    categorical: Sequence[str] = (),
    encoding: str = "onehot",
    where: str = "data",
    rows: np.ndarray | None = None,
) -> Encoder:
    """The :class:`Encoder` of columns ``names`` of ``table``: each column's kind from the whole
    table (its cells' form), its fill values and categories from the rows ``rows`` only (the
    training split; default: all).

    Args:
      table: a ``pyarrow.Table``.
      names: the feature columns, in order.
      categorical: integer columns to treat as categories (text columns always are).
      encoding: ``onehot`` or ``embedding``.
      where: the data's name, for error messages.
      rows: the indices of the rows to fit on.
    """
    pa = _pyarrow()
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    missing_columns(table.column_names, list(categorical), where, "the categorical columns")
    chosen = set(categorical)
    kinds = [_kind(pa, table.column(name), name, where, name in chosen) for name in names]
    train = table.select(list(names)) if rows is None else table.select(list(names)).take(rows)
    numeric = [name for name, kind in zip(names, kinds) if kind != "categorical"]
    values = _number_matrix(pa, train, numeric, where)
    gaps = np.isnan(values)
    present = (~gaps).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(present > 0, np.where(gaps, 0.0, values).sum(axis=0) / np.maximum(present, 1), 0.0)
    stats = {name: (float(means[i]), bool(gaps[:, i].any())) for i, name in enumerate(numeric)}
    out = []
    for name, kind in zip(names, kinds):
        if kind != "categorical":
            out.append(Column(name, kind, *stats[name]))
            continue
        column = train.column(name)
        categories = _categories(pa, column, name, where)
        out.append(Column(name, kind, indicator=column.null_count > 0 and encoding == "onehot", categories=categories))
    return Encoder(tuple(out), encoding)


def _categories(pa, column, name: str, where: str) -> tuple[str, ...]:
    """A categorical column's distinct values, sorted; refuses an identifier or free text."""
    values = _as_text(pa, column).drop_null().unique().to_pylist()
    present = len(column) - column.null_count
    if len(values) > MAX_CATEGORIES or (len(values) > ID_CATEGORIES and len(values) * 2 > present):
        column_name = escape(f"{where}: column {name!r}")
        raise ArgumentError(
            f"{column_name} has {len(values)} distinct values in {present} training rows: an identifier or free text "
            "rather than categories; leave it out with {0}",
            "ignore",
        )
    return tuple(sorted(values))


def string_type():
    return _pyarrow().string()


def text_of(column):
    """A column's values as text (:func:`class_indices` reads class names so)."""
    return _as_text(_pyarrow(), column)


def _as_text(pa, column):
    """A categorical column's values as text (integers and booleans written as Python writes them)."""
    t = column.type
    if pa.types.is_dictionary(t):
        return column.cast(pa.string())
    if pa.types.is_boolean(t):  # true / false, as the files write them
        return pa.compute.if_else(column, "true", "false")
    return column.cast(pa.string())


def check_finite(table, names: Sequence[str], where: str) -> None:
    """Refuses a value of the float columns among ``names`` that is not finite within float32
    range, naming its row as the file numbers it (1 for the first data row): call it on the table
    as read, before rows are left out or split."""
    pa = _pyarrow()
    for name in names:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            _number_matrix(pa, pa.table({name: column}), [name], where)


def _number_matrix(pa, table, names: Sequence[str], where: str) -> np.ndarray:
    """Numeric or boolean columns ``names`` of ``table`` as ``(n, k)`` float64 (NaN for a gap);
    refuses a value that is not finite within float32 range, naming its row and column."""
    out = np.empty((table.num_rows, len(names)), np.float64)
    for j, name in enumerate(names):
        column = table.column(name)
        if pa.types.is_date(column.type) or pa.types.is_timestamp(column.type):
            out[:, j] = _days(pa, column)
            continue
        if not (pa.types.is_floating(column.type) and column.null_count == 0):
            column = column.cast(pa.float64())  # integers, booleans (0, 1), gaps (null: NaN)
        out[:, j] = column.to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        bad = np.abs(out) > _FLOAT32_MAX  # False for NaN (a gap)
    if bad.any():
        row, j = (int(i) for i in np.argwhere(bad)[0])
        raise TableError(
            f"{where}: row {row + 1}, column {names[j]!r}: {float(out[row, j])!r} is not a finite number within "
            "float32 range; fix or drop the value"
        )
    return out


_PER_DAY = {"s": 86400.0, "ms": 86400e3, "us": 86400e6, "ns": 86400e9}


def _days(pa, column) -> np.ndarray:
    """A date or timestamp column as float64 days since 1970-01-01 (a time of day as the day's
    fraction, in UTC; NaN for a gap)."""
    t = column.type
    if pa.types.is_date32(t):
        per_day, column = 1.0, column.cast(pa.int32())
    elif pa.types.is_date64(t):
        per_day, column = _PER_DAY["ms"], column.cast(pa.int64())
    else:
        per_day, column = _PER_DAY[t.unit], column.cast(pa.int64())
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False) / per_day


def calendar(days, xp=np):
    """The :data:`DATE_FEATURES` ``(n, 5)`` of days since 1970-01-01 ``(n,)`` (float, no NaN): the
    proleptic Gregorian calendar in integer arithmetic (H. Hinnant's ``civil_from_days``), written
    once for numpy and ``jax.numpy``."""
    whole = xp.floor(days).astype(xp.int32)
    z = whole + 719468  # days since 0000-03-01
    era = z // 146097
    doe = z - era * 146097  # day of the 400-year era, 0..146096
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    march_day = doe - (365 * yoe + yoe // 4 - yoe // 100)  # 0..365, from March 1
    mp = (5 * march_day + 2) // 153
    month = xp.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    january = (year - 1) // 400  # day of the year: from the day before the year's March 1
    before = year - 1 - january * 400
    jan1 = january * 146097 + before * 365 + before // 4 - before // 100 + 306 - 719468
    weekday = (whole + 3) % 7  # 1970-01-01 was a Thursday
    parts = (year, month, weekday, whole - jan1 + 1)
    return xp.stack([p.astype(days.dtype) for p in parts] + [days], axis=1)


# ----------------------------------------------------------------------------- encoding


def types_of(encoder: Encoder) -> dict:
    """``{column: pyarrow type}`` to read a file's columns as the encoder expects them (a date
    column is left to the reader: a date, or a time with or without a zone, each its own type)."""
    pa = _pyarrow()
    kinds = {"numeric": pa.float64(), "boolean": pa.bool_(), "categorical": pa.string()}
    return {c.name: kinds[c.kind] for c in encoder.columns if c.kind in kinds}


def raw_matrix(table, encoder: Encoder, where: str = "data") -> np.ndarray:
    """``(n, c)`` float64 of the encoder's columns of ``table``: numbers (NaN for a gap), a
    category's index in its vocabulary (NaN for a gap, -1 for a value the training rows lacked)."""
    pa = _pyarrow()
    missing_columns(table.column_names, encoder.names, where, "the model's columns")
    out = np.empty((table.num_rows, len(encoder.columns)), np.float64)
    numeric = [j for j, c in enumerate(encoder.columns) if c.kind != "categorical"]
    for j in numeric:
        c, t = encoder.columns[j], table.column(encoder.columns[j].name).type
        number = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        date = pa.types.is_date(t) or pa.types.is_timestamp(t)
        if not ((date if c.kind == "date" else number) or pa.types.is_null(t)):
            if c.kind == "date" and (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise _not_dates(table.column(c.name).to_pylist(), where, c.name)
            wanted = "dates (2012-01-31, or a date and time)" if c.kind == "date" else "numbers"
            raise TableError(f"{where}: column {c.name!r} holds {t} values; the model expects {wanted}")
    out[:, numeric] = _number_matrix(pa, table, [encoder.columns[j].name for j in numeric], where)
    for j, c in enumerate(encoder.columns):
        if c.kind == "categorical":
            out[:, j] = _codes(pa, table.column(c.name), c.categories)
    return out


def _codes(pa, column, categories: Sequence[str]) -> np.ndarray:
    """A column's values as indices into ``categories`` (float64: NaN for a gap, -1 if unseen)."""
    text = column.cast(pa.string()) if pa.types.is_null(column.type) else _as_text(pa, column)
    index = pa.compute.index_in(text, value_set=pa.array(list(categories), pa.string()))
    codes = index.to_numpy(zero_copy_only=False).astype(np.float64)  # NaN: a gap or an unseen value
    codes[np.isnan(codes) & ~text.is_null().to_numpy(zero_copy_only=False)] = -1.0
    return codes


class _Plan(NamedTuple):
    numeric: np.ndarray  # raw columns of the numbers
    fills: np.ndarray  # their fill values
    indicated: np.ndarray  # raw columns with a gap indicator
    expanded: list  # (raw column, its Column) of each categorical and date column
    order: np.ndarray | None  # the features' positions among the pieces (None: already in order)


def _plan(encoder: Encoder) -> _Plan:
    """Where each feature of :func:`encode` comes from: the pieces are the filled numbers, the
    indicators, then each categorical column's one-hot block (or code) and each date's calendar."""
    cols = encoder.columns
    numeric = [j for j, c in enumerate(cols) if c.kind in ("numeric", "boolean")]
    indicated = [j for j, c in enumerate(cols) if c.indicator]
    expanded = [(j, c) for j, c in enumerate(cols) if c.kind in ("categorical", "date")]
    slot = {j: i for i, j in enumerate(numeric)}
    flag = {j: len(numeric) + i for i, j in enumerate(indicated)}
    start, block = len(numeric) + len(indicated), {}
    for j, c in expanded:
        block[j] = start
        start += encoder.width(c)
    order = []
    for j, c in enumerate(cols):
        order += [slot[j]] if j in slot else range(block[j], block[j] + encoder.width(c))
        if c.indicator:
            order.append(flag[j])
    order = np.asarray(order, np.int32)
    fills = np.asarray([cols[j].fill for j in numeric], np.float64)
    same = bool(np.array_equal(order, np.arange(len(order))))
    return _Plan(np.asarray(numeric, np.int32), fills, np.asarray(indicated, np.int32), expanded,
                 None if same else order)  # fmt: skip


def encode(raw, encoder: Encoder, xp=np):
    """Features ``(n, d)`` float32 of the raw matrix ``(n, c)`` (:func:`raw_matrix`): gaps filled
    with the training mean (plus their 0/1 indicator), dates as their :func:`calendar`, categories
    one-hot (a gap or an unseen value: all zeros) or as codes 0..V (V: a gap or unseen). ``xp``:
    numpy or ``jax.numpy``."""
    plan = _plan(encoder)
    numbers = raw[:, plan.numeric]
    pieces = [xp.where(xp.isnan(numbers), plan.fills[None, :].astype(numbers.dtype), numbers)]
    pieces.append(xp.isnan(raw[:, plan.indicated]))
    for j, c in plan.expanded:
        value = raw[:, j]
        if c.kind == "date":
            pieces.append(calendar(xp.where(xp.isnan(value), xp.asarray(c.fill, value.dtype), value), xp))
        elif encoder.encoding == "onehot":
            pieces.append(value[:, None] == xp.arange(len(c.categories), dtype=value.dtype)[None, :])
        else:
            pieces.append(xp.where(xp.isnan(value) | (value < 0), len(c.categories), value)[:, None])
    x = xp.concatenate([p.astype(xp.float32) for p in pieces], axis=1)
    return x if plan.order is None else x[:, plan.order]


# ----------------------------------------------------------------------------- what was done


class Report(NamedTuple):
    """What reading a table did to it beyond reading its cells, for the user to see.

    Attributes:
      rows: the data rows read.
      dropped: rows left out for having no target value.
      ignored: the columns left out (``ignore``).
      gaps: ``{column: cells}`` gaps filled (:func:`encode`: the training mean, or no category).
      unseen: ``{column: cells}`` categories the training rows lacked, encoded as no category.
      index: 1 when the first column was left out as a saved row index (:func:`saved_index`),
        else None.
    """

    rows: int = 0
    dropped: int = 0
    ignored: tuple[str, ...] = ()
    gaps: dict | None = None
    unseen: dict | None = None
    index: int | None = None


def report_of(raw: np.ndarray, encoder: Encoder, **fields) -> Report:
    """The :class:`Report` of a raw matrix ``(n, c)`` (:func:`raw_matrix`): its gaps and unseen
    categories by column; ``fields``: the report's other fields."""
    gaps = np.isnan(raw).sum(axis=0)
    unseen = (raw == -1).sum(axis=0)
    names = encoder.names
    return Report(
        rows=fields.pop("rows", len(raw)),
        gaps={names[j]: int(k) for j, k in enumerate(gaps) if k},
        unseen={names[j]: int(k) for j, k in enumerate(unseen) if k and encoder.columns[j].kind == "categorical"},
        **fields,
    )


def merged(a: Report, b: Report) -> Report:
    """Two reports of parts of one table as one (their counts summed)."""

    def add(x, y):
        return {k: (x or {}).get(k, 0) + (y or {}).get(k, 0) for k in {**(x or {}), **(y or {})}}

    return Report(a.rows + b.rows, a.dropped + b.dropped, a.ignored or b.ignored, add(a.gaps, b.gaps),
                  add(a.unseen, b.unseen), a.index or b.index)  # fmt: skip


def _fill_text(c: Column) -> str:
    if c.kind == "categorical":
        return "as no category"
    if c.kind == "date":
        return f"with the training rows' mean date {_date_text(c.fill)}"
    return f"with the training rows' mean {c.fill:.6g}"


def _date_text(days: float) -> str:
    import datetime

    try:
        return (datetime.date(1970, 1, 1) + datetime.timedelta(days=int(np.floor(days)))).isoformat()
    except OverflowError:
        return f"{days:.6g} days from 1970-01-01"


def report_lines(report: Report, encoder: Encoder, where: str) -> list[str]:
    """The report as lines for a user: the rows left out, each column's gaps filled and with what,
    each column's unseen categories (empty when nothing was done)."""
    lines = []
    if report.index is not None:
        lines.append(f"{where}: the first column has no name and holds each row's own integer (a saved row index, "
                     "as DataFrame.to_csv writes): left out")  # fmt: skip
    if report.dropped:
        lines.append(f"{where}: {report.dropped} of {report.rows} rows have no target value: left out")
    by_name = {c.name: c for c in encoder.columns}
    if report.gaps:
        shown = []
        for name, k in report.gaps.items():
            c = by_name[name]
            flag = f" (flagged in {c.name + ' (missing)'!r})" if c.indicator else ""
            shown.append(f"{name!r} {k} {_fill_text(c)}{flag}")
        lines.append(f"{where}: gaps filled: " + "; ".join(shown))
    if report.unseen:
        shown = [f"{name!r} {k}" for name, k in report.unseen.items()]
        lines.append(f"{where}: categories the training rows lacked, encoded as no category: " + "; ".join(shown))
    return lines


def report_json(report: Report, encoder: Encoder) -> dict:
    """The report as JSON (a run folder's ``data.json``)."""
    by_name = {c.name: c for c in encoder.columns}
    gaps = {}
    for name, k in (report.gaps or {}).items():
        c = by_name[name]
        fill = None if c.kind == "categorical" else (_date_text(c.fill) if c.kind == "date" else c.fill)
        gaps[name] = {"cells": k, "filled_with": fill, "indicator": c.indicator}
    return {
        "rows": report.rows,
        "rows_without_target": report.dropped,
        "ignored": list(report.ignored),
        "index_column": report.index,
        "gaps": gaps,
        "unseen_categories": dict(report.unseen or {}),
        "date_features": list(DATE_FEATURES) if any(c.kind == "date" for c in encoder.columns) else [],
    }


# ----------------------------------------------------------------------------- targets


def class_names(table, name: str, where: str = "data") -> tuple[np.ndarray, tuple[str, ...]] | None:
    """For a text or boolean target column: ``(labels (n,) int32, class names sorted)``; None for
    a numeric one. Refuses gaps in the target."""
    pa = _pyarrow()
    column = table.column(name)
    _refuse_target_gaps(column, name, where)
    t = column.type
    if not (
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t) or pa.types.is_boolean(t)
    ):
        return None
    text = _as_text(pa, column)
    classes = tuple(sorted(text.unique().to_pylist()))
    return class_indices(text, classes, where), classes


def row_numbers(table, names: Sequence[str]) -> list[str]:
    """The integer columns among ``names`` that count the rows (0 or 1, then +1 on each row, 10
    rows at least): a row id. As a feature it leaks the file's order (a table sorted by its
    target)."""
    pa = _pyarrow()
    found = []
    for name in names:
        column = table.column(name)
        if not pa.types.is_integer(column.type) or column.null_count or len(column) < 10:
            continue
        values = column.to_numpy()
        if values[0] in (0, 1) and np.array_equal(np.diff(values), np.ones(len(values) - 1, values.dtype)):
            found.append(name)
    return found


def saved_index(table) -> str | None:
    """The name (empty) of the table's first column when it is a saved row index: no name in the
    header, integers, each one once (``DataFrame.to_csv`` writes the index so, also of a filtered
    or shuffled frame); else None."""
    pa = _pyarrow()
    if not table.column_names or table.column_names[0].strip():
        return None
    column = table.column(0)
    if not pa.types.is_integer(column.type) or column.null_count:
        return None
    values = column.to_numpy()
    return table.column_names[0] if len(np.unique(values)) == len(values) else None


def rows_with_targets(table, names: Sequence[str]):
    """``(table, dropped)``: the rows whose every target column holds a value (not empty, not
    NaN), and how many were left out."""
    import pyarrow.compute as pc

    keep = None
    for name in names:
        column = table.column(name)
        valid = pc.is_valid(column)
        if _pyarrow().types.is_floating(column.type):
            valid = pc.and_(valid, pc.invert(pc.is_nan(column)))
        keep = valid if keep is None else pc.and_(keep, valid)
    kept = table.filter(keep)
    return kept, table.num_rows - kept.num_rows


def _refuse_target_gaps(column, name: str, where: str) -> None:
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise TableError(
            f"{where}: row {row + 1} has no value in the target column {name!r} ({column.null_count} such rows); "
            "drop those rows or fill them in"
        )


def class_indices(text, classes: Sequence[str], where: str = "data") -> np.ndarray:
    """Class names (a pyarrow or numpy array of text) as indices into ``classes``; refuses a name
    that is not one of them."""
    pa = _pyarrow()
    text = (
        text
        if isinstance(text, (pa.Array, pa.ChunkedArray))
        else pa.array([str(v) for v in np.asarray(text)], pa.string())
    )
    index = pa.compute.index_in(text, value_set=pa.array(list(classes), pa.string()))
    codes = index.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(np.isnan(codes.astype(np.float64)))
    if bad.size:
        raise TableError(
            f"{where}: row {int(bad[0]) + 1}: class {text[int(bad[0])].as_py()!r} is not one the model knows "
            f"({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})"
        )
    return codes.astype(np.int32)


def target_values(table, names: Sequence[str], where: str = "data") -> np.ndarray:
    """``(n, k)`` float64 of numeric target columns; refuses gaps and non-numbers."""
    pa = _pyarrow()
    columns = []
    for name in names:
        column = table.column(name)
        _refuse_target_gaps(column, name, where)
        if not (
            pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)
        ):
            raise TableError(
                f"{where}: the target column {name!r} holds {column.type} values; several targets must be numbers"
            )
        columns.append(name)
    return _number_matrix(pa, table, columns, where)
