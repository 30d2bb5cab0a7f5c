"""The trained model a run leaves behind (``model.npz``).

It is written atomically (:mod:`jaxnet._atomic`), so a crash or kill never leaves a half-written
file under its final name. Nothing is pickled: a model
file holds arrays and one JSON document, and loading it cannot run code.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxnet import _checks as checks
from jaxnet import _npz as npz
from jaxnet._atomic import atomic_path
from jaxnet.transfer import MODEL_FILE  # noqa: E402  (one name for the file, the library's)

MODEL_FORMAT = "jaxnet-model"
MODEL_FORMAT_VERSION = 2  # 2: any architecture, with its state (1: MLPs)


class SavedModel(NamedTuple):
    """A trained model as stored: ``meta`` (JSON: architecture, loss, task, feature names, config),
    ``params`` and ``state`` (the model's params and non-trainable state as ``{path: array}``,
    e.g. ``"0/w"`` for ``params[0]["w"]``, optionally with a leading member axis; see
    :func:`jaxnet.app.arch.bind`), the feature standardization ``mean``/``std`` ``(d,)`` fitted on
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


MAX_META_BYTES = 64 << 20
"""The largest JSON document a model file may carry."""
_NONE = type(None)
_META_FIELDS = {  # name: (allowed types, required)
    "task": ((str,), True),
    "loss": ((str,), True),
    "feature_names": ((list,), True),
    "sizes": ((list,), True),
    "activation": ((str,), True),
    "output_activation": ((str, _NONE), True),
    "arch": ((str,), False),
    "num_classes": ((int, _NONE), True),
    "classes": ((list, _NONE), False),
    "target": ((str, _NONE), False),
    "columns": ((dict, _NONE), False),
    "embed": ((dict, _NONE), False),
    "members": ((int, _NONE), False),
    "dropout": ((int, float), False),
    "channels": ((list,), False),
    "input_shape": ((list, _NONE), False),
}


def _meta_problem(meta: dict) -> str | None:
    problem = checks.field_problem(meta, _META_FIELDS)
    if problem is not None:
        return problem
    if meta["task"] not in ("classification", "regression", "lm"):
        return f"has task {meta['task']!r} (classification, regression or lm)"
    if meta["task"] == "lm":
        return _language_model_problem(meta)
    if not all(isinstance(n, str) for n in meta["feature_names"]) or not meta["feature_names"]:
        return "has 'feature_names' that are not a non-empty list of names"
    if len(meta["sizes"]) < 2 or not all(type(n) is int and n > 0 for n in meta["sizes"]):
        return "has 'sizes' that are not positive integers"
    return _parts_problem(meta)


_GPT_FIELDS = {  # name: (allowed types, required)
    "vocab_size": ((int,), True),
    "context": ((int,), True),
    "layers": ((int,), True),
    "heads": ((int,), True),
    "dim": ((int,), True),
    "dropout": ((int, float), True),
    "positions": ((str,), True),
    "tie_embeddings": ((bool,), True),
    "bias": ((bool,), False),
    "eot": ((int, _NONE), False),
}


def _language_model_problem(meta: dict) -> str | None:
    """A language model's fields: its GPT's sizes and its tokenizer (a JSON document)."""
    if meta.get("arch") != "gpt" or not isinstance(meta.get("gpt"), dict):
        return "is a language model without its 'gpt' description"
    problem = checks.field_problem(meta["gpt"], _GPT_FIELDS)
    if problem is not None:
        return f"has a 'gpt' that {problem}"
    if not isinstance(meta.get("tokenizer"), str):
        return "is a language model without its 'tokenizer'"
    return None


def _positive_ints(value, length: int | None = None) -> bool:
    ok = isinstance(value, list) and all(type(n) is int and n > 0 for n in value)
    return ok and (length is None or len(value) == length)


def _parts_problem(meta: dict) -> str | None:
    """The fields that one kind of model needs: its classes, a cnn's shapes, an embedding's sizes."""
    classes, outputs = meta.get("classes"), meta["sizes"][-1]
    if classes is not None and len(classes) != max(outputs, 2 if outputs == 1 else outputs):
        return f"has {len(classes)} 'classes' for {outputs} outputs"
    if meta.get("arch", "mlp") == "cnn":
        if not _positive_ints(meta.get("input_shape"), 3) or not _positive_ints(meta.get("channels")):
            return "is a cnn without a valid 'input_shape' (3 sizes) and 'channels'"
        if isinstance(meta.get("dropout"), bool) or not isinstance(meta.get("dropout"), (int, float)):
            return "is a cnn without a numeric 'dropout'"
    embed = meta.get("embed")
    if embed and not (
        isinstance(embed, dict)
        and _positive_ints(embed.get("rows"))
        and _positive_ints([j + 1 if type(j) is int else 0 for j in embed.get("features") or [-1]])  # indices
        and len(embed["features"]) == len(embed["rows"])
        and type(embed.get("dim")) is int
        and embed["dim"] > 0
    ):
        return "has an 'embed' without 'features', 'rows' and 'dim'"
    return None


def _check_norm(arrays: dict, file: Path) -> None:
    for pair in (("norm/mean", "norm/std"), ("norm/target_mean", "norm/target_std")):
        present = [name for name in pair if name in arrays]
        if pair[0] == "norm/mean" and len(present) < 2:
            missing = next(name for name in pair if name not in arrays)
            raise ValueError(f"damaged jaxnet model: {file} lacks the array {missing!r}")
        if len(present) == 1:
            raise ValueError(f"damaged jaxnet model: {file} has {present[0]!r} without its pair")
        if present and not all(arrays[n].ndim == 1 and arrays[n].dtype.kind == "f" for n in pair):
            raise ValueError(f"damaged jaxnet model: {file} has {pair[0]!r}/{pair[1]!r} that are not float vectors")
        if present and arrays[pair[0]].shape != arrays[pair[1]].shape:
            raise ValueError(f"damaged jaxnet model: {file} has {pair[0]!r} and {pair[1]!r} of different lengths")


def _read_meta(file: Path) -> dict:
    document = npz.read_arrays(file, lambda name: name == "meta", limit=MAX_META_BYTES, what=str(file)).get("meta")
    if document is None or document.dtype != np.uint8 or document.ndim != 1:
        raise ValueError(f"not a jaxnet model: {file} has no metadata")
    try:
        meta = json.loads(document.tobytes().decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"not a jaxnet model or damaged: {file} has unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"not a jaxnet model: {file} was not written by jaxnet")
    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise ValueError(f"damaged jaxnet model: {file} has 'format_version' of type {type(version).__name__}")
    if version > MODEL_FORMAT_VERSION:
        raise ValueError(f"{file} uses model format {version}: upgrade jaxnet to read it")
    problem = _meta_problem(meta)
    if problem is not None:
        raise ValueError(f"damaged jaxnet model: {file}'s metadata {problem}")
    return meta


def saved_meta(path: str | os.PathLike) -> dict | None:
    """The metadata of the model saved in ``path`` (a run folder or a ``model.npz``; only its
    metadata is read), or None when ``path`` holds no jaxnet model file (another source of weights)."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if file.name != MODEL_FILE or not file.is_file():
        return None
    return _read_meta(file)


def load_model(path: str | os.PathLike, limit: int = npz.DEFAULT_LIMIT) -> SavedModel:
    """Loads a model saved by :func:`save_model` from a run folder or a ``model.npz`` path.

    Only the members a model has (``meta``, ``params/*``, ``state/*``, ``norm/*``) are read, each
    checked against its declared size and ``limit`` (bytes) before it is allocated; the metadata's
    fields are checked for presence and type.

    Raises:
      ValueError: the path is not a jaxnet model, or the file is damaged (naming what is wrong).
    """
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {MODEL_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ValueError(f"not a jaxnet model: {where} (give the run folder of a training run)")
    if file.suffix.lower() != ".npz" and not zipfile.is_zipfile(file):  # a data file given as the model, say
        raise ValueError(f"not a jaxnet model: {path} is not a .npz archive (give the run folder of a training run)")
    try:
        meta = _read_meta(file)
        arrays = npz.read_arrays(
            file, lambda name: name.startswith(("params/", "state/", "norm/")), limit=limit, what=str(file)
        )
    except npz.ArchiveError as e:
        raise ValueError(f"damaged jaxnet model: {e}") from None
    params = {name[len("params/") :]: value for name, value in arrays.items() if name.startswith("params/")}
    state = {name[len("state/") :]: value for name, value in arrays.items() if name.startswith("state/")}
    if not params:
        raise ValueError(f"damaged jaxnet model: {file} has no 'params/' arrays")
    _check_norm(arrays, file)
    return SavedModel(
        meta,
        params,
        arrays["norm/mean"],
        arrays["norm/std"],
        arrays.get("norm/target_mean"),
        arrays.get("norm/target_std"),
        state,
    )
