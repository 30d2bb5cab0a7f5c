"""Reading ``.npz`` archives without trusting them.

``numpy.load`` inflates whatever member is asked for and allocates the shape a member's header
declares before reading a byte of it, so a small file can ask for any amount of memory. Here
only the members a caller names are read; each header is parsed with NumPy's bounded header
reader, its dtype must be plain data (no Python objects, hence no pickle), and its declared size
must equal the member's stored size and fit a byte budget before anything is allocated. Reading
never runs code, and the selected members together never inflate past the larger of
:data:`MIN_BUDGET` and :data:`MAX_RATIO` times the file's size (a decompression bomb is refused
before its first byte is inflated).
"""

from __future__ import annotations

import lzma
import math
import os
import zipfile
import zlib
from collections.abc import Callable

import numpy as np

DEFAULT_LIMIT = 8 << 30
"""The most bytes one archive's selected members may hold together (8 GiB)."""
MAX_RATIO = 100
"""The selected members may inflate to this many times the file's size: numbers (even sparse ones)
compress far less than that; a decompression bomb (zeros: about 1000x) far more."""
MIN_BUDGET = 64 << 20
"""... or to this many bytes (64 MiB), whatever the file's size."""
_CHUNK = 16 << 20


class ArchiveError(ValueError):
    """An archive that is not a readable ``.npz`` or whose members do not hold what they declare."""


def _header(member, label: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ArchiveError(f"{label} uses .npy format {version[0]}.{version[1]}, which is not read")
    except ArchiveError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise ArchiveError(f"{label} has a malformed .npy header ({e})") from None
    if dtype.hasobject:
        raise ArchiveError(f"{label} holds Python objects, which would need pickle: refused (save numeric arrays)")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ArchiveError(f"{label} holds {dtype} values; only plain numeric arrays are read")
    if any(d < 0 for d in shape):
        raise ArchiveError(f"{label} declares the shape {tuple(shape)}")
    return dtype, tuple(shape), fortran


def _check_sizes(info: zipfile.ZipInfo, label: str, file_size: int) -> None:
    if info.compress_size > file_size:
        raise ArchiveError(f"{label} claims {info.compress_size} bytes in a file of {file_size}: the file is damaged")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise ArchiveError(f"{label} is damaged (stored {info.compress_size} bytes, declared {info.file_size})")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, budget: int) -> np.ndarray:
    with archive.open(info) as member:
        dtype, shape, fortran = _header(member, label)
        nbytes = math.prod(shape) * dtype.itemsize
        stored = info.file_size - member.tell()
        if nbytes != stored:
            raise ArchiveError(f"{label} declares {dtype} {shape} ({nbytes} bytes) but stores {stored} bytes")
        if nbytes > budget:
            raise ArchiveError(
                f"{label} declares {nbytes} bytes, past what the archive may inflate to ({budget} more bytes; "
                f"at most {MAX_RATIO}x the file's size or {MIN_BUDGET >> 20} MiB): refused as a decompression bomb"
            )
        data = bytearray(nbytes)
        view, done = memoryview(data), 0
        while done < nbytes:  # in chunks: a zip member's readinto() copies through a bytes of the whole size
            chunk = member.read(min(_CHUNK, nbytes - done))
            if not chunk:
                raise ArchiveError(f"{label} is truncated")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        member.read(1)  # reaches the member's end, where zipfile checks its CRC
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def read_arrays(
    path: str | os.PathLike,
    wanted: Callable[[str], bool],
    *,
    limit: int = DEFAULT_LIMIT,
    what: str | None = None,
) -> dict[str, np.ndarray]:
    """The members of the ``.npz`` at ``path`` whose names (without ``.npy``) ``wanted`` accepts.

    Args:
      path: the archive.
      wanted: ``name -> bool``; other members are never decompressed.
      limit: the most bytes the selected members may hold together.
      what: how errors name the file (default: its name).

    Returns:
      ``{name: array}``, writable arrays in their stored dtype and shape.

    Raises:
      FileNotFoundError, OSError: the file cannot be opened.
      ArchiveError: not a zip archive, a damaged member, an object or oversized member.
    """
    what = what or os.path.basename(os.fspath(path))
    arrays: dict[str, np.ndarray] = {}
    file_size = os.path.getsize(path)
    budget = min(limit, max(MIN_BUDGET, MAX_RATIO * file_size))
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.is_dir() or not wanted(name):
                    continue
                if name in arrays:
                    raise ArchiveError(f"{what} holds member {name!r} twice")
                _check_sizes(info, f"{what}: array {name!r}", file_size)
                arrays[name] = _read_member(archive, info, f"{what}: array {name!r}", budget)
                budget -= arrays[name].nbytes
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, *_CODEC_ERRORS) as e:
        raise ArchiveError(f"{what} is not a readable .npz archive ({_kind(path) or e})") from None
    return arrays


_CODEC_ERRORS = (zlib.error, lzma.LZMAError, OSError)  # a damaged compressed member (bz2: OSError)


def names(path: str | os.PathLike) -> list[str]:
    """The array names an ``.npz`` holds (read from its directory; no member is read)."""
    with zipfile.ZipFile(path) as archive:
        return [info.filename.removesuffix(".npy") for info in archive.infolist() if not info.is_dir()]


def _kind(path) -> str | None:
    with open(path, "rb") as f:
        start = f.read(6)
    return "it holds a single .npy array" if start == b"\x93NUMPY" else None
