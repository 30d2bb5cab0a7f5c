"""``fit``: whole epochs compiled as one ``lax.scan``, validation, early stopping, history.

The epoch is a pure function ``(state, x, y) -> (state, metrics)``: it draws a permutation
from ``state.key``, splits the data into minibatches (the last one padded and masked), and
scans the update over them. The loop in Python only runs epochs, evaluates, and calls back.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet.base import Model, Params, PRNGKey, TrainState
from jaxnet.losses import LossSpec, PerExample, get_loss
from jaxnet.step import Update, init_state, make_eval_fn, make_update

Record = dict[str, Any]


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss; ``epoch`` and ``step`` (1-based, global) say where."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step
        super().__init__(
            f"loss became non-finite at epoch {epoch}, step {step}: lower the learning rate, "
            "check the data for extreme values, or skip such updates (skip_nonfinite)"
        )


class FitState(NamedTuple):
    """The loop's state between epochs: all that is needed to resume exactly.

    Attributes:
      train: the :class:`TrainState` (params, optimizer state, key, step).
      epoch: number of completed epochs.
      history: one record per completed epoch.
      best_params: params of the best epoch so far (early stopping), or None.
      best_epoch: 1-based epoch of ``best_params``, 0 if none.
    """

    train: TrainState
    epoch: int
    history: list
    best_params: Params | None = None
    best_epoch: int = 0


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Minibatches per epoch: ``ceil(n / b)``, or ``floor(n / b)`` with ``drop_remainder``."""
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def epoch_batches(key: PRNGKey, num_examples: int, batch_size: int, drop_remainder: bool = False):
    """The shuffled batch layout of one epoch.

    Returns:
      ``(index, weight)``, both ``(num_batches, batch_size)``: example indices into the data, and
      1.0 for real examples, 0.0 for the padding that fills the last batch.
    """
    nb = num_batches(num_examples, batch_size, drop_remainder)
    perm = jax.random.permutation(key, num_examples)
    total = nb * batch_size
    if total <= num_examples:
        index = perm[:total]
        weight = jnp.ones((total,), jnp.float32)
    else:
        pad = total - num_examples
        index = jnp.concatenate([perm, perm[:pad]])
        weight = (jnp.arange(total) < num_examples).astype(jnp.float32)
    return index.reshape(nb, batch_size), weight.reshape(nb, batch_size)


def make_epoch(
    update: Update,
    num_examples: int,
    batch_size: int,
    *,
    drop_remainder: bool = False,
    unroll: int = 1,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """One epoch of shuffled minibatch updates as a pure function (jit, vmap or shard it).

    Args:
      update: the per-batch update, ``(state, (x, y, w)) -> (state, {"loss": scalar})``.
      num_examples: number of training examples ``n``.
      batch_size: examples per update ``b``; the last batch is padded and masked unless
        ``drop_remainder``.
      unroll: ``lax.scan`` unroll factor.

    Returns:
      ``epoch(state, x: (n, ...), y: (n, ...)) -> (state, metrics)``, with metrics
      ``{"loss": mean train loss over examples, "first_nonfinite": index of the first step whose
      loss was not finite, or -1}``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch_size}")
    if drop_remainder and batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} exceeds the {num_examples} training examples with drop_remainder: "
            "lower the batch size"
        )

    def epoch(state: TrainState, x: jax.Array, y: jax.Array):
        key, shuffle_key = jax.random.split(state.key)
        index, weight = epoch_batches(shuffle_key, num_examples, batch_size, drop_remainder)
        batches = (x[index], y[index], weight)

        def body(state, batch):
            state, metrics = update(state, batch)
            return state, metrics["loss"]

        state, losses = jax.lax.scan(body, state._replace(key=key), batches, unroll=unroll)
        counts = jnp.sum(weight, axis=1)
        finite = jnp.isfinite(losses)
        metrics = {
            "loss": jnp.sum(losses * counts) / jnp.sum(counts),
            "first_nonfinite": jnp.where(jnp.all(finite), -1, jnp.argmin(finite)),
            "nonfinite": jnp.sum(~finite),
        }
        return state, metrics

    return epoch


def _as_array(name: str, value) -> jax.Array:
    array = jnp.asarray(value)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one example")
    return array


def _check_hparams(epochs: int, batch_size: int) -> None:
    for name, value in (("epochs", epochs), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def fit(
    model: Model,
    params: Params,
    x,
    y,
    *,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: PRNGKey,
    validation: tuple | None = None,
    patience: int | None = None,
    monitor: str = "val_loss",
    drop_remainder: bool = False,
    callbacks: Sequence[Callable[[FitState, Record], bool | None]] = (),
    resume: FitState | None = None,
    compute_dtype=None,
    skip_nonfinite: bool = False,
    unroll: int = 1,
) -> tuple[TrainState, list[Record]]:
    """Trains ``model`` on ``(x, y)`` with minibatch ``optimizer`` steps, one compiled call per epoch.

    Args:
      model: the model.
      params: initial params (ignored when ``resume`` is given).
      x: ``(n, ...)`` inputs; y: ``(n, ...)`` targets (integer labels for cross-entropy).
      loss: a loss name, per-example callable or :class:`LossSpec`.
      optimizer: any optax ``GradientTransformation``.
      epochs: total number of epochs (including those already done when resuming).
      batch_size: examples per step; the last partial batch is padded and masked (its update
        averages over its real examples only) unless ``drop_remainder``.
      key: PRNG key for shuffling; the run is reproducible from it.
      validation: optional ``(x_val, y_val)`` evaluated after every epoch.
      patience: stop after this many epochs without improvement of ``monitor`` (needs
        ``validation``); the returned params are then the best epoch's.
      monitor: ``"val_loss"`` (lower is better) or ``"val_accuracy"`` (higher is better).
      drop_remainder: drop the last partial batch instead of masking it.
      callbacks: called after each epoch as ``cb(fit_state, record)``; returning True stops.
      resume: a :class:`FitState` (e.g. from a checkpoint) to continue from.
      compute_dtype: e.g. ``jnp.bfloat16`` for mixed precision (float32 master params).
      skip_nonfinite: skip updates whose gradients are not finite (``optax.apply_if_finite``)
        instead of stopping; each record then counts them in ``skipped``.
      unroll: ``lax.scan`` unroll factor for the steps of an epoch.

    Returns:
      ``(state, history)``: the final :class:`TrainState` (with the best params when validation
      is given) and one record per epoch: ``epoch``, ``train_loss``, ``val_loss``,
      ``val_accuracy`` (when the loss has a metric), ``seconds`` and ``steps``.

    Raises:
      NonFiniteLossError: a step produced a non-finite loss (the state is left as it was before
        that epoch, which callbacks have already seen).
    """
    spec = get_loss(loss)
    _check_hparams(epochs, batch_size)
    if monitor not in ("val_loss", "val_accuracy"):
        raise ValueError(f"unknown monitor {monitor!r}: use 'val_loss' or 'val_accuracy'")
    if monitor == "val_accuracy" and spec.metric is None:
        raise ValueError(f"monitor 'val_accuracy' needs a classification loss, not {spec.name!r}")
    if patience is not None and (not isinstance(patience, int) or patience <= 0):
        raise ValueError(f"patience must be a positive integer, got {patience!r}")
    if patience is not None and validation is None:
        raise ValueError("early stopping (patience) needs validation data")
    x, y = _as_array("x", x), _as_array("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")

    n = x.shape[0]
    if skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)
    update = make_update(model, spec, optimizer, compute_dtype=compute_dtype)
    run_epoch = jax.jit(
        make_epoch(update, n, batch_size, drop_remainder=drop_remainder, unroll=unroll), donate_argnums=(0,)
    )
    evaluate = jax.jit(make_eval_fn(model, spec))
    steps_per_epoch = num_batches(n, batch_size, drop_remainder)

    if resume is None:
        resume = FitState(init_state(params, optimizer, key), 0, [])
    # Epochs donate the state's buffers; copy first so the caller's params and key stay valid.
    fit_state = resume._replace(train=jax.tree.map(jnp.copy, resume.train))
    history = list(fit_state.history)
    if validation is not None:
        xv, yv = _as_array("validation x", validation[0]), _as_array("validation y", validation[1])
    sign = 1.0 if monitor == "val_loss" else -1.0
    if patience is not None and fit_state.best_epoch and fit_state.epoch - fit_state.best_epoch >= patience:
        epochs = fit_state.epoch  # resuming a run that had stopped early: nothing left to do

    while fit_state.epoch < epochs:
        start = time.perf_counter()
        train, metrics = run_epoch(fit_state.train, x, y)
        train_loss = float(metrics["loss"])  # one host sync per epoch
        epoch = fit_state.epoch + 1
        bad = int(metrics["first_nonfinite"])
        if bad >= 0 and not skip_nonfinite:
            raise NonFiniteLossError(epoch, fit_state.epoch * steps_per_epoch + bad + 1)
        record: Record = {"epoch": epoch, "train_loss": train_loss}
        if skip_nonfinite:
            record["skipped"] = int(metrics["nonfinite"])
        best_params, best_epoch = fit_state.best_params, fit_state.best_epoch
        if validation is not None:
            val = evaluate(train.params, (xv, yv))
            record.update({f"val_{k}": float(v) for k, v in val.items()})
            best_value = history[best_epoch - 1][monitor] if best_epoch else math.inf * sign
            if best_epoch == 0 or sign * record[monitor] < sign * best_value:
                best_params = jax.tree.map(jnp.copy, train.params)
                best_epoch = epoch
        record["seconds"] = time.perf_counter() - start
        record["steps"] = steps_per_epoch
        history.append(record)
        fit_state = FitState(train, epoch, history, best_params, best_epoch)
        stop = any([bool(cb(fit_state, record)) for cb in callbacks])
        if patience is not None and epoch - best_epoch >= patience:
            break
        if stop:
            break

    final = fit_state.train
    if fit_state.best_params is not None:
        final = final._replace(params=fit_state.best_params)
    return final, history
