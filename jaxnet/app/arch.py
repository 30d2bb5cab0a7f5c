"""Architectures a run can name: ``mlp``, ``cnn``, or a factory in the user's own Python file.

A run's model is described as JSON (:func:`describe_model`, saved with the model) and rebuilt from it
(:func:`build_model`). The built-in ones rebuild from the description alone; a user's factory
(``path/to/file.py:name``) is imported only when the caller names it again, so that loading a
run never runs code nobody asked for. :func:`bind` puts a saved model's arrays into the
structure its architecture's ``init`` makes, checking every name, shape and dtype.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnet import layers as L
from jaxnet._checks import ArgumentError, escape
from jaxnet.base import path_name
from jaxnet.forward import AnyModel, check_model, init_model
from jaxnet.lm import gpt

ARCHS = ("mlp", "cnn", "gpt")
IMAGE_SHAPES = {"digits": (8, 8, 1)}
"""The image shape ``(height, width, channels)`` of the built-in datasets that are images."""

_FILE_ARCH = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


def is_file_arch(spec: str) -> bool:
    """Whether ``spec`` names a factory in a Python file (``path/to/file.py:name``)."""
    return bool(_FILE_ARCH.match(spec))


def check_arch(spec) -> str:
    """``spec`` as stored: a built-in name, or ``file.py:name`` with the file's absolute path."""
    if not isinstance(spec, str):
        raise ArgumentError(f"{{0}} must be a string, got {spec!r}", "arch")
    if spec in ARCHS:
        return spec
    match = _FILE_ARCH.match(spec)
    if match is None:
        raise ArgumentError(
            f"{{0}} {escape(spec)!r} is neither {' nor '.join(ARCHS)} nor path/to/file.py:factory", "arch"
        )
    path = Path(match["path"])
    if not path.is_file():
        raise ArgumentError(f"{{0}} names {escape(path)}, which is not a file", "arch")
    return f"{os.path.abspath(path)}:{match['name']}"


def load_factory(spec: str) -> Callable:
    """Imports the file that ``spec`` (``file.py:name``) names and returns its ``name``."""
    match = _FILE_ARCH.match(spec)
    path = Path(match["path"])
    name = f"jaxnet_user_arch_{abs(hash(str(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or not path.is_file():
        raise ArgumentError(f"{{0}}: cannot import {escape(path)} (no such Python file)", "arch")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling-free libraries look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ArgumentError(f"{{0}}: importing {escape(path)} failed: {type(e).__name__}: {escape(e)}", "arch") from e
    factory = getattr(module, match["name"], None)
    if not callable(factory):
        raise ArgumentError(f"{{0}}: {escape(path)} defines no function {match['name']!r}", "arch")
    return factory


def _dense_stack(sizes: Sequence[int], activation: str, output_activation, rate: float) -> list:
    """Dense layers of ``sizes``, each hidden one followed by ``dropout(rate)`` when ``rate > 0``."""
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        out.append(L.dense(a, b, output_activation if last else activation))
        if rate > 0 and not last:
            out.append(L.dropout(rate))
    return out


def mlp_arch(sizes: Sequence[int], activation="relu", output_activation=None, dropout: float = 0.0) -> AnyModel:
    """The ``mlp`` architecture: :func:`jaxnet.mlp`, with dropout after every hidden layer when
    ``dropout > 0`` (then a :class:`jaxnet.StatefulModel`)."""
    if dropout == 0:
        return L.mlp(sizes, activation, output_activation)
    return L.serial(*_dense_stack(sizes, activation, output_activation, dropout))


def cnn(
    input_shape: Sequence[int],
    out_dim: int,
    *,
    channels: Sequence[int] = (32, 64),
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    output_activation=None,
    dropout: float = 0.0,
) -> AnyModel:
    """The ``cnn`` architecture, for inputs that are flattened images ``(h * w * c,)``.

    The input reshaped to ``input_shape`` ``(h, w, c)``; per entry of ``channels`` a 3x3
    convolution (SAME padding), the activation and batch norm; a 2x2 max pooling after the
    second convolution and every second one after it (while the image is at least 2x2);
    flatten, dropout, then dense layers of ``hidden`` (each followed by dropout) and the output
    layer. With digits (8x8x1) and the defaults: 8x8x32, 8x8x64, 4x4x64 = 1024 -> 64 -> 64 -> 10.
    """
    h, w, c = (int(v) for v in input_shape)
    stack: list = [L.reshape((h, w, c))]
    for i, width in enumerate(channels):
        stack += [L.conv2d(c, width, 3, activation), L.batch_norm(width)]
        c = width
        if i % 2 == 1 and min(h, w) >= 2:
            stack.append(L.max_pool(2))
            h, w = h // 2, w // 2
    stack.append(L.flatten())
    if dropout > 0:
        stack.append(L.dropout(dropout))
    stack += _dense_stack([h * w * c, *hidden, out_dim], activation, output_activation, dropout)
    return L.serial(*stack)


def describe_model(arch: str, *, sizes, activation, output_activation, dropout, input_shape, channels) -> dict:
    """The JSON description of a model (the ``meta`` fields saved with it)."""
    meta = {"arch": arch, "sizes": list(sizes), "activation": activation, "output_activation": output_activation}
    meta.update(dropout=dropout, input_shape=list(input_shape) if input_shape else None, channels=list(channels))
    return meta


def describe_gpt(vocab_size: int, *, context, layers, heads, dim, dropout, positions, eot=None, remat="none") -> dict:
    """The JSON description of a GPT (:func:`jaxnet.gpt`) over ``vocab_size`` token ids, ``eot``
    the id between documents (attention does not cross it)."""
    g = dict(vocab_size=vocab_size, context=context, layers=layers, heads=heads, dim=dim, dropout=dropout)
    g.update(positions=positions, tie_embeddings=True, bias=False, eot=eot, remat=remat)
    return {"arch": "gpt", "sizes": [context, vocab_size], "activation": "gelu", "output_activation": None, "gpt": g}


def build_model(meta: dict, arch: str | None = None) -> AnyModel:
    """The model that ``meta`` describes. A user's factory is called as ``factory(in_features,
    out_dim)``, and only when ``arch`` names it (the spec it was trained with may be moved)."""
    spec = meta.get("arch", "mlp")
    sizes, act, out_act = meta["sizes"], meta["activation"], meta["output_activation"]
    if spec == "mlp" and meta.get("embed"):
        e = meta["embed"]
        front = L.embed_features(len(meta["feature_names"]), e["features"], e["rows"], e["dim"])
        return L.serial(front, mlp_arch(sizes, act, out_act, meta.get("dropout", 0.0)))
    if spec == "mlp":
        return mlp_arch(sizes, act, out_act, meta.get("dropout", 0.0))
    if spec == "gpt":
        g = meta["gpt"]
        sizes_ = (g["vocab_size"], g["context"], g["layers"], g["heads"], g["dim"])
        options = dict(dropout=g["dropout"], tie_embeddings=g["tie_embeddings"], positions=g["positions"])
        return gpt(*sizes_, **options, bias=g.get("bias", False), eot=g.get("eot"), remat=g.get("remat", "none"))
    if spec == "cnn":
        return cnn(meta["input_shape"], sizes[-1], channels=meta["channels"], hidden=sizes[1:-1], activation=act,
                   output_activation=out_act, dropout=meta["dropout"])  # fmt: skip
    if arch is None or not is_file_arch(arch):
        raise ArgumentError(
            f"this model was built by {escape(spec)}: give {{0}} path/to/file.py:factory to load it "
            "(jaxnet imports no code that was not named on the command line)",
            "arch",
        )
    model = _call_factory(load_factory(check_arch(arch)), arch, sizes[0], sizes[-1])
    try:
        check_model(model, f"{arch} returned a {type(model).__name__}: a factory's result")
    except TypeError as e:
        raise ArgumentError(f"{{0}}: {escape(e)}", "arch") from None
    return model


def _call_factory(factory: Callable, arch: str, in_features: int, out_dim: int):
    """``factory(in_features, out_dim)``, or ``factory()`` for one that takes no arguments; a
    factory that does not fit the contract, or raises, is named with the contract."""
    try:
        takes = inspect.signature(factory).parameters
        positional = [p for p in takes.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        bare = not positional and not any(p.kind == p.VAR_POSITIONAL for p in takes.values())
    except (TypeError, ValueError):  # a builtin or an object without a signature: call it as the contract says
        bare = False
    contract = "a factory is called as factory(in_features, out_dim) (or factory()) and returns a jaxnet model"
    try:
        return factory() if bare else factory(in_features, out_dim)
    except TypeError as e:
        if "positional argument" in str(e) or "required" in str(e):
            raise ArgumentError(f"{{0}} {escape(arch)}: {escape(e)}: {contract}", "arch") from None
        raise ArgumentError(f"{{0}} {escape(arch)} raised TypeError: {escape(e)} ({contract})", "arch") from None
    except Exception as e:
        what = f"{type(e).__name__}: {escape(e)}"
        raise ArgumentError(f"{{0}} {escape(arch)} raised {what} ({contract})", "arch") from None


def check_input_shape(input_shape, features: int) -> None:
    """Refuses an image shape whose size is not the number of features."""
    if input_shape is not None and math.prod(input_shape) != features:
        shape = "x".join(map(str, input_shape))
        raise ArgumentError(
            f"{{0}} {shape} holds {math.prod(input_shape)} values, the data has {features}", "input_shape"
        )


def _names(tree) -> dict[str, Any]:
    """The leaves of ``tree`` by path: ``"0/w"`` for ``[{"w": ...}]`` (:func:`jaxnet.sharding.path_name`)."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """A pytree of arrays as ``{path: array}`` (:func:`bind` puts them back)."""
    return {name: np.asarray(leaf) for name, leaf in _names(tree).items()}


class Bound(NamedTuple):
    """A saved model's arrays in its architecture's structure."""

    model: AnyModel
    params: Any
    state: Any


def bind(model: AnyModel, params: dict, state: dict, members: int | None = None, where: str = "model") -> Bound:
    """``params`` and ``state`` (``{path: array}``, as stored) in the structure of ``model.init``.

    Every name the structure needs must be present with its shape (plus a leading axis of
    ``members``) and dtype; names it does not need are ignored.
    """
    template = jax.eval_shape(lambda: init_model(model, jax.random.key(0)))
    trees = []
    for part, given, like in (("params", params, template[0]), ("state", state, template[1])):
        leaves = []
        for name, spec in _names(like).items():
            shape = spec.shape if members is None else (members, *spec.shape)
            array = given.get(name)
            if array is None:
                raise ValueError(f"{where} does not fit its architecture: {part} {name!r} is missing")
            if array.shape != shape or array.dtype != spec.dtype:
                raise ValueError(
                    f"{where} does not fit its architecture: {part} {name!r} is {array.dtype}{list(array.shape)}, "
                    f"expected {spec.dtype}{list(shape)}"
                )
            leaves.append(array)
        trees.append(jax.tree.unflatten(jax.tree.structure(like), leaves))
    return Bound(model, *trees)
