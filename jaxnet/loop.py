"""``fit``: whole epochs compiled as one ``lax.scan``, validation, early stopping, history.

The epoch is a pure function ``(state, x, y) -> (state, metrics)``: it draws a permutation
from ``state.key``, splits the data into minibatches (the last one padded and masked), and
scans the update over them. The loop in Python only runs epochs, evaluates, and calls back.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet.base import Model, Params, PRNGKey, TrainState
from jaxnet.losses import LossSpec, PerExample, get_loss
from jaxnet.shuffle import index_permutation
from jaxnet.members import check_memory, estimate_member_bytes, num_members, set_hyperparams
from jaxnet.step import Update, init_state, make_eval_fn, make_update, skip_nonfinite_updates

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


def epoch_batches(
    key: PRNGKey, num_examples: int, batch_size: int, drop_remainder: bool = False, shuffle: bool = True
):
    """The batch layout of one epoch, shuffled by ``key`` (:func:`jaxnet.shuffle.index_permutation`).

    Returns:
      ``(index, weight)``, both ``(num_batches, batch_size)``: example indices into the data, and
      1.0 for real examples, 0.0 for the padding that fills the last batch.
    """
    nb = num_batches(num_examples, batch_size, drop_remainder)
    perm = index_permutation(key, num_examples) if shuffle else jnp.arange(num_examples, dtype=jnp.int32)
    total = nb * batch_size
    if total <= num_examples:
        index = perm[:total]
        weight = jnp.ones((total,), jnp.float32)
    else:  # pad by repeating the order (cyclically, also when one batch exceeds the data)
        index = perm[jnp.arange(total) % num_examples]
        weight = (jnp.arange(total) < num_examples).astype(jnp.float32)
    return index.reshape(nb, batch_size), weight.reshape(nb, batch_size)


# A shuffled epoch gathers each step's rows inside the loop when an example (x and y together)
# takes at least this many bytes, and the whole epoch's rows up front otherwise. Measured on a
# 2-core CPU against the unshuffled epoch: 784-float rows, batch 1024, lose 11% up front and 4%
# per step (and per step needs no second copy of the data on the device); 3-float rows, batch 1,
# lose 2% up front and 27% per step; 64-float rows do about as well either way.
GATHER_PER_STEP_BYTES = 1024


def _row_bytes(a: jax.Array) -> int:
    return math.prod(a.shape[1:]) * a.dtype.itemsize


def make_epoch(
    update: Update,
    num_examples: int,
    batch_size: int,
    *,
    drop_remainder: bool = False,
    shuffle: bool = True,
    unroll: int = 1,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """One epoch of shuffled minibatch updates as a pure function (jit, vmap or shard it).

    Args:
      update: the per-batch update, ``(state, (x, y[, w])) -> (state, {"loss": scalar})``.
      num_examples: number of training examples ``n``.
      batch_size: examples per update ``b``; the last batch is padded and masked unless
        ``drop_remainder``.
      shuffle: draw a new order each epoch from ``state.key``; False keeps the data's order (a
        stream, a time series) and, when ``b`` divides ``n``, batches are plain reshapes of it.
        Shuffled rows of ``GATHER_PER_STEP_BYTES`` or more are gathered step by step, narrower
        ones for the whole epoch at once.
      unroll: ``lax.scan`` unroll factor.

    Returns:
      ``epoch(state, x: (n, ...), y: (n, ...)) -> (state, metrics)``, with metrics
      ``{"loss": mean train loss over examples (NaN if any step's loss was not finite),
      "first_nonfinite": index of the first step whose loss was not finite (or whose running
      sum overflowed float32), or -1}``. Under ``optax.apply_if_finite`` the optimizer state
      counts the skipped updates (``total_notfinite``).
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {batch_size}")
    if drop_remainder and batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} exceeds the {num_examples} training examples with drop_remainder: "
            "lower the batch size"
        )
    nb = num_batches(num_examples, batch_size, drop_remainder)
    padded = nb * batch_size > num_examples  # only then do updates need per-example weights

    def epoch(state: TrainState, x: jax.Array, y: jax.Array):
        key, shuffle_key = jax.random.split(state.key)
        gather_per_step = (shuffle or padded) and _row_bytes(x) + _row_bytes(y) >= GATHER_PER_STEP_BYTES
        if not (shuffle or padded):  # the data's own order: each step slices its batch from x and y
            batches = None
        else:
            index, weight = epoch_batches(shuffle_key, num_examples, batch_size, drop_remainder, shuffle)
            if gather_per_step:  # each step gathers its rows: no copy of the epoch's data
                batches = (index, weight) if padded else (index,)
            else:  # one gather of the whole epoch up front (see GATHER_PER_STEP_BYTES)
                batches = (x[index], y[index], weight) if padded else (x[index], y[index])

        def batch_of(i, step_input):
            if step_input is None:
                return (jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size),
                        jax.lax.dynamic_slice_in_dim(y, i * batch_size, batch_size))
            if gather_per_step:
                rows, *weight = step_input
                return (x[rows], y[rows], *weight)
            return step_input

        # The epoch's metrics accumulate in the carry (a per-step output buffer would hold members
        # x steps losses when vmapped): the sum of the batch losses, and the number of steps after
        # which that sum was still finite. A non-finite loss leaves the sum non-finite for the rest
        # of the epoch, so that number is the index of the first non-finite step. The step index i
        # is carried (XLA merges it with the loop's own counter); a select of it costs less per
        # step than counting (on a CPU each further op costs about 2% of a small model's step).
        def body(carry, step_input):
            state, total, finite_steps, i = carry
            batch = batch_of(i, step_input)
            state, metrics = update(state, batch)
            loss = metrics["loss"] * jnp.sum(batch[2]) if padded else metrics["loss"]
            total = total + loss.astype(total.dtype)
            i = i + 1
            return (state, total, jnp.where(jnp.isfinite(total), i, finite_steps), i), None

        zero = jnp.zeros((), jnp.int32)
        carry = (state._replace(key=key), jnp.zeros((), jnp.float32), zero, zero)
        (state, total, finite_steps, _), _ = jax.lax.scan(body, carry, batches, length=nb, unroll=unroll)
        finite = jnp.isfinite(total)
        metrics = {
            # without padding every batch has the same size: the mean of the batch losses
            "loss": jnp.where(finite, total / (num_examples if padded else nb), jnp.nan),
            "first_nonfinite": jnp.where(finite, -1, finite_steps),
        }
        return state, metrics

    return epoch


# Fresh copies of a pytree's arrays in one compiled call (eagerly, each leaf shape compiles its own copy).
_copy_tree = jax.jit(functools.partial(jax.tree.map, jnp.copy))


def _skipped_updates(opt_state) -> np.ndarray:
    """Updates that ``optax.apply_if_finite`` (the outermost transformation) has skipped so far."""
    return np.asarray(opt_state.total_notfinite, dtype=np.int64)


def _as_array(name: str, value) -> jax.Array:
    array = jnp.asarray(value)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one example")
    return array


def _check_hparams(epochs: int, batch_size: int) -> None:
    for name, value in (("epochs", epochs), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _data_parallel(update: Update, mesh, batch_size: int):
    """``(update, place, jit_options)`` for training on ``mesh``: the update with its batch split
    over the mesh, how to put arrays on it, and the jit options (all unchanged if ``mesh`` is None)."""
    if mesh is None:
        return update, (lambda tree: tree), {}
    from jaxnet import parallel

    parallel.check_batch_size(batch_size, mesh.size)
    place = lambda tree: parallel.put_replicated(tree, mesh)  # noqa: E731
    return parallel.constrain_batch(update, mesh), place, {"out_shardings": parallel.replicated(mesh)}


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
    shuffle: bool = True,
    unroll: int = 1,
    mesh=None,
    hyperparams: dict | None = None,
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
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of stopping
        (:func:`jaxnet.skip_nonfinite_updates`); each record then counts them in ``skipped``, and
        its ``train_loss`` is NaN when any of the epoch's losses was.
      shuffle: reshuffle the examples every epoch (from ``key``); False trains on them in order.
      unroll: ``lax.scan`` unroll factor for the steps of an epoch.
      mesh: a device mesh from :func:`jaxnet.make_data_mesh` for data-parallel training: each
        batch is split over its ``"data"`` axis (``batch_size`` must divide evenly), params and
        optimizer state are replicated. ``x``/``y`` may be global arrays (multi-process).
      hyperparams: member runs only: name -> ``(K,)`` per-member values of the hyperparameters of an
        ``optax.inject_hyperparams`` optimizer (see :func:`jaxnet.set_hyperparams`).

    Member runs (ensembles and sweeps): when ``key`` is a ``(K,)`` array of keys
    (:func:`jaxnet.member_keys`) and ``params`` have a leading axis K (:func:`jaxnet.init_members`),
    K models train at once, the epoch ``vmap``-ed over the member axis with the data shared. Each
    member then trains as it would alone with its own key. Records hold per-member lists
    (``train_loss``, ``val_loss``, ``val_accuracy``, ``best_epoch``); early stopping is per member
    (a member whose patience ran out keeps its best params, its later values are None) and the run
    stops when every member has stopped. A member whose loss turns non-finite stops likewise (None
    values); NonFiniteLossError is raised only when every member has.

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

    if num_members(key if resume is None else resume.train.key) is not None:
        if mesh is not None:
            raise ValueError("member runs train on one device: drop mesh, or train members one by one on the mesh")
        return _fit_members(
            model, params, x, y, spec=spec, optimizer=optimizer, epochs=epochs, batch_size=batch_size, key=key,
            validation=validation, patience=patience, monitor=monitor, drop_remainder=drop_remainder,
            callbacks=callbacks, resume=resume, compute_dtype=compute_dtype, skip_nonfinite=skip_nonfinite,
            shuffle=shuffle, unroll=unroll, hyperparams=hyperparams,
        )
    if hyperparams is not None:
        raise ValueError("hyperparams are per-member values: give a (K,) array of keys (member_keys) for a member run")

    n = x.shape[0]
    if skip_nonfinite:
        optimizer = skip_nonfinite_updates(optimizer)
    update = make_update(model, spec, optimizer, compute_dtype=compute_dtype)
    update, place, jit_options = _data_parallel(update, mesh, batch_size)
    epoch_fn = make_epoch(update, n, batch_size, drop_remainder=drop_remainder, shuffle=shuffle, unroll=unroll)
    run_epoch = jax.jit(epoch_fn, donate_argnums=(0,), **jit_options)
    evaluate = jax.jit(make_eval_fn(model, spec), **jit_options)
    steps_per_epoch = num_batches(n, batch_size, drop_remainder)

    if resume is None:
        resume = FitState(jax.jit(lambda p, k: init_state(p, optimizer, k))(params, key), 0, [])
    # Epochs donate the state's buffers; copy first so the caller's params and key stay valid.
    fit_state = resume._replace(train=_copy_tree(place(resume.train)))
    x, y = place((x, y))
    history = list(fit_state.history)
    if validation is not None:
        xv, yv = place((_as_array("validation x", validation[0]), _as_array("validation y", validation[1])))
    sign = 1.0 if monitor == "val_loss" else -1.0
    skipped_before = _skipped_updates(fit_state.train.opt_state) if skip_nonfinite else None
    if patience is not None and fit_state.best_epoch and fit_state.epoch - fit_state.best_epoch >= patience:
        epochs = fit_state.epoch  # resuming a run that had stopped early: nothing left to do

    while fit_state.epoch < epochs:
        start = time.perf_counter()
        train, metrics = run_epoch(fit_state.train, x, y)
        metrics = jax.device_get(metrics)  # one host sync per epoch
        train_loss = float(metrics["loss"])
        epoch = fit_state.epoch + 1
        bad = int(metrics["first_nonfinite"])
        if bad >= 0 and not skip_nonfinite:
            raise NonFiniteLossError(epoch, fit_state.epoch * steps_per_epoch + bad + 1)
        record: Record = {"epoch": epoch, "train_loss": train_loss}
        if skip_nonfinite:
            skipped = _skipped_updates(train.opt_state)
            record["skipped"] = int(skipped - skipped_before)
            skipped_before = skipped
        best_params, best_epoch = fit_state.best_params, fit_state.best_epoch
        if validation is not None:
            val = evaluate(train.params, (xv, yv))
            record.update({f"val_{k}": float(v) for k, v in val.items()})
            best_value = history[best_epoch - 1][monitor] if best_epoch else math.inf * sign
            if best_epoch == 0 or sign * record[monitor] < sign * best_value:
                best_params = _copy_tree(train.params)
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


@jax.jit
def _where_members(mask: jax.Array, new, old):
    """Per member (leading axis), ``new`` where ``mask`` else ``old``."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _member_values(values, keep: np.ndarray) -> list:
    return [float(v) if k and math.isfinite(float(v)) else None for v, k in zip(np.asarray(values), keep)]


def _fit_members(
    model, params, x, y, *, spec, optimizer, epochs, batch_size, key, validation, patience, monitor,
    drop_remainder, callbacks, resume, compute_dtype, skip_nonfinite, shuffle, unroll, hyperparams,
) -> tuple[TrainState, list[Record]]:
    """:func:`fit` for K members at once (leading member axis); arguments as there."""
    k = num_members(key if resume is None else resume.train.key)
    if resume is None:
        shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
        if not shapes or any(len(s) == 0 or s[0] != k for s in shapes):
            raise ValueError(
                f"{k} member keys need params with a leading member axis of {k}, got leaf shapes {shapes[:4]}: "
                "use init_members(model, keys)"
            )
        # Refuse a K that cannot fit before compiling (params exist already; the rest is estimated).
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
        check_memory(estimate_member_bytes(one, jax.eval_shape(optimizer.init, one), batch_size, k), k)
    n = x.shape[0]
    if skip_nonfinite:
        optimizer = skip_nonfinite_updates(optimizer)
    update = make_update(model, spec, optimizer, compute_dtype=compute_dtype)
    epoch_fn = make_epoch(update, n, batch_size, drop_remainder=drop_remainder, shuffle=shuffle, unroll=unroll)
    run_epoch = jax.jit(jax.vmap(epoch_fn, in_axes=(0, None, None)), donate_argnums=(0,))
    evaluate = jax.jit(jax.vmap(make_eval_fn(model, spec), in_axes=(0, None)))
    steps_per_epoch = num_batches(n, batch_size, drop_remainder)

    if resume is None:
        train = jax.jit(jax.vmap(lambda p, kk: init_state(p, optimizer, kk)))(params, key)
        if hyperparams:
            train = train._replace(opt_state=set_hyperparams(train.opt_state, hyperparams))
        resume = FitState(train, 0, [], None, [0] * k)
    elif hyperparams:
        raise ValueError("hyperparams are set when a member run starts; a resumed run keeps its optimizer state")
    fit_state = resume._replace(train=_copy_tree(resume.train))
    history = list(fit_state.history)
    if validation is not None:
        xv, yv = _as_array("validation x", validation[0]), _as_array("validation y", validation[1])
    sign = 1.0 if monitor == "val_loss" else -1.0
    skipped_before = _skipped_updates(fit_state.train.opt_state) if skip_nonfinite else None
    best_epoch = np.asarray(fit_state.best_epoch or [0] * k, dtype=np.int64).reshape(k)
    best_value = np.array(
        [history[e - 1][monitor][i] if e and history[e - 1][monitor][i] is not None else math.inf * sign
         for i, e in enumerate(best_epoch)], dtype=np.float64,
    ) if validation is not None else np.full(k, math.inf * sign)
    last = history[-1] if history else {}
    # A member stopped (patience ran out or diverged) when its values in the last record are None.
    stopped = np.array([v is None for v in last.get("train_loss", [0.0] * k)], dtype=bool)
    if patience is not None and history:
        stopped |= fit_state.epoch - best_epoch >= patience
    best_params = fit_state.best_params

    while fit_state.epoch < epochs:
        start = time.perf_counter()
        train, metrics = run_epoch(fit_state.train, x, y)
        metrics = jax.device_get(metrics)  # one host sync per epoch
        losses = np.asarray(metrics["loss"])
        epoch = fit_state.epoch + 1
        active = ~stopped
        first_bad = np.asarray(metrics["first_nonfinite"])
        diverged = active & (first_bad >= 0) if not skip_nonfinite else np.zeros(k, bool)
        if active.all() and diverged.all():  # every member diverged at once: as a single run would
            bad = int(np.min(first_bad))
            raise NonFiniteLossError(epoch, fit_state.epoch * steps_per_epoch + bad + 1)
        record: Record = {"epoch": epoch, "train_loss": _member_values(losses, active & ~diverged)}
        if skip_nonfinite:
            skipped = _skipped_updates(train.opt_state)
            record["skipped"] = [int(v) for v in skipped - skipped_before]
            skipped_before = skipped
        keep = active & ~diverged
        if validation is not None:
            val = evaluate(train.params, (xv, yv))
            record.update({f"val_{name}": _member_values(v, keep) for name, v in val.items()})
            current = np.asarray(val[monitor[len("val_"):]], dtype=np.float64)
            improved = keep & ((best_epoch == 0) | (sign * current < sign * best_value))
            if best_params is None:
                best_params = _copy_tree(train.params)
            elif improved.any():
                best_params = _where_members(jnp.asarray(improved), train.params, best_params)
            best_epoch = np.where(improved, epoch, best_epoch)
            best_value = np.where(improved, current, best_value)
            record["best_epoch"] = [int(e) for e in best_epoch]
        record["seconds"] = time.perf_counter() - start
        record["steps"] = steps_per_epoch
        history.append(record)
        stopped = stopped | diverged
        if patience is not None:
            stopped |= epoch - best_epoch >= patience
        fit_state = FitState(train, epoch, history, best_params, [int(e) for e in best_epoch])
        stop = any([bool(cb(fit_state, record)) for cb in callbacks])
        if stopped.all() or stop:
            break

    final = fit_state.train
    if fit_state.best_params is not None:
        final = final._replace(params=fit_state.best_params)
    return final, history
