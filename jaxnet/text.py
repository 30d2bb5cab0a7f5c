"""Text to tokens, tokens on disk, and windows of tokens for training language models.

- Tokenizers: :class:`ByteTokenizer` (any text; ids 0-255 are its UTF-8 bytes), :class:`CharTokenizer`
  (the characters of a training text, found by :meth:`CharTokenizer.fit`), and :class:`BPETokenizer`
  (Hugging Face ``tokenizers``' byte-level BPE, trained on the corpus or loaded from a
  ``tokenizer.json``; the ``text`` extra). Each has one more id, ``eot``, that separates documents.
  :func:`tokenizer_to_json` and :func:`tokenizer_from_json` save and read any of them (plain JSON,
  checked field by field; reading never runs code).
- :func:`tokenize_files` encodes a corpus (text files, read in chunks: never whole in memory) into
  a flat token file, ``uint16`` when the vocabulary allows, else ``uint32``, with a JSON header
  beside it; :func:`open_tokens` maps it read-only.
- :func:`windows` turns a 1-d token array (a memory map) into a data source of ``(x, y)`` rows:
  ``x`` ``(C,)`` the tokens at an offset and ``y`` ``(C,)`` the same shifted by one, read lazily.
  ``stride=1`` makes every offset a row, so a shuffled epoch draws windows at random offsets (as
  nanoGPT does) without repeats; ``stride=C`` gives disjoint windows. Either way ``fit`` shuffles
  them with its keyed permutation and resumes exactly.
- :func:`split_tokens`: a text's validation part is its last part, contiguous (nanoGPT's 90/10),
  never windows drawn from the training text.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxnet import _atomic as atomic
from jaxnet import _checks as checks
from jaxnet.sources import DataError, Indexed, release_pages

READ_BYTES = 16 * 2**20
"""Bytes of text read (and encoded) at a time."""
EOT = "<|endoftext|>"
"""The document separator's name (GPT-2's)."""


class TextError(checks.ArgumentError):
    """A text or tokenizer that cannot be used; the message names the file, offset or character,
    and may name an argument through a template (a front end spells it its own way: see
    :class:`jaxnet._checks.ArgumentError`). Without ``names`` the message is plain text."""

    def __init__(self, message: str, *names: str):
        super().__init__(message if names else checks.escape(message), *names)


class UnknownCharactersError(TextError):
    """A text holds characters a char tokenizer does not know (the message names them)."""


BYTE_TOKENIZER = "ByteTokenizer()"
"""How an error names the byte tokenizer (the command line spells it ``--tokenizer byte``)."""


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, any text; id 256 (``eot``) separates documents."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eot(self) -> int:
        return 256

    def encode(self, text: str | bytes, where: str = "the text") -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """The characters of a training text, in code point order, as ids; ``eot`` is the next id."""

    chars: str
    kind = "char"

    def __post_init__(self):
        if not self.chars or len(set(self.chars)) != len(self.chars) or sorted(self.chars) != list(self.chars):
            raise TextError("a char tokenizer's characters must be distinct, sorted and at least one")

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eot(self) -> int:
        return len(self.chars)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        """The characters of ``texts`` (chunks of any size)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise TextError("the text is empty: give some text to train on")
        return cls("".join(sorted(seen)))

    def _points(self) -> np.ndarray:
        return np.frombuffer(self.chars.encode("utf-32-le"), np.uint32)

    def encode(self, text: str, where: str = "the text") -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        known = self._points()
        ids = np.minimum(np.searchsorted(known, points), len(known) - 1)
        unknown = known[ids] != points
        if unknown.any():
            missing = sorted({chr(p) for p in points[unknown]})
            shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise UnknownCharactersError(
                f"{where} has {len(missing)} character(s) the char tokenizer does not know: {shown} "
                "(it knows the characters of its training text)"
            )
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).ravel() if 0 <= int(i) < len(self.chars))


BPE_MIN_VOCAB = 257
"""The smallest byte-level BPE: its 256 byte tokens and the document separator."""


class BPETokenizer:
    """Hugging Face ``tokenizers``' byte-level BPE (GPT-2's scheme): any text; ``eot`` is the id of
    :data:`EOT`. Made by :meth:`train` on a corpus or from a ``tokenizer.json`` (:meth:`from_json`)."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise TextError(f"the BPE tokenizer has no {EOT!r} token to separate documents: add it as a special token")
        self._eot = int(eot)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    @property
    def eot(self) -> int:
        return self._eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """A byte-level BPE of ``vocab_size`` ids (the 256 bytes and :data:`EOT` included, so at
        least :data:`BPE_MIN_VOCAB`) learned from ``texts``."""
        if not isinstance(vocab_size, int) or vocab_size < BPE_MIN_VOCAB:
            raise ValueError(
                f"vocab_size must be at least {BPE_MIN_VOCAB} (the 256 bytes and {EOT!r}), got {vocab_size!r}"
            )
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,  # (its bars leave empty lines on stderr)
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        try:
            return cls(_tokenizers().Tokenizer.from_str(text))
        except Exception as e:  # the library's own parse errors: one line
            raise TextError(f"not a tokenizers JSON file ({str(e).splitlines()[0][:200]})") from None

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def encode(self, text: str, where: str = "the text") -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])


Tokenizer = ByteTokenizer | CharTokenizer | BPETokenizer
TOKENIZERS = ("byte", "char", "bpe")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "a BPE tokenizer needs Hugging Face's tokenizers: pip install 'jaxnet-trainer[text]'"
        ) from None
    return tokenizers


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    """The tokenizer as one JSON document (a BPE's is the ``tokenizers`` library's own format)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.to_json()
    if isinstance(tokenizer, CharTokenizer):
        return json.dumps({"jaxnet_tokenizer": "char", "chars": tokenizer.chars})
    return json.dumps({"jaxnet_tokenizer": "byte"})


def tokenizer_from_json(text: str, where: str = "tokenizer.json") -> Tokenizer:
    """The tokenizer that :func:`tokenizer_to_json` wrote (or any ``tokenizers`` JSON file)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TextError(f"{where} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise TextError(f"{where} is not a tokenizer (a JSON object)")
    kind = doc.get("jaxnet_tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(doc.get("chars"), str):
            raise TextError(f"{where}: the char tokenizer's field 'chars' must be a string")
        return CharTokenizer(doc["chars"])
    if kind is not None:
        raise TextError(f"{where}: unknown tokenizer kind {kind!r} (byte, char, bpe)")
    return BPETokenizer.from_json(text)


def read_text(path: str | os.PathLike, where: str | None = None) -> Iterator[str]:
    """The text of a UTF-8 file in chunks of about :data:`READ_BYTES`; bytes that are not UTF-8 are
    refused with their offset."""
    where = where or str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            pending = decoder.getstate()[0]  # the bytes of a character the last chunk began
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                bad = (pending + data)[e.start : e.start + 4]
                raise TextError(
                    checks.escape(
                        f"{where} is not UTF-8 text: byte offset {offset - len(pending) + e.start} ({bad!r}); "
                    )
                    + "convert it to UTF-8, or train with the byte tokenizer ({0}), which reads any bytes",
                    BYTE_TOKENIZER,
                ) from None
            if text:
                yield text
            if not data:
                return
            offset += len(data)


def read_bytes(path: str | os.PathLike) -> Iterator[bytes]:
    """The bytes of a file in chunks of :data:`READ_BYTES` (a byte tokenizer takes any)."""
    with open(path, "rb") as f:
        while data := f.read(READ_BYTES):
            yield data


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files of a corpus: one ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder's ``.txt``
    files (sorted, recursively)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not found:
            raise TextError(f"{path} holds no .txt files")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}: give a text file (.txt, .jsonl, .parquet) or a folder of .txt")
    return [path]


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of each JSON object of a JSON Lines file, one document each (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextError(f"{path} line {number} is not JSON ({e.msg})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                where = checks.escape(f"{path} line {number} has no text field {field!r}")
                raise TextError(where + ": name the field ({0}=NAME)", "field")
            yield value


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The text column ``field`` of a Parquet file, read a batch of rows at a time (empty cells skipped)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'jaxnet-trainer[data]'") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        names = ", ".join(table.schema_arrow.names)
        raise TextError(
            checks.escape(f"{path} has no column {field!r} (it has {names})") + ": name it ({0}=NAME)", "field"
        )
    for batch in table.iter_batches(columns=[field], batch_size=4096):
        column = batch.column(0)
        if not (column.type == "string" or column.type == "large_string"):
            raise TextError(f"{path}: column {field!r} holds {column.type}, not text")
        yield from (value for value in column.to_pylist() if value)


def documents(path: str | os.PathLike, field: str = "text", raw: bool = False) -> Iterator[Iterator]:
    """The documents of a corpus, each as chunks of text: every ``.txt`` file is one document (read
    in chunks; as bytes, UTF-8 or not, with ``raw``), every record of a ``.jsonl`` file or row of a
    ``.parquet`` file one (its ``field``)."""
    for file in text_files(path):
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from (iter((t,)) for t in _jsonl_texts(file, field))
        elif suffix == ".parquet":
            yield from (iter((t,)) for t in _parquet_texts(file, field))
        else:
            yield read_bytes(file) if raw else read_text(file)


def text_chunks(path: str | os.PathLike, field: str = "text") -> Iterator[str]:
    """All the text of a corpus, in chunks (what a tokenizer is fitted to)."""
    for document in documents(path, field):
        yield from document


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenize_files(paths, tokenizer: Tokenizer, out: str | os.PathLike, field: str = "text") -> np.memmap:
    """Encodes a corpus, ``paths`` (one or a list: :func:`documents`' text files or folders of them,
    or the ``field`` of JSONL or Parquet files), each document followed by ``eot``, into the token file
    ``out`` (written atomically, chunk by chunk), with a JSON header ``out.json`` (dtype, tokens,
    vocabulary size); returns it mapped read-only (:func:`open_tokens`). A byte tokenizer reads a
    text file's bytes as they are (UTF-8 or not). Empty documents are left out; a corpus with no
    text at all is refused."""
    out, dtype, count = Path(out), token_dtype(tokenizer.vocab_size), 0
    raw = isinstance(tokenizer, ByteTokenizer)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    with atomic.atomic_path(out) as tmp, open(tmp, "wb") as f:
        for path in paths:
            for document in documents(path, field, raw):
                size = count
                for chunk in document:
                    ids = tokenizer.encode(chunk, str(path))
                    f.write(ids.astype(dtype).tobytes())
                    count += len(ids)
                if count > size:  # an empty document leaves nothing, not even its separator
                    f.write(np.array([tokenizer.eot], dtype).tobytes())
                    count += 1
        if count == 0:
            shown = ", ".join(map(str, paths))
            raise TextError(f"{shown} holds no text: give a text that is not empty")
    header = {"dtype": dtype.str, "tokens": count, "vocab_size": tokenizer.vocab_size}
    atomic.write_text(Path(f"{out}.json"), json.dumps(header) + "\n")
    return open_tokens(out)


def first_difference(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 22) -> int | None:
    """The first index where two 1-d token arrays differ (one ending first: its length), or None
    when equal; compared a chunk at a time, so memory maps are never read whole."""
    n = min(len(a), len(b))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        unequal = np.flatnonzero(a[start:stop] != b[start:stop])
        if unequal.size:
            return start + int(unequal[0])
    return None if len(a) == len(b) else n


def open_tokens(path: str | os.PathLike) -> np.memmap:
    """The token file ``path`` (see :func:`tokenize_files`) as a read-only memory map, checked
    against its header (its size must be what the header says)."""
    path = Path(path)
    try:
        header = json.loads(Path(f"{path}.json").read_text())
        dtype, count = np.dtype(header["dtype"]), int(header["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TextError(f"{path}.json is not a token file's header ({type(e).__name__})") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)) or count < 0:
        raise TextError(f"{path}.json: tokens must be uint16 or uint32 and counted")
    if path.stat().st_size != count * dtype.itemsize:
        raise TextError(f"{path} holds {path.stat().st_size} bytes, its header says {count} tokens of {dtype}")
    return np.memmap(path, dtype, mode="r", shape=(count,))


class TokenWindows:
    """Rows of ``C`` tokens at offsets ``shift + i * stride`` of a 1-d token array, read lazily as
    int32: an array-like ``(rows, C)`` for :class:`jaxnet.Indexed`."""

    def __init__(self, tokens, context: int, stride: int, shift: int, rows: int):
        self.tokens, self.context, self.stride, self.shift = tokens, context, stride, shift
        self.shape, self.dtype, self.ndim = (rows, context), np.dtype(np.int32), 2
        self.nbytes = rows * context * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"windows {rows.min()}..{rows.max()} outside the {len(self)} windows")
        starts = self.shift + rows * self.stride
        out = np.asarray(self.tokens[starts[:, None] + np.arange(self.context)], np.int32)
        release_pages(self.tokens)
        return out


def windows(tokens, context: int, stride: int = 1, limit: int | None = None, name: str = "text") -> Indexed:
    """A data source of next-token windows of ``tokens`` ``(N,)``: row ``i`` is ``x`` = the ``C``
    tokens from offset ``i * stride``, ``y`` = the ``C`` tokens after them, each ``(C,)`` int32.

    Args:
      tokens: a 1-d array of token ids (a memory map from :func:`open_tokens`, or in memory).
      context: C.
      stride: 1 (every offset: shuffled, random windows), or C (disjoint windows).
      limit: at most this many windows, spread evenly over the tokens (a fixed validation set).
    """
    context, stride = checks.integer("context", context), checks.integer("stride", stride)
    limit = checks.optional_integer("limit", limit)
    if not hasattr(tokens, "dtype") or np.ndim(tokens) != 1 or not np.issubdtype(tokens.dtype, np.integer):
        got = f"{np.ndim(tokens)}-d {tokens.dtype}" if hasattr(tokens, "dtype") else type(tokens).__name__
        raise TypeError(f"tokens must be a 1-d array of integer token ids (e.g. open_tokens(...)), got {got}")
    n = len(tokens)
    if n < context + 1:
        raise DataError(f"{name} has {n} tokens, fewer than a window of context {context} + 1: give more text")
    rows = (n - context - 1) // stride + 1
    if limit is not None and rows > limit:
        stride, rows = stride * (rows // limit), limit
    x = TokenWindows(tokens, context, stride, 0, rows)
    y = TokenWindows(tokens, context, stride, 1, rows)
    return Indexed(x, y, name)


def split_tokens(tokens, validation: float) -> tuple:
    """``(train, val)``: the first ``1 - validation`` of ``tokens`` and the rest, contiguous."""
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be in [0, 1), got {validation!r}")
    cut = len(tokens) - int(round(len(tokens) * validation))
    return tokens[:cut], (tokens[cut:] if cut < len(tokens) else None)
