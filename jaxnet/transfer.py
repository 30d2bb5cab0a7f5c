"""Starting from trained weights: params read from another run or a weights file into a model's
structure, matched by path, with renames.

:func:`load_params` reads named arrays from one of these sources:

- a jaxnet run folder or its ``model.npz`` (the ``params/*`` members, read without trusting the
  file: :mod:`jaxnet._npz`);
- a folder of checkpoints, or one checkpoint in it: its params (the training state's, verified by
  its checksum: :func:`jaxnet.checkpoint.saved_params`);
- a ``.safetensors`` file (names as stored; a leading ``params/``, as ``jaxnet export`` writes
  it, is dropped; the format holds plain arrays and a JSON header, so reading runs no code);
- a ``{name: array}`` dict.

It renames the names (``{regex: replacement}``, ``re.sub`` in order), then puts each array where
the template has that path (``blocks/attn/q/w``: :func:`jaxnet.sharding.path_name`). A name the
template lacks, a path the source lacks, and a shape that differs are listed together in one
error, unless ``partial``: the template's own (fresh) values are then kept for those paths, and
the report lists them.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxnet import _npz as npz
from jaxnet import checkpoint
from jaxnet._checks import ArgumentError, escape
from jaxnet.sharding import listed, path_name

MODEL_FILE = "model.npz"
SOURCES = "give a run folder, a checkpoints folder, a model.npz or a .safetensors file"


class Loaded(NamedTuple):
    """What :func:`load_params` did: ``params`` in the template's structure; ``loaded``, the paths
    that took the source's arrays; ``fresh``, the template's paths kept as they were (``partial``);
    ``unused``, the source's names (after renames) that no path took."""

    params: object
    loaded: list
    fresh: list
    unused: list


def read_named(source) -> dict[str, np.ndarray]:
    """The named arrays of ``source`` (see the module docstring)."""
    if isinstance(source, Mapping):
        return {str(k): np.asarray(v) for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a {{name: array}} dict, got {type(source).__name__}: " + SOURCES)
    path = Path(os.fspath(source))
    if path.is_dir() and not (path / MODEL_FILE).is_file():
        if checkpoint.steps(path.parent if path.name.isdigit() else path):  # checkpoints, or one of them
            return checkpoint.saved_params(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ValueError(f"{path} is not a jaxnet run (no {MODEL_FILE} in it): give a run folder or a weights file")
        path = path / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: " + SOURCES)
    if path.suffix == ".safetensors":
        return _safetensors(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path} is not weights jaxnet reads: " + SOURCES)
    try:
        arrays = npz.read_arrays(path, lambda name: name.startswith("params/"), what=str(path))
    except npz.ArchiveError as e:
        raise ValueError(f"damaged weights: {e}") from None
    if not arrays:
        raise ValueError(f"{path} holds no 'params/' arrays: it is not a jaxnet model")
    return {name[len("params/") :]: a for name, a in arrays.items()}


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError(
            "reading .safetensors needs safetensors, which is not installed: pip install 'jaxnet-trainer[export]'"
        ) from None
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    prefix = "params/"
    if arrays and all(k.startswith(("params/", "state/", "norm/")) for k in arrays):  # jaxnet export's names
        arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def renamed(arrays: dict, rename: Mapping[str, str] | None) -> dict:
    """``arrays`` with each name passed through every ``re.sub(regex, replacement)`` in order; two
    names renamed to one are refused (one array would be dropped)."""
    if rename is not None and not isinstance(rename, Mapping):
        raise TypeError(f"rename must be a mapping {{regex: replacement}}, got {type(rename).__name__}")
    rules = []
    for pattern, replacement in (rename or {}).items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as e:
            raise ValueError(f"rename {pattern!r} is not a valid regular expression: {e}") from None
    for regex, _ in rules:
        if not any(regex.search(name) for name in arrays):
            raise ValueError(f"rename {regex.pattern!r} matches no name of the source; it has: {listed(arrays)}")
    out, source = {}, {}
    for name, array in arrays.items():
        new = name
        for regex, replacement in rules:
            new = regex.sub(replacement, new)
        if new in out:
            raise ValueError(f"rename gives {source[new]!r} and {name!r} one name, {new!r}: rename them apart")
        out[new], source[new] = array, name
    return out


def load_params(source, template, *, rename: Mapping[str, str] | None = None, partial: bool = False) -> Loaded:
    """Params in the structure of ``template`` from the arrays of ``source``, matched by path.

    Args:
      source: a run folder, a ``model.npz``, a checkpoints folder (or one checkpoint), a
        ``.safetensors`` file or a ``{name: array}`` dict.
      template: the params to fill (arrays; or ``jax.ShapeDtypeStruct`` unless ``partial``),
        e.g. ``model.init(key)``.
      rename: ``{regex: replacement}`` applied to the source's names, in order (a rename that
        matches nothing is refused).
      partial: keep the template's leaves where the source has no fitting array (its fresh values;
        or its shapes, for the caller to fill), instead of refusing.

    Returns:
      A :class:`Loaded`; each array is cast to the template's dtype.

    Raises:
      ValueError: names missing, unexpected or of another shape (listed together), unless
        ``partial``; a source that is not weights.

    Examples:
      >>> import jax.numpy as jnp
      >>> template = {"layer": {"w": jnp.zeros((2, 2))}}
      >>> loaded = load_params({"old/w": jnp.ones((2, 2))}, template, rename={"^old/": "layer/"})
      >>> loaded.params["layer"]["w"].tolist(), loaded.fresh
      ([[1.0, 1.0], [1.0, 1.0]], [])
    """
    if template is None:
        raise TypeError("template must be the params to fill (arrays or jax.ShapeDtypeStruct), e.g. model.init(key)")
    arrays = renamed(read_named(source), rename)
    leaves, structure = jax.tree_util.tree_flatten_with_path(template)
    out, loaded, fresh, problems = [], [], [], []
    for path, like in leaves:
        name, shape = path_name(path), tuple(np.shape(like))
        array = arrays.get(name)
        if array is not None and tuple(array.shape) == shape:
            out.append(np.asarray(array).astype(like.dtype))
            loaded.append(name)
            continue
        wrong = f"{name} is {list(array.shape)}, expected {list(shape)}" if array is not None else None
        problems.append(wrong or f"{name} is missing")
        fresh.append(name)
        out.append(like)
    unused = sorted(set(arrays) - set(loaded))
    problems += [f"{name} is unexpected" for name in unused if name not in fresh]
    if problems and not partial:
        raise ArgumentError(escape(f"the weights do not fit the model ({len(problems)}): " + "; ".join(problems[:20])
                                   + (" ..." if len(problems) > 20 else "")) + ": rename them ({0}) or keep the "
                            "model's own values for these ({1})", "rename", "partial")  # fmt: skip
    if not loaded:
        raise ValueError(f"none of the weights fits the model: {'; '.join(problems[:5])}")
    return Loaded(jax.tree_util.tree_unflatten(structure, out), loaded, fresh, unused)
