"""A run folder: what it holds, who is writing it, and whether it holds this run.

A run folder (``jaxnet train --out DIR``) holds ``config.json`` (the run's config, written when
training starts), ``metrics.jsonl``, ``model.npz``, ``curves.png`` and ``checkpoints/``. It has
one writer at a time: :meth:`RunFolder.lock` takes an exclusive ``flock`` on ``DIR/.lock``, which
the operating system releases when the holder exits or is killed, so a lock left by a dead
process is never in the way (the file's text only names the last holder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
from pathlib import Path

from jaxnet import _atomic as atomic
from jaxnet import checkpoint
from jaxnet.app import configfile, files

CONFIG_FILE = "config.json"
CONFIG_TOML = "config.toml"  # the same config, for jaxnet train --config
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
OUTPUTS = (CONFIG_FILE, CONFIG_TOML, files.MODEL_FILE, METRICS_FILE, "curves.png")
TOKEN_CACHE = ("tokenizer.json", "tokens.bin", "tokens.bin.json", "tokens.source.json")
"""A text's tokens and tokenizer, cached in the run folder before the run starts (``jaxnet.app.task``)."""
WRITTEN = ("data.json", "metrics.csv", "steps.csv", "mlflow-run.json", *TOKEN_CACHE)
"""Other files a run writes into its folder (atomically, through ``atomic.atomic_path``)."""


class RunFolderBusy(RuntimeError):
    """Another live process is writing the run folder."""


class RunFolder:
    """The run folder at ``path`` (absolute)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()

    def unusable(self) -> str | None:
        """Why the folder cannot be made or written (before anything is loaded or compiled), or None."""
        path = self.path
        if path.is_symlink() and not path.exists():
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            return f"{existing} is a file, so {path} cannot be a folder"
        if not os.access(existing, os.W_OK | os.X_OK):  # (also false on a read-only file system, even for root)
            why = "is on a read-only file system" if _read_only(existing) else "is not writable"
            return f"{existing} {why}"
        return None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder's lock while the block runs; raises :class:`RunFolderBusy` at once if
        another process holds it. The lock file is removed on release. When the block fails in a
        folder it created before the run started (a refusal once the text was tokenized), the
        folder goes too, with the tokens cached in it: a refused command leaves nothing."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        f = _acquire(path)
        _remove_leftovers(self.path)
        try:
            yield self
        except BaseException:
            if created and {p.name for p in self.path.iterdir()} <= {LOCK_FILE, *TOKEN_CACHE}:
                for name in TOKEN_CACHE:
                    (self.path / name).unlink(missing_ok=True)
                path.unlink()
                f.close()
                self.path.rmdir()
            raise
        finally:
            if not f.closed:
                path.unlink(missing_ok=True)  # while still held: a waiting opener retries on the new file
                f.close()

    def stored_config(self) -> dict | None:
        """The config the folder's run was started with, or None when it holds no jaxnet run."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}): train into another folder") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} is not a jaxnet run config: train into another folder")
        return config

    def holds_outputs(self) -> bool:
        """True when the folder holds a run's files or checkpoints."""
        return any((self.path / name).exists() for name in (*OUTPUTS, CHECKPOINTS))

    def write_config(self, config: dict) -> None:
        atomic.write_text(self.path / CONFIG_FILE, json.dumps(config, indent=1, sort_keys=True) + "\n")
        atomic.write_text(self.path / CONFIG_TOML, configfile.dumps(config))

    def holds_training(self) -> bool:
        """Whether the folder holds something of its run worth keeping: checkpoints or a model (a run
        that failed before its first checkpoint left only its config)."""
        return bool(checkpoint.steps(self.checkpoints)) or (self.path / files.MODEL_FILE).exists()

    def started(self) -> bool:
        """Whether the run here got as far as a round's metrics (else a failure left only its config,
        and the text's token cache)."""
        return self.holds_training() or (self.path / METRICS_FILE).exists()

    def clear(self) -> None:
        """Removes the run's files and checkpoints (to train another run into the folder)."""
        for name in OUTPUTS:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        shutil.rmtree(self.checkpoints, ignore_errors=True)


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _remove_leftovers(folder: Path) -> None:
    """Removes the temporary files that a killed run left of its own files (``atomic.atomic_path``'s
    ``.NAME.XXXX.tmp``; no other file): the lock is held, so no live run owns one."""
    for name in (*OUTPUTS, *WRITTEN):
        for leftover in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()


def _acquire(path: Path):
    """The open, exclusively ``flock``-ed lock file at ``path``, naming this process."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderBusy(
                f"{path.parent} is in use by {holder}: wait for it to finish, or train into another folder"
            ) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file that its last holder removed while we opened it
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            return f
        f.close()
