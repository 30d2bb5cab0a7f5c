"""The compiled update step: ``jax.value_and_grad`` + an optax transformation + ``jax.jit``."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxnet.base import Batch, Model, Params, PRNGKey, TrainState
from jaxnet.losses import LossSpec, PerExample, batch_mean, get_loss

Metrics = dict[str, jax.Array]
Update = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got {optimizer!r}"
        )


def _unpack(batch: Batch):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise TypeError("a batch is a tuple (x, y) or (x, y, weights) with a leading example axis")
    x, y, *rest = batch
    return x, y, (rest[0] if rest else None)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_loss_fn(
    model: Model, loss: str | PerExample | LossSpec, *, compute_dtype=None
) -> Callable[[Params, Batch], jax.Array]:
    """The batch loss ``(params, batch) -> scalar``: the weighted mean of the per-example loss.

    Args:
      model: the model; its ``apply`` is vmapped over the batch.
      loss: a loss name, per-example callable or :class:`LossSpec`.
      compute_dtype: if given (e.g. ``jnp.bfloat16``), params and inputs are cast to it for the
        forward and backward pass; predictions are cast back to float32 before the loss, and the
        gradient arrives in the params' own dtype (float32 master weights).
    """
    spec = get_loss(loss)
    predict = jax.vmap(model.apply, in_axes=(None, 0))
    reduce = batch_mean(spec.fn)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, y, w = _unpack(batch)
        if compute_dtype is not None:
            params, x = _cast_floats(params, compute_dtype), _cast_floats(x, compute_dtype)
        predictions = predict(params, x)
        if compute_dtype is not None:
            predictions = predictions.astype(jnp.float32)
        return reduce(predictions, y, w)

    return loss_fn


def init_state(params: Params, optimizer: optax.GradientTransformation, key: PRNGKey) -> TrainState:
    """A fresh :class:`TrainState` at step 0."""
    _check_optimizer(optimizer)
    return TrainState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32))


def make_update(
    model: Model,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype=None,
) -> Update:
    """The pure, un-jitted update ``(state, batch) -> (state, metrics)``.

    One step of ``optimizer`` on the batch loss; ``metrics`` is ``{"loss": scalar}`` (the loss
    before the update). Use it inside ``lax.scan`` or ``vmap``; :func:`make_train_step` jits it.
    """
    _check_optimizer(optimizer)
    loss_fn = make_loss_fn(model, loss, compute_dtype=compute_dtype)
    value_and_grad = jax.value_and_grad(loss_fn)

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss_value, grads = value_and_grad(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), {"loss": loss_value}

    return update


def make_train_step(
    model: Model,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    compute_dtype=None,
) -> Update:
    """A compiled update step ``step(state, batch) -> (state, metrics)``.

    Args:
      model, loss, optimizer: as in :func:`make_update`.
      donate: donate the input state's buffers to the output (the old state becomes unusable).

    Examples:
      >>> import jax, optax, jax.numpy as jnp
      >>> from jaxnet import mlp, init_state
      >>> net = mlp([2, 4, 1])
      >>> opt = optax.sgd(0.1)
      >>> state = init_state(net.init(jax.random.key(0)), opt, jax.random.key(1))
      >>> step = make_train_step(net, "mse", opt)
      >>> state, metrics = step(state, (jnp.ones((8, 2)), jnp.zeros((8, 1))))
      >>> int(state.step)
      1
    """
    update = make_update(model, loss, optimizer, compute_dtype=compute_dtype)
    return jax.jit(update, donate_argnums=(0,) if donate else ())


def make_eval_fn(model: Model, loss: str | PerExample | LossSpec) -> Callable[[Params, Batch], Metrics]:
    """The pure evaluation ``(params, batch) -> {"loss", "accuracy"?}`` (weighted batch means).

    ``accuracy`` is present when the loss has a metric (classification losses).
    """
    spec = get_loss(loss)
    predict = jax.vmap(model.apply, in_axes=(None, 0))
    reduce_loss = batch_mean(spec.fn)
    reduce_metric = batch_mean(spec.metric) if spec.metric else None

    def evaluate(params: Params, batch: Batch) -> Metrics:
        x, y, w = _unpack(batch)
        predictions = predict(params, x)
        out = {"loss": reduce_loss(predictions, y, w)}
        if reduce_metric is not None:
            out["accuracy"] = reduce_metric(predictions, y, w)
        return out

    return evaluate


