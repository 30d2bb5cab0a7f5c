"""Files a run leaves behind: the trained model (``model.npz``) and metric logs.

Everything is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash or kill never leaves a half-written file under its final name. Nothing is pickled: a model
file holds arrays and one JSON document, and loading it cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

MODEL_FILE = "model.npz"
MODEL_FORMAT = "jaxnet-model"
MODEL_FORMAT_VERSION = 2  # 2: any architecture, with its state (1: MLPs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(value):
    """``value`` with every non-finite float (NaN, inf) replaced by None: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Writes one strict JSON object per line (non-finite numbers as null), atomically (the whole
    file is replaced)."""
    write_text(path, "".join(json.dumps(json_safe(r), sort_keys=True, allow_nan=False) + "\n" for r in records))


class SavedModel(NamedTuple):
    """A trained model as stored: ``meta`` (JSON: architecture, loss, task, feature names, config),
    ``params`` and ``state`` (the model's params and non-trainable state as ``{path: array}``,
    e.g. ``"0/w"`` for ``params[0]["w"]``, optionally with a leading member axis; see
    :func:`jaxnet.arch.bind`), the feature standardization ``mean``/``std`` ``(d,)`` fitted on
    the training split and, for a regression model trained on standardized targets, their
    ``target_mean``/``target_std`` ``(k,)`` (None otherwise): the model's outputs are in those
    standardized units."""

    meta: dict
    params: dict
    mean: np.ndarray
    std: np.ndarray
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None
    state: dict = {}  # never mutated


def save_model(directory: str | os.PathLike, model: SavedModel) -> Path:
    """Saves ``model`` to ``directory/model.npz`` atomically and returns that path."""
    meta = dict(model.meta, format=MODEL_FORMAT, format_version=MODEL_FORMAT_VERSION)
    arrays = {f"params/{name}": np.asarray(value) for name, value in model.params.items()}
    arrays.update({f"state/{name}": np.asarray(value) for name, value in model.state.items()})
    arrays["norm/mean"] = np.asarray(model.mean, np.float32)
    arrays["norm/std"] = np.asarray(model.std, np.float32)
    if model.target_mean is not None:
        arrays["norm/target_mean"] = np.asarray(model.target_mean, np.float32)
        arrays["norm/target_std"] = np.asarray(model.target_std, np.float32)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    path = Path(directory) / MODEL_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def load_model(path: str | os.PathLike) -> SavedModel:
    """Loads a model saved by :func:`save_model` from a run folder or a ``model.npz`` path.

    Raises:
      ValueError: the path is not a jaxnet model, or the file is damaged.
    """
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        where = f"{path} has no {MODEL_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ValueError(f"not a jaxnet model: {where} (give the run folder of a training run)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"not a jaxnet model or damaged: {file} ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"not a jaxnet model: {file} was not written by jaxnet")
    if meta.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise ValueError(f"{file} uses model format {meta['format_version']}: upgrade jaxnet to read it")
    params = {name[len("params/") :]: value for name, value in arrays.items() if name.startswith("params/")}
    state = {name[len("state/") :]: value for name, value in arrays.items() if name.startswith("state/")}
    if not params or "norm/mean" not in arrays or "norm/std" not in arrays:
        raise ValueError(f"damaged jaxnet model: {file} is missing arrays")
    return SavedModel(
        meta,
        params,
        arrays["norm/mean"],
        arrays["norm/std"],
        arrays.get("norm/target_mean"),
        arrays.get("norm/target_std"),
        state,
    )
