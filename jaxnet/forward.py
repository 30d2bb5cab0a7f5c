"""Applying any model to a batch: plain models through ``jax.vmap``, stateful ones with a context.

Everything that runs a model on data (the training step, evaluation, prediction) goes through
:func:`apply_batch`, so that plain and stateful models differ in one place only. A plain model
pays nothing: its batch is ``vmap(apply)`` as before.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.base import BATCH_AXIS, Context, Model, Params, PRNGKey, StatefulModel, path_name

AnyModel = Model | StatefulModel


def check_model(model, name: str = "model") -> None:
    """Raises TypeError unless ``model`` is a :class:`Model` or :class:`StatefulModel`."""
    if not isinstance(model, (Model, StatefulModel)):
        raise TypeError(
            f"{name} must be a jaxnet.Model or jaxnet.StatefulModel (a pair of pure functions init, apply), "
            f"got {type(model).__name__}"
        )


def check_model_state(model, model_state) -> None:
    """Raises TypeError unless ``model`` is a model, and ValueError when ``model_state`` is missing
    for a :class:`StatefulModel` or given for a plain one."""
    check_model(model)
    if is_stateful(model) and model_state is None:
        raise ValueError(
            "model_state: a StatefulModel needs its initial state: params, model_state = model.init(key) "
            "(init_members(model, keys) for a member run)"
        )
    if not is_stateful(model) and model_state is not None:
        raise ValueError("model_state is for a StatefulModel; a plain Model has none: drop model_state")


def is_stateful(model: AnyModel) -> bool:
    """Whether ``model``'s apply takes state and a context (a :class:`StatefulModel`)."""
    return isinstance(model, StatefulModel)


def init_model(model: AnyModel, key: PRNGKey) -> tuple[Params, Any]:
    """``(params, state)`` of any model; the state of a plain model is None."""
    if is_stateful(model):
        params, state = model.init(key)
        return params, state
    return model.init(key), None


def check_params(model: AnyModel, params: Params, members: int | None = None) -> None:
    """Raises ValueError unless ``params`` hold the arrays ``model.init`` makes (by path and
    shape, found by ``jax.eval_shape``: nothing is computed), naming the first that differs.
    ``members``: each array has a leading ``(K,)`` member axis. An ``init`` that cannot be traced
    (one that computes with NumPy) is not checked."""
    try:
        made = jax.eval_shape(lambda key: init_model(model, key)[0], jax.random.key(0))
    except Exception:  # noqa: BLE001 (a courtesy: apply says the rest)
        return
    lead = 1 if members else 0
    expected = {path_name(path): tuple(a.shape) for path, a in jax.tree_util.tree_flatten_with_path(made)[0]}
    given = {path_name(p): tuple(np.shape(a))[lead:] for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in sorted(set(expected) | set(given)):
        if expected.get(path) != given.get(path):
            stacked = given.get(path, ())[1:] == expected.get(path)
            hint = " (a member run's stacked params: take one with jaxnet.take_member(params, i))" if stacked else ""
            hint += f" (after the leading member axis of {members})" if members else ""
            raise ValueError(
                f"params do not fit this model: {path or 'the array'} is {given.get(path, 'missing')}, the model's is "
                f"{expected.get(path, 'absent')}{hint}"
            )


def has_state(state: Any) -> bool:
    """Whether a model state holds any arrays (running statistics), not just structure."""
    return bool(jax.tree.leaves(state))


def apply_batch(
    model: AnyModel,
    params: Params,
    state: Any,
    x: jax.Array,
    *,
    train: bool = False,
    key: PRNGKey | None = None,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """The outputs of ``model`` on a batch, and its state after it.

    Args:
      model: a plain or stateful model.
      params: its params; state: its state (None for a plain model).
      x: inputs ``(b, ...)``.
      train: training mode (dropout on, batch statistics used and running statistics updated).
      key: training mode: the step's PRNG key, split into one key per example (None: no randomness).
      weight: ``(b,)`` example weights (0 for padding; default all 1), seen by batch statistics.

    Returns:
      ``(y: (b, ...), state)``; a plain model returns ``state`` unchanged.
    """
    if not is_stateful(model):
        return jax.vmap(model.apply, in_axes=(None, 0))(params, x), state
    n = jax.tree.leaves(x)[0].shape[0]
    weight = jnp.ones((n,), jnp.float32) if weight is None else weight
    if model.batched:
        return _pair(model.apply(params, state, x, Context(train, key, weight, None)))
    keys = None if key is None else jax.random.split(key, n)

    def one(xi, ki, wi):
        return _pair(model.apply(params, state, xi, Context(train, ki, wi, BATCH_AXIS)))

    in_axes = (0, None if keys is None else 0, 0)
    return jax.vmap(one, in_axes=in_axes, out_axes=(0, None), axis_name=BATCH_AXIS)(x, keys, weight)


def _pair(out):
    """A stateful ``apply``'s result, checked to be the ``(y, state)`` pair it must return."""
    if not (isinstance(out, tuple) and len(out) == 2):
        what = f"a tuple of {len(out)}" if isinstance(out, tuple) else f"an array of shape {jnp.shape(out)}"
        raise TypeError(
            f"a StatefulModel's apply must return (y, state) (the state unchanged if it has none), got {what}: "
            "return (y, state) from apply, or make it a plain Model (init, apply(params, x) -> y)"
        )
    return out


def apply_example(model: AnyModel, params: Params, state: Any, x: jax.Array, *, train=False, key=None):
    """``(y, state)`` of one example applied alone (no batch axis): a plain model's ``apply``, or a
    stateful one's with a context of weight 1 and no batch axis (batch statistics are refused)."""
    if not is_stateful(model):
        return model.apply(params, x), state
    if model.batched:
        y, state = model.apply(params, state, jax.tree.map(lambda a: a[None], x), Context(train, key, jnp.ones(1)))
        return jax.tree.map(lambda a: a[0], y), state
    return model.apply(params, state, x, Context(train, key, 1.0, None))


def predictor(model: AnyModel, state: Any = None):
    """``(params, xs: (b, ...)) -> ys: (b, ...)`` in eval mode, with ``state`` fixed (running statistics)."""
    return lambda params, x: apply_batch(model, params, state, x)[0]
