"""Public texts by name (``jaxnet train --dataset shakespeare``): downloaded on first use from
their public source, checked against their sha256 and cached, then read from the cache.

The cache is ``$JAXNET_DATA_DIR``, else ``$XDG_CACHE_HOME/jaxnet/data`` (``~/.cache/jaxnet/data``).
A download is written under a temporary name and renamed once its checksum matches, so that a
killed or failed download never leaves a file that would be taken for the text; it never reads
more bytes than the text has.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple


class Corpus(NamedTuple):
    """A public text: where it comes from, its bytes and their sha256, its file name in the cache,
    and a few words on it."""

    url: str
    sha256: str
    size: int
    filename: str
    about: str


CORPORA = {
    "shakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
        "data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        filename="tinyshakespeare.txt",
        about="1.1 MB: char-rnn's tinyshakespeare, which nanoGPT's shakespeare_char trains on",
    ),
}
"""The texts ``--dataset`` names, for ``--task lm``."""

TIMEOUT = 30.0
"""Seconds a download may wait for the server."""


class DownloadError(OSError):
    """A text could not be downloaded, or not as it should be; the message says what to do."""


def cache_dir() -> Path:
    """Where downloaded texts are kept (see the module docstring)."""
    folder = os.environ.get("JAXNET_DATA_DIR")
    if folder:
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxnet" / "data"


def _on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, folder: str | os.PathLike | None = None, note=_on_stderr) -> Path:
    """The path of the text ``name`` (one of :data:`CORPORA`) in ``folder`` (default
    :func:`cache_dir`), downloaded first if the cache lacks it or holds other bytes.
    ``note(message)`` is told of a download (default: a line on stderr).

    Raises:
      DownloadError: offline, the server failed, or the bytes are not the text's.
    """
    corpus = CORPORA[name]
    folder = Path(folder) if folder is not None else cache_dir()
    path = folder / corpus.filename
    if path.is_file() and path.stat().st_size == corpus.size and _sha256(path) == corpus.sha256:
        return path
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot cache the {name} text in {folder}: {e.strerror or e}: set JAXNET_DATA_DIR "
                            "to a folder that can be written") from None  # fmt: skip
    if note is not None:
        note(f"downloading the {name} text ({corpus.about}) from {corpus.url} into {folder}")
    try:
        _download(name, corpus, path)
    except DownloadError:
        if created:  # a failed download leaves no empty cache folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return path


def _download(name: str, corpus: Corpus, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{corpus.filename}.", suffix=".part", dir=path.parent)
    try:
        h, got = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(corpus.url, timeout=TIMEOUT) as response:
            while got <= corpus.size:
                block = response.read(min(1 << 20, corpus.size + 1 - got))
                if not block:
                    break
                h.update(block)
                out.write(block)
                got += len(block)
        if got != corpus.size or h.hexdigest() != corpus.sha256:
            what = f"{got} bytes" if got != corpus.size else f"sha256 {h.hexdigest()}"
            raise DownloadError(
                f"the {name} text from {corpus.url} is not the expected one ({what}; expected {corpus.size} bytes "
                f"of sha256 {corpus.sha256}): try again later, or download it yourself and give --data FILE"
            )
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, DownloadError):
            raise
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DownloadError(
            f"cannot download the {name} text from {corpus.url} ({reason}): connect to the internet, or download "
            "it yourself and give --data FILE"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
