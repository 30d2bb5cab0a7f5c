"""Data that is not resident on the device: memory-mapped arrays, iterables, Grain, Parquet.

Host side only (numpy; pyarrow and grain are imported when used). :func:`jaxnet.fit` meets two
kinds of source, and :func:`as_source` tells which a value is:

- **indexed** (:class:`Indexed`): ``num_rows`` and ``read(rows) -> (x, y)`` for any rows, so an
  epoch is shuffled globally by index (the same keyed permutation as resident data). Memory-mapped
  ``.npy`` arrays (:func:`npy_folder`, ``np.load(..., mmap_mode="r")``), lazy :class:`RowView`
  rows and Grain ``MapDataset`` s of examples are indexed.
- **sequential** (:class:`Sequential`): ``blocks(seed)`` yields ``(x, y)`` blocks with a leading
  example axis, each epoch from the start; :func:`batches_of` cuts them into batches, shuffling
  through a buffer of rows when asked. Python iterables of batches, Grain ``IterDataset`` s and
  ``DataLoader`` s, and Parquet files (:class:`Parquet`, row groups in a keyed order) are sequential.

Every block is checked against the first (row shape, dtype, matching lengths); a source that
breaks the rule, cannot be read or yields nothing raises :class:`DataError`, one line naming the
batch or row group and the fix.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import collections
import itertools
import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PARQUET_EXTRA = "pip install 'jaxnet-trainer[data]'"


class DataError(ValueError):
    """A source broke its contract (shapes, dtypes, length) or could not be read."""


class RowSpec(NamedTuple):
    """The shape and dtype of one example's ``x`` and ``y`` (without the example axis)."""

    x_shape: tuple
    x_dtype: np.dtype
    y_shape: tuple
    y_dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.x_shape)) * self.x_dtype.itemsize + int(np.prod(self.y_shape)) * self.y_dtype.itemsize


def _mapping(array) -> mmap.mmap | None:
    """The read-only memory map under ``array`` (a ``np.memmap`` or a view of one), if any."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        if getattr(base, "mode", None) not in (None, "r"):
            return None  # copy-on-write or writable maps keep their pages
        base = getattr(base, "base", None)
    return base


def release_pages(*arrays) -> None:
    """Drops the pages of read-only memory maps from this process (the file stays in the page
    cache): reading a file larger than memory through a map keeps the process's resident memory
    bounded by what was read since the last release."""
    for a in arrays:
        if isinstance(a, RowView):
            a.release()
            continue
        mapped = _mapping(a)
        if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)


def is_resident(value) -> bool:
    """Whether ``value`` is an in-memory array that :func:`jaxnet.fit` places on the device whole."""
    if isinstance(value, np.memmap) or _mapping(value) is not None:
        return False
    return isinstance(value, np.ndarray) or type(value).__module__.split(".")[0] in ("jax", "jaxlib")


def _row_spec(x, y) -> RowSpec:
    return RowSpec(tuple(x.shape[1:]), np.dtype(x.dtype), tuple(y.shape[1:]), np.dtype(y.dtype))


class _Rows:
    """What an array-like of rows offers besides indexing: ``shape`` and ``dtype`` set by the subclass."""

    shape: tuple
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class RowView(_Rows):
    """Rows of an array-like, read lazily: ``view[rows]`` gathers (and transforms) only those rows.

    Args:
      base: an array-like with a leading example axis (a ``np.memmap``, another view).
      index: the base rows this view holds, in order (None: all of them).
      transform: applied to each gathered block, ``(m, ...) -> (m, ...)`` (e.g. standardization).
      dtype: the dtype of the transformed rows (default: the base's).
    """

    def __init__(self, base, index=None, transform: Callable | None = None, dtype=None):
        self.base, self.transform = base, transform
        self.index = None if index is None else np.asarray(index, np.int64)
        self.dtype = np.dtype(dtype if dtype is not None else base.dtype)
        n = len(base) if self.index is None else len(self.index)
        self.shape = (n, *base.shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, np.int64)
        block = gather(self.base, rows if self.index is None else self.index[rows])
        if self.transform is None:
            return block
        out = aligned_empty(block.shape, self.dtype)
        out[...] = self.transform(block)
        return out

    def release(self) -> None:
        release_pages(self.base)


ALIGNMENT = 64
"""Byte alignment of the arrays read for the device: XLA's CPU client then uses them in place
(``jax.device_put`` without a copy); numpy's own large allocations are only 16-byte aligned."""


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized array whose data starts on an ``ALIGNMENT``-byte boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def padded_rows(block: np.ndarray, rows: int) -> np.ndarray:
    """``block`` ``(m, ...)`` with zero rows appended up to ``rows`` (unchanged when it has them)."""
    if len(block) >= rows:
        return block
    return np.concatenate([block, np.zeros((rows - len(block), *block.shape[1:]), block.dtype)])


GATHER_BLOCK_ROWS = 2048
"""Rows gathered from a memory map between two releases of its pages. The kernel maps the cached
pages around each one touched (fault-around, 64 KiB), so random rows would otherwise map most of
a file into the process at once; a block of rows maps at most a few hundred MiB."""


def _take(array: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``array[rows]`` into ``out`` (negative rows count from the end, as in numpy), the rows
    checked first: numpy's ``take`` with ``out`` and its default ``mode="raise"`` buffers the
    whole result (about 3x slower than ``"clip"``)."""
    n = len(array)
    if len(rows) and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"rows {rows.min()}..{rows.max()} outside the {n} rows")
    if len(rows) and rows.min() < 0:
        rows = np.where(rows < 0, rows + n, rows)
    return np.take(array, rows, axis=0, out=out, mode="clip")


def gather(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` read in increasing row order (sequential on disk), returned in ``rows``'
    order; from a read-only memory map in blocks, its pages released after each."""
    if not isinstance(array, np.ndarray) or len(rows) <= 1:
        return np.asarray(array[rows])  # lazy rows and NpyFile order their own reads
    out = aligned_empty((len(rows), *array.shape[1:]), array.dtype)
    if _mapping(array) is None:  # in memory: no order to prefer
        return _take(array, rows, out)
    order = np.argsort(rows, kind="stable")
    for start in range(0, len(rows), GATHER_BLOCK_ROWS):
        part = order[start : start + GATHER_BLOCK_ROWS]
        out[part] = _take(array, rows[part], np.empty((len(part), *array.shape[1:]), array.dtype))
        release_pages(array)
    return out


CHUNK_READ_BYTES = 8 * 2**20
"""Bytes of one block when lazy rows are read through in order (checks, standardization)."""


def block_rows(array, budget: int = CHUNK_READ_BYTES) -> int:
    """Rows of ``array`` in a block of about ``budget`` bytes (at least 1)."""
    row = int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
    return max(1, budget // max(row, 1))


def chunks_of(array, rows: int | None = None) -> Iterator[np.ndarray]:
    """``array`` (an array-like) in consecutive blocks of at most ``rows`` rows (default: about
    ``CHUNK_READ_BYTES``), releasing the pages of a memory map after each."""
    rows = rows or block_rows(array)
    for start in range(0, len(array), rows):
        yield np.asarray(array[start : start + rows])
        release_pages(array)


class Indexed:
    """A random-access source: ``x`` and ``y`` array-likes with the same number of rows."""

    kind = "indexed"

    def __init__(self, x, y, name: str = "data"):
        if len(x) != len(y):
            raise DataError(f"{name}: x has {len(x)} rows but y has {len(y)}: give as many targets as inputs")
        if len(x) == 0:
            raise DataError(f"{name} is empty: give at least one example")
        self.x, self.y, self.name = x, y, name
        self.num_rows = len(x)
        self.spec = _row_spec(x, y)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The examples at ``rows`` (int64), as ``(x: (m, ...), y: (m, ...))`` numpy arrays."""
        try:
            return gather(self.x, rows), gather(self.y, rows)
        except DataError:
            raise
        except Exception as e:  # whatever the array-like raised: say where, keep its message
            raise DataError(f"{self.name}: reading {len(rows)} rows failed ({type(e).__name__}: {e})") from None

    def release(self) -> None:
        release_pages(self.x, self.y)


def _pair(element, where: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(element, dict) and "x" in element and "y" in element:
        element = (element["x"], element["y"])
    if not isinstance(element, (tuple, list)) or len(element) != 2:
        raise DataError(f"{where} is a {type(element).__name__}, not a pair (x, y): yield (x, y) or {{'x': x, 'y': y}}")
    return np.asarray(element[0]), np.asarray(element[1])


class GrainMap:
    """A Grain ``MapDataset`` (or any sized, indexable dataset) of ``(x, y)`` examples."""

    kind = "indexed"

    def __init__(self, dataset, name: str = "the Grain dataset"):
        self.dataset, self.name = dataset, name
        self.num_rows = len(dataset)
        if self.num_rows == 0:
            raise DataError(f"{name} is empty: give at least one example")
        x, y = _pair(dataset[0], f"example 0 of {name}")
        self.spec = RowSpec(x.shape, x.dtype, y.shape, y.dtype)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs = np.empty((len(rows), *self.spec.x_shape), self.spec.x_dtype)
        ys = np.empty((len(rows), *self.spec.y_shape), self.spec.y_dtype)
        for i, r in enumerate(rows):
            try:
                element = self.dataset[int(r)]
            except Exception as e:  # the dataset's own failure, named
                raise DataError(f"reading example {int(r)} of {self.name} failed ({type(e).__name__}: {e})") from None
            x, y = _pair(element, f"example {int(r)} of {self.name}")
            _check_block(RowSpec(x.shape, x.dtype, y.shape, y.dtype), self.spec, f"example {int(r)} of {self.name}")
            xs[i], ys[i] = x, y
        return xs, ys

    def release(self) -> None:
        pass


def _check_block(got: RowSpec, want: RowSpec, where: str) -> None:
    if got != want:
        raise DataError(
            f"{where} has x rows {got.x_shape} {got.x_dtype} and y rows {got.y_shape} {got.y_dtype}, but the first "
            f"had {want.x_shape} {want.x_dtype} and {want.y_shape} {want.y_dtype}: give every batch the same row "
            "shapes and dtypes"
        )


class _Peekable:
    """An iterator read in one pass, which a first look (:meth:`Sequential.first_spec`) may precede:
    a look reads the first element and stops; the pass after it starts with that element again,
    then goes on where the iterator stands. Once a pass has gone past it, no pass sees it again:
    a pass after the iterator's end yields nothing. ``read``: the elements taken from the iterator."""

    def __init__(self, iterator: Iterator):
        self.iterator, self.head, self.read = iterator, [], 0

    def __iter__(self) -> Iterator:
        if not self.head:
            for element in self.iterator:
                self.head.append(element)
                self.read += 1
                break
        if self.head:
            yield self.head[0]
            self.head.clear()  # (not reached by a look, which stops at the first element)
        for element in self.iterator:
            self.read += 1
            yield element


class _Continued:
    """One pass over the batches of a one-pass source, which each round of a fit by steps continues
    instead of reading the source again: :meth:`starting_at` the round's first batch, the batches
    that the last round read ahead and did not train on (at most ``keep``, which must exceed the
    read-ahead) handed out again."""

    def __init__(self, batches: Iterator, keep: int):
        self.batches, self.keep = batches, keep
        self.kept: collections.deque = collections.deque()  # (index, batch), the newest ``keep``
        self.read = 0

    def starting_at(self, start: int) -> Iterator:
        while self.kept and self.kept[0][0] < start:
            self.kept.popleft()
        if self.kept and self.kept[0][0] > start:  # (a read-ahead beyond ``keep``: a bug, never data)
            raise RuntimeError(f"batch {start} of a one-pass source was read ahead and not kept")
        for _, batch in list(self.kept):
            yield batch
        for _ in range(start - self.read):  # a resumed run: the new iterator's first batches skipped
            if next(self.batches, None) is None:
                return
            self.read += 1
        for batch in self.batches:
            self.kept.append((self.read, batch))
            self.read += 1
            if len(self.kept) > self.keep:
                self.kept.popleft()
            yield batch


class Sequential:
    """A source read in order: a re-iterable of ``(x, y)`` blocks with a leading example axis.

    Args:
      iterable: iterated afresh each epoch (a list, a Grain ``IterDataset``/``DataLoader``, an
        object whose ``__iter__`` starts over); it must yield the same blocks each time for a
        resumed run to be exact.
      name: how errors name it.
    """

    kind = "sequential"

    def __init__(self, iterable: Iterable, name: str = "the data", once: bool = False):
        if iter(iterable) is iterable:
            if not once:
                raise DataError(
                    f"{name} is an iterator, which can be read only once: pass an iterable that starts over when "
                    "iterated (a list, a Grain dataset, an object with __iter__), since every epoch reads it again"
                )
            iterable = _Peekable(iterable)
        self.iterable, self.name = iterable, name
        self.spec: RowSpec | None = None
        self.once = isinstance(iterable, _Peekable)
        self._pass: _Continued | None = None

    def continued(self, start: int, batches: Callable[[], Iterator], keep: int) -> Iterator:
        """A one-pass source's batches from batch ``start`` of its epoch: a new pass of
        ``batches()`` at 0, else the pass that the last round left (which a re-iterable source
        reads again instead)."""
        if start == 0 or self._pass is None:
            self._pass = _Continued(batches(), keep)
        return self._pass.starting_at(start)

    def blocks(self, seed: int, shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The blocks of one epoch (``seed`` and ``shuffle`` are unused: the iterable has its own order)."""
        return self._checked(iter(self.iterable), "batch")

    def inputs(self) -> Iterator[np.ndarray]:
        """The inputs of one pass, in order: each element's ``x`` (of an ``(x, y)`` pair, an ``(x,)``
        tuple or an ``{"x": ...}`` dict; any other element is inputs itself), their rows checked alike."""
        first = None
        for i, element in self._elements(iter(self.iterable), "batch"):
            where = f"batch {i} of {self.name}"
            if isinstance(element, dict):
                if "x" not in element:
                    raise DataError(f"{where} is a dict without 'x': yield {{'x': inputs, ...}} or arrays of inputs")
                element = element["x"]
            pair = isinstance(element, (tuple, list)) and len(element) in (1, 2)  # (x,) or (x, y)
            x = np.asarray(element[0] if pair else element)
            if x.ndim == 0:
                raise DataError(f"{where} is a scalar: yield batches of inputs with a leading example axis")
            first = first or (x.shape[1:], x.dtype)
            if (x.shape[1:], x.dtype) != first:
                raise DataError(
                    f"{where} has rows {x.shape[1:]} {x.dtype}, but the first had {first[0]} {first[1]}: give every "
                    "batch the same row shapes and dtypes"
                )
            yield x

    def _elements(self, elements: Iterator, unit: str) -> Iterator[tuple[int, Any]]:
        """``(i, element)`` of the user's iterator, its failures named; refuses one that yields nothing."""
        i = 0
        while True:
            try:
                element = next(elements)
            except StopIteration:
                break
            except DataError:
                raise
            except Exception as e:  # the user's iterable failed: say where, keep its message
                raise DataError(f"reading {unit} {i} of {self.name} failed ({type(e).__name__}: {e})") from None
            yield i, element
            i += 1
        if i == 0 and isinstance(self.iterable, _Peekable) and self.iterable.read:
            raise DataError(
                f"{self.name} is an iterator, which ended after {self.iterable.read} {unit}es, before the fit's steps "
                "were done: give an endless iterator, an iterable that starts over (a list, a Grain dataset) or fewer "
                "steps"
            )
        if i == 0:
            raise DataError(f"{self.name} yielded no {unit}es: give it at least one (an iterator read up already?)")

    def _checked(self, blocks: Iterator, unit: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, element in self._elements(blocks, unit):
            x, y = _pair(element, f"{unit} {i} of {self.name}")
            where = f"{unit} {i} of {self.name}"
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise DataError(
                    f"{where} has x of shape {x.shape} and y of shape {y.shape}: yield batches with a leading example "
                    "axis, as many targets as inputs"
                )
            spec = _row_spec(x, y)
            if self.spec is None:
                self.spec = spec
            _check_block(spec, self.spec, where)
            yield x, y

    def first_spec(self) -> RowSpec:
        """The row spec, from the first block (read once, when not known yet)."""
        if self.spec is None:
            next(self.blocks(0, shuffle=False))
        return self.spec

    def release(self) -> None:
        pass


class Parquet(Sequential):
    """A Parquet file read one row group at a time (pyarrow), its groups in a keyed order.

    Args:
      path: the ``.parquet`` file.
      target: the target column (None: features only, ``y`` None: for :func:`jaxnet.predict`).
      features: the feature columns, in order (default: every other column).
      y_dtype: ``y``'s dtype (int32 labels or float32 targets; default: int32 for an integer or
        boolean target column, float32 for others). A value the dtype cannot hold exactly (0.5 as
        an integer label) is refused, as is a NaN or infinite value in any column read.
      optional_target: a file without the target column is read for its features (``y`` None).

    Each epoch visits the row groups in an order drawn from the epoch's seed and shuffles the
    rows within each group (``blocks(seed, shuffle=False)``: the file's order). Memory holds one group.
    """

    def __init__(self, path, target: str | None, features=None, y_dtype=None, name=None, optional_target: bool = False):
        pq = _pyarrow_parquet()
        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        try:
            self.file = pq.ParquetFile(self.path)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.name} is not a readable Parquet file ({type(e).__name__}: {e})") from None
        columns = list(self.file.schema_arrow.names)
        if target is not None and target not in columns:
            if not optional_target:
                raise DataError(
                    f"{self.name} has no column {target!r}: choose the target among {', '.join(columns[:8])}"
                )
            target = None
        self.features = [c for c in columns if c != target] if features is None else list(features)
        missing = [c for c in self.features if c not in columns]
        if missing:
            raise DataError(f"{self.name} lacks the feature columns {', '.join(map(repr, missing[:5]))}")
        self.target, self.y_dtype = target, np.dtype(y_dtype or self._column_dtype(target))
        self.num_groups = self.file.num_row_groups
        self.num_rows = self.file.metadata.num_rows
        self.spec = RowSpec((len(self.features),), np.dtype(np.float32), (), self.y_dtype)
        if self.num_rows == 0:
            raise DataError(f"{self.name} has no rows")

    def _column_dtype(self, name: str | None) -> np.dtype:
        """int32 for an integer or boolean column (class ids), float32 for others (or none)."""
        if name is None:
            return np.dtype(np.float32)
        kind = self.file.schema_arrow.field(name).type
        whole = str(kind) == "bool" or str(kind).startswith(("int", "uint"))
        return np.dtype(np.int32 if whole else np.float32)

    def read_group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            wanted = [*self.features, *([self.target] if self.target is not None else [])]
            table = self.file.read_row_group(g, columns=wanted)
            x = np.stack([_column(table, c, self.name, g, np.float32) for c in self.features], axis=1)
            y = None if self.target is None else _column(table, self.target, self.name, g, self.y_dtype)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"row group {g} of {self.name} cannot be read ({type(e).__name__}: {e})") from None
        return x, y

    def blocks(self, seed: int, shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.num_groups) if shuffle else range(self.num_groups)
        for g in order:
            x, y = self.read_group(int(g))
            if shuffle:
                rows = rng.permutation(len(x))
                x, y = x[rows], (None if y is None else y[rows])
            yield x, y


def _column(table, name: str, file: str, group: int, dtype) -> np.ndarray:
    """Column ``name`` of a row group as ``dtype``; refuses gaps, text, NaN or infinite values and
    values ``dtype`` would change (a float label cast to an integer)."""
    column = table.column(name)
    where = f"row group {group} of {file}: column {name!r}"
    if column.null_count:
        raise DataError(f"{where} has {column.null_count} missing values: fill or drop them")
    values = column.to_numpy()
    if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
        raise DataError(f"{where} is {column.type}, not numeric")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        row = int(np.argmin(np.isfinite(values)))
        raise DataError(f"{where} holds {values[row]} at row {row} of the group: fill or drop it")
    cast = values.astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.array_equal(cast, values):
        row = int(np.argmax(cast != values))
        raise DataError(
            f"{where} holds {values[row].item()!r} at row {row} of the group, which an {np.dtype(dtype)} label cannot "
            "hold: give whole class ids, or y_dtype=np.float32 for a regression target"
        )
    return cast


def require_targets(source, name: str) -> None:
    """Refuses a source that holds no targets (a Parquet file opened without a target column)."""
    if isinstance(source, Parquet) and source.target is None:
        raise DataError(f"{name}: {source.name} was opened without a target column: name it (target=...)")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"Parquet files need pyarrow, which is not installed: {PARQUET_EXTRA}") from None
    return pq


class NpyFile(_Rows):
    """A ``.npy`` array on disk, read row by row with ``pread``: an array-like for data larger
    than memory. Reading rows costs no more memory than the rows read (the file's pages stay in
    the page cache, outside the process; a memory map would map whole cached folios around every
    row touched, hundreds of KiB each).

    Only the header is read when opened, and the file is checked to hold the bytes the header
    describes. ``view[rows]`` takes an integer array (read in increasing order, consecutive rows
    in one call) or a slice; ``reshape(n, -1)`` views each example as one row of features.
    """

    def __init__(self, path, shape=None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                header = read(f, max_header_size=10_000)
                self.offset = f.tell()
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{self.path} is not a readable .npy array ({type(e).__name__}: {e})") from None
        file_shape, fortran, dtype = header
        if fortran and len(file_shape) > 1:
            raise DataError(f"{self.path} is stored in Fortran order: save it C-ordered (np.ascontiguousarray)")
        if dtype.hasobject:
            raise DataError(f"{self.path} holds Python objects (it would need pickle): save a numeric array")
        self.dtype = np.dtype(dtype)
        self.shape = tuple(file_shape) if shape is None else tuple(shape)
        if len(self.shape) == 0:
            raise DataError(f"{self.path} holds a scalar: store an array with a leading example axis")
        needed = self.offset + math.prod(self.shape) * self.dtype.itemsize  # (exact: np.prod would wrap around)
        size = self.path.stat().st_size
        if size < needed:
            raise DataError(f"{self.path} is truncated: {size} bytes where its header describes {needed}")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def reshape(self, *shape) -> NpyFile:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[0] != self.shape[0]:
            raise ValueError("an NpyFile keeps its leading (example) axis")
        rest = int(np.prod(self.shape[1:]))
        out = tuple(rest if d == -1 else d for d in shape)
        if int(np.prod(out[1:])) != rest:
            raise ValueError(f"cannot view rows of shape {self.shape[1:]} as {out[1:]}")
        return NpyFile(self.path, out)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                out = aligned_empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    self._read_into(fd, out, start)
                finally:
                    os.close(fd)
                return out
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows, np.int64)
        if rows.ndim == 0:
            return self[int(rows) : int(rows) + 1][0]
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {self.path.name} with {len(self)} rows")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        buffer = np.empty((len(rows), *self.shape[1:]), self.dtype)
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1  # runs of consecutive rows: one read each
        fd = os.open(self.path, os.O_RDONLY)  # one per read: safe to copy, share between threads, pickle
        try:
            for begin, end in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                self._read_into(fd, buffer[begin:end], int(ordered[begin]))
        finally:
            os.close(fd)
        out = aligned_empty(buffer.shape, buffer.dtype)
        out[order] = buffer
        return out

    def _read_into(self, fd: int, out: np.ndarray, first_row: int) -> None:
        view, done = memoryview(out).cast("B"), 0
        offset = self.offset + first_row * self.row_bytes
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise DataError(f"{self.path} ended early: it was truncated while being read")
            done += got


def npy_folder(path, need_y: bool = True) -> dict[str, NpyFile]:
    """The arrays of a data folder, on disk: ``x.npy`` and ``y.npy``, optionally ``x_val.npy``
    and ``y_val.npy`` (nothing is read but the headers).

    Returns:
      ``{"x", "y"[, "x_val", "y_val"]}``: :class:`NpyFile` arrays, read by rows when used.
    """
    path = Path(path)
    arrays = {}
    for name in ("x", "y", "x_val", "y_val"):
        file = path / f"{name}.npy"
        if not file.exists():
            if name == "x" or (name == "y" and need_y):
                raise DataError(f"{path} has no {file.name}: a data folder holds x.npy and y.npy")
            continue
        arrays[name] = NpyFile(file)
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path} has only one of x_val.npy and y_val.npy: give both, or neither")
    for a, b in (("x", "y"), ("x_val", "y_val")):
        if a in arrays and b in arrays and len(arrays[a]) != len(arrays[b]):
            raise DataError(f"{path}: {a}.npy has {len(arrays[a])} rows but {b}.npy has {len(arrays[b])}")
    return arrays


def _is_grain(value) -> bool:
    return type(value).__module__.split(".")[0] == "grain"


def _grain_batched(dataset) -> bool:
    """Whether a Grain MapDataset batches its elements (a ``.batch`` anywhere in its pipeline)."""
    pending, seen = [dataset], 0
    while pending and seen < 1000:
        d, seen = pending.pop(), seen + 1
        if type(d).__name__ == "BatchMapDataset":
            return True
        pending.extend(getattr(d, "_parents", ()) or ())
    return False


def _is_batch_list(x) -> bool:
    """Whether ``x`` is a list of ``(x, y)`` batches (arrays with an example axis), not rows of numbers."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    if isinstance(first, dict):
        return "x" in first
    return isinstance(first, tuple) and len(first) == 2 and all(np.ndim(a) >= 1 for a in first)


def as_source(x, y=None, name: str = "x", once: bool = False) -> Any:
    """The source that ``x`` (and ``y``) stand for, or None for resident arrays.

    - ``x``, ``y`` arrays in memory: None (fit places them on the device);
    - array-likes not in memory (:class:`NpyFile`, ``np.memmap``, :class:`RowView`): :class:`Indexed`;
    - a source of this module: itself (``y`` must be None);
    - a Grain ``MapDataset``: :class:`GrainMap`; other iterables: :class:`Sequential` (an iterator,
      read only once, with ``once``: for a single pass, as evaluation and prediction make).
    """
    if isinstance(x, (Indexed, GrainMap, Sequential)):
        if y is not None:
            raise TypeError(f"{name} is a data source, which holds its targets: pass y=None")
        return x
    if y is not None and _is_batch_list(x):
        raise TypeError(f"{name} is a list of (x, y) batches, which hold their targets: pass y=None")
    if y is not None:
        if all(is_resident(a) or isinstance(a, (list, tuple)) for a in (x, y)):
            return None  # arrays (or lists of numbers) in memory
        if hasattr(x, "shape") and hasattr(y, "shape") and hasattr(x, "__getitem__"):
            return Indexed(x, y, name)
        raise TypeError(f"{name} and y must be arrays (or {name} an iterable of (x, y) batches with y=None)")
    if is_resident(x):
        fix = "its targets y too" if name == "x" else "a pair (x_val, y_val)"
        raise TypeError(f"{name} is an array without its targets: give {fix}")
    if _is_grain(x) and hasattr(x, "__len__") and hasattr(x, "__getitem__") and not hasattr(x, "__next__"):
        if type(x).__name__ not in ("DataLoader",) and "Iter" not in type(x).__name__:
            if _grain_batched(x):
                raise DataError(
                    f"{name} is a batched Grain MapDataset (.batch): give the dataset of examples (fit batches and "
                    "shuffles them), or its .to_iter_dataset() for batches in their own order"
                )
            return GrainMap(x, f"{name} (a Grain dataset)")
    if isinstance(x, Iterable):
        return Sequential(x, f"{name} (an iterable of batches)", once=once)
    raise TypeError(f"{name} must be an array, a data source or an iterable of (x, y) batches, not {type(x).__name__}")


def _merge(pending: list, n: int) -> tuple[list, tuple | None]:
    """The first ``n`` rows of the pending blocks (fewer if they hold fewer) and what is left."""
    have, taken = 0, []
    while pending and have < n:
        x, y = pending.pop(0)
        need = n - have
        if len(x) > need:
            pending.insert(0, (x[need:], y[need:]))
            x, y = x[:need], y[:need]
        taken.append((x, y))
        have += len(x)
    if not taken:
        return pending, None
    if len(taken) == 1:
        return pending, taken[0]
    return pending, (np.concatenate([t[0] for t in taken]), np.concatenate([t[1] for t in taken]))


def _rows(blocks: Iterator, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``blocks`` re-cut into pieces of exactly ``n`` rows (the last may be shorter)."""
    pending, have = [], 0
    for x, y in blocks:
        pending.append((x, y))
        have += len(x)
        while have >= n:
            pending, piece = _merge(pending, n)
            have -= n
            yield piece
    if have:
        yield _merge(pending, have)[1]


def batches_of(
    blocks: Iterator, batch_size: int, seed: int, shuffle_buffer: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of exactly ``batch_size`` rows (the last may be shorter) from blocks of any size.

    With ``shuffle_buffer`` > 0, rows pass through a buffer of that many: each batch takes random
    rows out of the buffer (drawn from ``np.random.default_rng(seed)``), which the next rows
    refill; when the blocks end, the buffer is emptied in random order. The order is a pure
    function of the blocks and the seed.
    """
    if shuffle_buffer <= 0:
        yield from _rows(blocks, batch_size)
        return
    rng = np.random.default_rng(seed)
    pieces = _rows(blocks, batch_size)
    buffer_x = buffer_y = None
    filled, tail = 0, []
    for x, y in pieces:
        if buffer_x is None:
            buffer_x = np.empty((shuffle_buffer, *x.shape[1:]), x.dtype)
            buffer_y = np.empty((shuffle_buffer, *y.shape[1:]), y.dtype)
        take = min(len(x), shuffle_buffer - filled)
        buffer_x[filled : filled + take], buffer_y[filled : filled + take] = x[:take], y[:take]
        filled += take
        if take < len(x):  # the buffer is full
            tail = [(x[take:], y[take:])]
            break
    for x, y in _rows(itertools.chain(tail, pieces), batch_size):
        if len(x) < batch_size:  # the last rows: they join the buffer's
            buffer_x = np.concatenate([buffer_x[:filled], x])
            buffer_y = np.concatenate([buffer_y[:filled], y])
            filled += len(x)
            break
        slots = rng.choice(shuffle_buffer, size=batch_size, replace=False)
        out = (buffer_x[slots], buffer_y[slots])  # fancy indexing copies
        buffer_x[slots], buffer_y[slots] = x, y
        yield out
    if filled:
        order = rng.permutation(filled)
        yield from _rows(iter([(buffer_x[:filled][order], buffer_y[:filled][order])]), batch_size)
