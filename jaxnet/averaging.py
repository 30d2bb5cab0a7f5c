"""An exponential moving average of the weights, kept inside the optimizer state.

:func:`with_ema` wraps any optax optimizer: after each update it sets
``ema = decay * ema + (1 - decay) * params`` (the params after the update), starting from the
initial params (no bias correction, as Keras' ``use_ema`` and Lightning's weight averaging).
Being part of the optimizer state, the average is updated inside the compiled step, checkpointed
and resumed with the rest, and skipped with the update when a step is skipped. ``fit(ema=...)``
validates, early-stops and returns the average (:func:`averaged`), while the raw params go on
training. Closed form after t updates: ``ema_t = decay^t p_0 + (1 - decay) sum_i decay^(t-i) p_i``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet.base import Params


class EmaState(NamedTuple):
    """The wrapped optimizer's state and the average of the params (float32 at least)."""

    inner: Any
    ema: Params


def with_ema(optimizer: optax.GradientTransformation, decay: float) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` that also keeps the exponential moving average of the params (``decay`` in
    (0, 1)); see the module docstring.

    Examples:
      >>> opt = with_ema(optax.sgd(1.0), 0.5)
      >>> params = {"w": jnp.zeros(())}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": -jnp.ones(())}, state, params)  # params become 1
      >>> float(state.ema["w"])
      0.5
    """
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < 1:
        raise ValueError(f"ema must be a decay in (0, 1), such as 0.999, got {decay!r}")
    inner = optax.with_extra_args_support(optimizer)

    def init(params):
        ema = jax.tree.map(lambda p: jnp.asarray(p, jnp.result_type(p, jnp.float32)), params)
        return EmaState(inner.init(params), ema)

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("with_ema needs the params in update(updates, state, params)")
        updates, inner_state = inner.update(updates, state.inner, params, **extra)
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema, new)
        return updates, EmaState(inner_state, ema)

    return optax.GradientTransformationExtraArgs(init, update)


def ema_of(opt_state) -> Params | None:
    """The average kept in ``opt_state`` (found anywhere in it), or None without one."""
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(node)]
    return found[0].ema if found else None


def _is_ema(node) -> bool:
    return isinstance(node, EmaState)


def averaged(params: Params, opt_state) -> Params:
    """The params to validate and keep: the moving average in ``opt_state`` (cast to the params'
    dtypes) when there is one, else ``params``."""
    ema = ema_of(opt_state)
    if ema is None:
        return params
    return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)
