"""Low-rank adapters (LoRA, Hu et al. 2021) for any jaxnet model.

:func:`lora` wraps a model: its params become ``{"base": the model's params, "lora": {path:
{"a": (..., in, r), "b": (..., r, out)}}}`` for each targeted weight ``w`` ``(..., in, out)``
(the last two dimensions; leading ones, as the stacked blocks of :func:`jaxnet.gpt`, get their own
adapters). ``apply`` runs the model on the merged weights ``w + (alpha / r) * a @ b``; ``b``
starts at zero, so the wrapped model starts as the base. Train only the adapters with
``fit(..., trainable="^lora/")``: the base stays bitwise unchanged and the optimizer keeps state
for the adapters alone. :func:`merge` gives the base model's params with the adapters folded in,
for ``predict``, ``generate``, ``export`` and ``summary`` of the base architecture.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet._checks import ArgumentError, escape, literal
from jaxnet.base import Model, PRNGKey, StatefulModel
from jaxnet.sharding import listed, path_name

TARGETS = r"(^|/)w$"
"""The weights adapted by default: every ``w`` of dense, attention and MLP layers (and of
convolutions, whose last two dimensions are input and output channels)."""


def _targets(params, pattern: str) -> dict[str, tuple]:
    """The targeted leaves' ``{path: shape}`` (at least 2-d)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ArgumentError(
            "{0} " + literal(pattern) + f" is not a valid regular expression: {escape(e)}", "targets"
        ) from None
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        if regex.search(name) and np.ndim(leaf) >= 2:
            found[name] = tuple(np.shape(leaf))
    if not found:
        names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ArgumentError("{0} " + literal(pattern) + " match no weight of 2 or more dimensions; the params are: "
                            + escape(listed(names)), "targets")  # fmt: skip
    return found


def adapter_count(params, rank: int, targets: str = TARGETS) -> int:
    """The parameters that :func:`lora`'s adapters of ``rank`` add to ``params`` (the base's):
    ``r * (d_in + d_out)`` for each targeted weight (per leading index of a stacked one)."""
    shapes = _targets(params, targets)
    return sum(math.prod(lead) * rank * (d_in + d_out) for *lead, d_in, d_out in shapes.values())


def _check(rank, alpha, shapes: dict) -> float:
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ArgumentError("{0} must be a positive integer, got " + literal(rank), "rank")
    smallest = min(min(shape[-2:]) for shape in shapes.values())
    if rank > smallest:
        raise ArgumentError(f"{{0}} {rank} exceeds the smallest dimension of the adapted weights ({smallest}): use "
                            f"at most {smallest}", "rank")  # fmt: skip
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ArgumentError("{0} must be positive, got " + literal(alpha), "alpha")
    return alpha / rank


def lora(model: Model | StatefulModel, rank: int, alpha: float | None = None, targets: str = TARGETS):
    """``model`` with low-rank adapters on the weights whose path ``targets`` finds (see the module
    docstring); a model like any other, per example (or batched, as ``model`` is).

    Args:
      model: a jaxnet :class:`Model` or :class:`StatefulModel` (its ``init`` gives the shapes).
      rank: r, the adapters' rank (at most the smaller dimension of every adapted weight).
      alpha: the scale's numerator: the update is ``(alpha / r) * a @ b`` (default r: scale 1).
      targets: a regex over the params' paths (default :data:`TARGETS`).

    Examples:
      >>> from jaxnet import mlp
      >>> net = lora(mlp([8, 16, 4]), rank=2)
      >>> params = net.init(jax.random.key(0))
      >>> params["lora"]["0/w"]["a"].shape, params["lora"]["0/w"]["b"].shape
      ((8, 2), (2, 16))
    """
    stateful = isinstance(model, StatefulModel)
    shapes = _targets(jax.eval_shape(lambda: _base_params(model, jax.random.key(0))), targets)
    scale = _check(rank, alpha, shapes)

    def adapters(key: PRNGKey) -> dict:
        out = {}
        for name, k in zip(shapes, jax.random.split(key, len(shapes))):
            *lead, d_in, d_out = shapes[name]
            a = jax.random.normal(k, (*lead, d_in, rank)) / math.sqrt(d_in)
            out[name] = {"a": a, "b": jnp.zeros((*lead, rank, d_out))}
        return out

    def init(key: PRNGKey):
        base_key, adapter_key = jax.random.split(key)
        if stateful:
            params, state = model.init(base_key)
            return {"base": params, "lora": adapters(adapter_key)}, state
        return {"base": model.init(base_key), "lora": adapters(adapter_key)}

    def merged(params):
        return merge(params, scale)

    if stateful:
        return model._replace(init=init, apply=lambda p, s, x, ctx: model.apply(merged(p), s, x, ctx))
    return Model(init, lambda p, x: model.apply(merged(p), x))


def _base_params(model, key):
    return model.init(key)[0] if isinstance(model, StatefulModel) else model.init(key)


def merge(params: dict, scale: float) -> dict:
    """The base params of :func:`lora`'s ``params`` with each adapter folded in:
    ``w + scale * a @ b`` (``scale = alpha / rank``), in ``w``'s dtype."""
    if not isinstance(params, Mapping) or set(params) != {"base", "lora"}:
        raise TypeError("merge takes the params of a jaxnet.lora model, {'base': ..., 'lora': ...}, whole")

    def fold(path, w):
        pair = params["lora"].get(path_name(path))
        if pair is None:
            return w
        return w + (scale * jnp.matmul(pair["a"], pair["b"])).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params["base"])
