"""Many models in one program: a leading *member* axis on params, optimizer state and PRNG keys.

An ensemble is K copies of a model from K init seeds; a sweep gives each member its own
hyperparameters through ``optax.inject_hyperparams``. :func:`jaxnet.fit` trains all members at
once when its ``key`` is a ``(K,)`` array of keys (see :func:`member_keys`) and ``params`` have a
leading axis K (see :func:`init_members`): the epoch is ``vmap``-ed over the member axis, the data
is shared.

Memory grows linearly with K; :func:`estimate_member_bytes` and :func:`check_memory` refuse a grid
that cannot fit before anything is compiled.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import _checks as checks
from jaxnet.base import Model, Params, PRNGKey
from jaxnet.metrics import get_metrics, monitor_sign


def member_grid(seeds: int, first_seed: int = 0, **hyperparams: Sequence[float]) -> list[dict]:
    """The cartesian product of ``seeds`` init seeds and each hyperparameter's values.

    Args:
      seeds: number of seeds per hyperparameter combination (seeds ``first_seed ...
        first_seed + seeds - 1``).
      first_seed: the first seed.
      **hyperparams: name -> non-empty list of positive finite values (0 is allowed for
        ``weight_decay``).

    Returns:
      One dict per member, ``{"seed": int, name: float, ...}``; seeds vary fastest.

    Examples:
      >>> [m["learning_rate"] for m in member_grid(2, learning_rate=[0.1, 0.01])]
      [0.1, 0.1, 0.01, 0.01]
    """
    checks.integer("seeds", seeds)
    checks.integer("first_seed", first_seed, 0)
    names = list(hyperparams)
    for name in names:
        values = hyperparams[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"{name} needs a non-empty list of values, got {values!r}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} values must be finite numbers, got {value!r}")
            if value < 0 or (value == 0 and name != "weight_decay"):
                bound = "0 or more" if name == "weight_decay" else "greater than 0"
                raise ValueError(f"{name} values must be {bound}, got {value!r}")
    grid = []
    for combo in itertools.product(*(hyperparams[n] for n in names)):
        for seed in range(first_seed, first_seed + seeds):
            grid.append({"seed": seed, **{n: float(v) for n, v in zip(names, combo)}})
    return grid


def member_keys(seeds: Sequence[int]) -> PRNGKey:
    """A ``(K,)`` array of typed PRNG keys, ``jax.random.key(s)`` for each seed ``s``."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("member_keys needs at least one seed")
    return jax.jit(jax.vmap(jax.random.key))(jnp.asarray(seeds, jnp.uint32))


def num_members(key: PRNGKey) -> int | None:
    """K when ``key`` is a ``(K,)`` array of typed keys (or ``(K, 2)`` raw uint32 keys), else None."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape[0] if key.ndim == 1 else None
    return key.shape[0] if key.ndim == 2 else None


def init_members(model: Model, keys: PRNGKey) -> Params:
    """``vmap(model.init)(keys)``: params of K members, every leaf with a leading axis K (what
    ``model.init`` returns: for a stateful model such as :func:`jaxnet.gpt`, ``(params,
    model_state)``, each stacked: give ``fit`` the first as params and the second as
    ``model_state``)."""
    if num_members(keys) is None:
        raise ValueError("init_members needs a (K,) array of keys: use member_keys(seeds)")
    return jax.jit(jax.vmap(model.init))(keys)  # one compiled call, not one per op


def take_member(tree: Any, i: int) -> Any:
    """Member ``i`` of a pytree with a leading member axis (params, optimizer state, ...)."""
    return jax.tree.map(lambda a: a[i], tree)


def _is_injected(node) -> bool:
    return hasattr(node, "hyperparams") and isinstance(node.hyperparams, dict) and hasattr(node, "_replace")


def _hyperparams_states(opt_state):
    """The ``inject_hyperparams`` states inside ``opt_state`` (anywhere: chains, the groups of
    ``optax.multi_transform``, wrappers)."""
    return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(s)]


def set_hyperparams(opt_state, values: Mapping[str, Any]):
    """``opt_state`` with its injected hyperparameters replaced by ``values``.

    Args:
      opt_state: the state of an ``optax.inject_hyperparams(...)`` optimizer (possibly inside a
        chain, or in each group of :func:`jaxnet.grouped`: every state that injects a name gets
        its values), with a leading member axis K when built by ``vmap(optimizer.init)``.
      values: name -> ``(K,)`` values (one per member), e.g. ``{"learning_rate": [1e-3, 1e-2]}``.

    Raises:
      TypeError: the optimizer does not inject hyperparameters.
      ValueError: an unknown name, or values of the wrong shape.
    """
    states = _hyperparams_states(opt_state)
    if not states:
        raise TypeError(
            "the optimizer state has no injected hyperparameters: build the optimizer with "
            "optax.inject_hyperparams(optax.adam)(learning_rate=...)"
        )
    known = sorted({n for s in states for n in s.hyperparams})
    for name in values:
        if name not in known:
            raise ValueError(f"the optimizer has no hyperparameter {name!r}: use one of {', '.join(known)}")

    def replace(state):
        if not _is_injected(state):
            return state
        new = {}
        for name, value in values.items():
            if name in state.hyperparams:
                old = state.hyperparams[name]
                new[name] = jnp.array(value, dtype=old.dtype)  # a copy: the state is donated, the caller's value is not
                if new[name].shape != old.shape:
                    raise ValueError(
                        f"{name} needs values of shape {old.shape} (one per member), got shape {new[name].shape}"
                    )
        return state._replace(hyperparams={**state.hyperparams, **new})

    return jax.tree.map(replace, opt_state, is_leaf=_is_injected)


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays (or ``jax.ShapeDtypeStruct``) of a pytree."""
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(tree)
        if hasattr(a, "shape") and hasattr(a, "dtype") and not jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    )


def estimate_member_bytes(params: Params, opt_state: Any, batch_size: int, members: int) -> int:
    """An estimate of the device memory K members need while training (not counting the data).

    Per member: params three times (params, gradients, best params kept for early stopping), the
    optimizer state, and the activations of one minibatch, estimated as ``2 * batch_size * 4``
    bytes per unit (forward values and their gradients; units = the summed size of the 1-D param
    leaves, the layer widths of an MLP). It is a lower bound of the live arrays: XLA may add
    temporaries.

    Args:
      params, opt_state: one member's params and optimizer state (arrays or the
        ``jax.ShapeDtypeStruct`` of ``jax.eval_shape``, which allocates nothing).
      batch_size: examples per step.
      members: K.
    """
    units = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params) if len(a.shape) == 1)
    per_member = 3 * tree_bytes(params) + tree_bytes(opt_state) + 2 * batch_size * units * 4
    return members * per_member


def memory_limit(device: jax.Device | None = None) -> tuple[int, str]:
    """``(bytes, where)``: the device's memory limit (``memory_stats()["bytes_limit"]``), or the
    host's physical memory when the device does not report one (CPU)."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device {device.id}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_memory(needed: int, members: int, device: jax.Device | None = None) -> None:
    """Raises ValueError when ``needed`` bytes (of ``members`` members) exceed the memory limit."""
    limit, where = memory_limit(device)
    if needed > limit:
        what, fix = (
            ("the run needs", "a smaller model or batch")
            if members == 1
            else (f"{members} members need", "fewer members (seeds x hyperparameter values) or a smaller batch")
        )
        raise ValueError(
            f"{what} about {_gib(needed)} while training, more than the {_gib(limit)} of {where}: train {fix}"
        )


def member_scores(history: list, monitor: str = "val_loss") -> list[float]:
    """Each member's score in a member history (records whose metrics are per-member lists).

    With validation (records have ``best_epoch``), the ``monitor`` value at the member's best epoch,
    the epoch its kept params come from; otherwise the member's last value. NaN for a member
    without a finite value.
    """
    if not history or monitor not in history[0]:
        raise ValueError(f"the history has no {monitor!r}: train with validation data or monitor 'train_loss'")
    k = len(history[0][monitor])
    scores = []
    for i in range(k):
        if "best_epoch" in history[-1] and history[-1]["best_epoch"][i] > 0:
            value = history[history[-1]["best_epoch"][i] - 1][monitor][i]
        else:
            values = [r[monitor][i] for r in history if r[monitor][i] is not None]
            value = values[-1] if values and len(values) == len(history) else None
        scores.append(float(value) if value is not None and math.isfinite(value) else math.nan)
    return scores


def best_member(history: list, monitor: str = "val_loss", metrics: Sequence = ()) -> int:
    """The index of the member with the best ``monitor`` (the lowest loss, perplexity or error, the
    highest accuracy, f1 or r2: :func:`jaxnet.metrics.monitor_sign`, which reads a custom metric's
    direction from its :class:`~jaxnet.metrics.Metric` in ``metrics``); members tied on a figure
    that is better higher are ranked by their validation loss (when the history has one), then by
    index.

    Raises ValueError when no member has a finite score.
    """
    scores = member_scores(history, monitor)
    sign = monitor_sign(monitor, get_metrics(metrics))
    ties = member_scores(history, "val_loss") if sign < 0 and "val_loss" in history[0] else [0.0] * len(scores)
    ties = [t if math.isfinite(t) else math.inf for t in ties]
    finite = [(sign * s, ties[i], i) for i, s in enumerate(scores) if math.isfinite(s)]
    if not finite:
        raise ValueError(f"no member has a finite {monitor}: every member diverged; lower the learning rates")
    return min(finite)[2]
