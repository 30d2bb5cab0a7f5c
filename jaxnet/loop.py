"""``fit``: whole epochs compiled as one call each, validation, early stopping, history.

One host loop serves single runs and member runs (K models under ``vmap``): its bookkeeping (best
epoch, best value, stopped, skipped updates) is arrays with a member axis, K = 1 for a single run.
Only the compiled programs differ: ``jit(epoch)`` (optionally data parallel on a mesh) or
``jit(vmap(epoch))``. The loop in Python runs epochs, evaluates, keeps the best params and calls
back; it does no I/O of its own.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import _checks as checks
from jaxnet import _programs as programs
from jaxnet import _progress as progress
from jaxnet import _weights as weights
from jaxnet import hooks, parts, sources, summaries
from jaxnet import sharding as shardinglib
from jaxnet._checks import ArgumentError
from jaxnet._feed import CHUNK_BYTES, Position, split_keys
from jaxnet._options import FitOptions
from jaxnet.averaging import averaged
from jaxnet.base import Params, PRNGKey, StatefulModel, TrainState
from jaxnet.forward import AnyModel, check_model_state, check_params
from jaxnet.groups import finetuning
from jaxnet.hooks import Callback, Record
from jaxnet.lm import GPT
from jaxnet.losses import LossSpec, PerExample, get_loss, has_token_axis
from jaxnet.members import check_memory, estimate_member_bytes, memory_limit, num_members, set_hyperparams
from jaxnet.metrics import Metric, check_metric_targets, get_metrics, monitor_sign
from jaxnet.step import check_optimizer, init_state, skip_nonfinite_updates, spikes_of

MONITORS = ("val_loss", "val_accuracy")
"""What early stopping may monitor, besides ``val_<name>`` of a named metric given to ``fit``."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; ``epoch`` and ``step`` (1-based, global) say where.

    Like :class:`jaxnet._checks.ArgumentError`, it names an argument (``skip_nonfinite``) through
    ``template``, so that a front end can :meth:`render` it in its own spelling.
    """

    def __init__(self, epoch: int, step: int, context: str = "", names: tuple = (), by_steps: bool = False):
        """``context``: more of the template, naming ``names`` as ``{1}``, ``{2}`` ...; ``by_steps``:
        a run by steps (its epochs are rounds: only the step is named)."""
        self.epoch, self.step, self.names = epoch, step, ("skip_nonfinite", *names)
        at = f"step {step}" if by_steps else f"epoch {epoch}, step {step}"
        self.template = (
            f"loss became non-finite at {at}: lower the learning rate, "
            "check the data for extreme values or class ids outside the model's classes, or skip such updates ({0})"
            + context
        )
        super().__init__(self.template.format(*self.names))

    def render(self, spell) -> str:
        return self.template.format(*(spell(name) for name in self.names))


class FitState(NamedTuple):
    """The loop's complete state after an epoch: what :func:`fit` returns and resumes from.

    Attributes:
      train: the last epoch's :class:`TrainState` (params, optimizer state, key, step); leaves
        have a leading member axis K in a member run.
      epoch: number of completed epochs.
      history: one record per completed epoch.
      best_params: params of the best epoch by the monitored metric (with validation), else None.
      best_epoch: 1-based epoch of ``best_params`` (0 if none); a list of K in a member run.
      best_model_state: a stateful model's state of the best epoch (running statistics), else None.
      position: None at an epoch's end; inside epoch ``epoch + 1`` (a chunked or streamed epoch
        stopped between chunks: a mid-epoch checkpoint), the :class:`jaxnet._feed.Position` that
        resumes it exactly.
    """

    train: TrainState
    epoch: int
    history: list
    best_params: Params | None = None
    best_epoch: int | list = 0
    best_model_state: Any = None
    position: Any = None

    @property
    def steps(self) -> int:
        """The optimizer steps done so far (the name of this state's checkpoint)."""
        return int(np.max(np.asarray(jax.device_get(self.train.step))))

    @property
    def params(self) -> Params:
        """The params to use: the best epoch's with validation, else the last epoch's (their
        moving average when ``fit(ema=...)`` keeps one)."""
        return averaged(self.train.params, self.train.opt_state) if self.best_params is None else self.best_params

    @property
    def model_state(self) -> Any:
        """The model state that goes with :attr:`params` (None for a plain model)."""
        return self.train.model_state if self.best_params is None else self.best_model_state


class _Book(NamedTuple):
    """Host-side bookkeeping, one entry per member: ``(K,)`` numpy arrays."""

    best_epoch: np.ndarray
    best_value: np.ndarray
    stopped: np.ndarray
    skipped: np.ndarray | None
    spikes: np.ndarray | None = None  # loss spikes skipped so far (jaxnet.skip_spikes), or None


def _spikes(opt_state, k: int) -> np.ndarray | None:
    """The ``(K,)`` loss spikes :func:`jaxnet.skip_spikes` has skipped so far (None without it)."""
    spikes = spikes_of(opt_state)
    return None if spikes is None else np.broadcast_to(np.ravel(np.asarray(spikes)), (k,)).astype(np.int64)


# Fresh copies of a pytree's arrays in one compiled call (eagerly, each leaf shape compiles its own copy).
_copy_tree = jax.jit(functools.partial(jax.tree.map, jnp.copy))


@jax.jit
def _where_members(mask: jax.Array, new, old):
    """Per member (leading axis), ``new`` where ``mask`` else ``old``."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def init_fit_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    key: PRNGKey,
    *,
    skip_nonfinite: bool = False,
    hyperparams: dict | None = None,
    model_state: Any = None,
    mesh=None,
    sharding=None,
) -> FitState:
    """The :class:`FitState` that :func:`fit` starts from (epoch 0, empty history).

    ``jax.eval_shape`` of it is the template that :func:`jaxnet.checkpoint.restore` needs. The
    state holds copies of ``params`` and ``key`` (one compiled call makes them and the optimizer
    state), so that the caller's arrays stay valid while the epochs donate the state's.

    Args:
      params: the initial params; with a leading member axis K when ``key`` is ``(K,)``.
      optimizer: the optax optimizer (wrapped by :func:`jaxnet.skip_nonfinite_updates` when
        ``skip_nonfinite``, as :func:`fit` does).
      key: the PRNG key of shuffling (and dropout); a ``(K,)`` array of keys for a member run.
      skip_nonfinite, hyperparams, model_state, mesh, sharding: as in :func:`fit`; on a mesh the
        state is created laid out on it (the optimizer state never exists whole on one device).
    """
    if skip_nonfinite:
        optimizer = skip_nonfinite_updates(optimizer)

    def fresh(p, kk, s):  # (init_state copies: the state's buffers are donated to the epochs, the caller's not)
        return init_state(p, optimizer, kk, s)

    k = num_members(key)
    if k is None:
        if hyperparams is not None:
            raise ValueError("hyperparams are per-member values: give a (K,) array of keys (member_keys)")
        if mesh is None:
            return FitState(jax.jit(fresh)(params, key, model_state), 0, [])
        shapes = jax.eval_shape(fresh, params, key, model_state)
        laid_out = jax.jit(fresh, out_shardings=shardinglib.state_shardings(shapes, mesh, sharding))
        return FitState(laid_out(params, key, model_state), 0, [])
    shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    if not shapes or any(len(s) == 0 or s[0] != k for s in shapes):
        raise ValueError(
            f"{k} member keys need params with a leading member axis of {k}, got leaf shapes {shapes[:4]}: "
            "use init_members(model, keys)"
        )
    train = jax.jit(jax.vmap(fresh))(params, key, model_state)
    if hyperparams:
        train = train._replace(opt_state=set_hyperparams(train.opt_state, hyperparams))
    return FitState(train, 0, [], None, [0] * k)


def _check_call(params, resume, callbacks, unroll, compute_dtype) -> None:
    """Refuses arguments of the wrong kind, naming them, before anything is read."""
    if resume is None and params is None:
        raise TypeError("params: give the model's initial params (model.init(key)), or resume=a FitState")
    if resume is not None and not isinstance(resume, FitState):
        raise TypeError(f"resume must be a FitState (returned by fit, or restored from a checkpoint), got "
                        f"{type(resume).__name__}")  # fmt: skip
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of callbacks, got {type(callbacks).__name__}: give [callback]")
    checks.integer("unroll", unroll)
    if compute_dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(
                f"compute_dtype must be a floating dtype (jnp.bfloat16, jnp.float16), got {compute_dtype!r}"
            )


def _as_array(name: str, value) -> jax.Array:
    # device_put, not jnp.asarray: the latter compiles a program of its own for each new shape
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if not (
        jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating) or array.dtype == np.bool_
    ):  # fmt: skip (complex numbers, strings, objects)
        raise TypeError(f"{name} holds {array.dtype} values: give an array of numbers (bool, int or float)")
    array = array if isinstance(array, jax.Array) else jax.device_put(array)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one example")
    return array


def _check_pair(name: str, x, y) -> tuple:
    names = ("x", "y") if name == "x" else (f"{name} x", f"{name} y")
    x, y = _as_array(names[0], x), _as_array(names[1], y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{names[0]} has {x.shape[0]} examples but {names[1]} has {y.shape[0]}")
    return x, y


def _check_data(x, y, validation, sample_weight=None, once: bool = False) -> programs.Data:
    """The fit's data: resident ``(x, y)`` pairs placed as arrays (with ``sample_weight``), or
    sources (:mod:`jaxnet.sources`); ``once``: an iterator may be given (read once: a fit by steps
    that it outlasts, or of one epoch)."""
    train = sources.as_source(x, y, "x", once=once)
    sources.require_targets(train, "x")
    if train is not None and sample_weight is not None:
        raise ValueError(
            "sample_weight: per-example weights travel with arrays in memory; for streamed data weigh classes "
            "(class_weight) or put the weights into your own loss"
        )
    if train is None:
        train = _check_pair("x", x, y)
        if sample_weight is not None:
            tokens = train[1].shape if has_token_axis(train[1]) else None
            train = (*train, weights.check_sample_weight(sample_weight, train[0].shape[0], tokens))
    if validation is None:
        return programs.Data(train, None)
    if isinstance(validation, tuple) and len(validation) != 2 and all(sources.is_resident(v) for v in validation):
        raise TypeError(f"validation must be a pair (x_val, y_val) or a data source, got a tuple of {len(validation)}")
    # a pair (x_val, y_val), unless its first element is itself a batch (a list of two batches)
    if isinstance(validation, (tuple, list)) and len(validation) == 2 and not isinstance(validation[0], tuple):
        source = sources.as_source(*validation, "validation")
        return programs.Data(train, _check_pair("validation", *validation) if source is None else source)
    source = sources.as_source(validation, None, "validation")
    sources.require_targets(source, "validation")
    return programs.Data(train, source)


def _check_length(epochs, steps, eval_every) -> None:
    """A fit lasts ``epochs`` or ``steps`` (with evaluations every ``eval_every`` steps): one of them."""
    if (epochs is None) == (steps is None):
        raise ValueError("give epochs (whole passes over the data) or steps (optimizer steps), not both" if steps else
                         "give epochs (whole passes over the data) or steps (optimizer steps)")  # fmt: skip
    if steps is None:
        checks.integer("epochs", epochs)
        if eval_every is not None:
            raise ValueError("eval_every counts steps: give steps (instead of epochs) with it")
    else:
        checks.integer("steps", steps)
        checks.optional_integer("eval_every", eval_every)


def _check_options(spec: LossSpec, batch_size, patience, monitor, validation, metrics=()) -> None:
    checks.integer("batch_size", batch_size)
    checks.choice("monitor", monitor, (*MONITORS, *(f"val_{m.name}" for m in metrics)))
    if monitor == "val_accuracy" and spec.metric is None:
        raise ValueError(f"monitor 'val_accuracy' needs a classification loss, not {spec.name!r}")
    checks.optional_integer("patience", patience)
    if patience is not None and validation is None:
        raise ValueError("early stopping (patience) needs validation data")


def _skipped_updates(opt_state, k: int) -> np.ndarray:
    """Updates that ``optax.apply_if_finite`` (the outermost transformation) has skipped so far."""
    return np.asarray(opt_state.total_notfinite, dtype=np.int64).reshape(k)


def _per_member(value, k: int) -> list:
    """A record's value as a list of K (a single run's records hold scalars)."""
    return list(value) if isinstance(value, list) else [value] * k


def _open_book(
    state: FitState, monitor: str, patience: int | None, skip_nonfinite: bool, metrics: tuple[Metric, ...] = ()
) -> _Book:
    """The bookkeeping of ``state``: fresh, or rebuilt from a resumed state's history."""
    k = num_members(state.train.key) or 1
    sign = monitor_sign(monitor, metrics)
    best_epoch = np.asarray(_per_member(state.best_epoch, k), dtype=np.int64)
    best_value = np.full(k, math.inf * sign)
    stopped = np.zeros(k, bool)
    if state.history:
        last = state.history[-1]
        stopped |= np.array([v is None for v in _per_member(last["train_loss"], k)])
        for i, e in enumerate(best_epoch):
            value = _per_member(state.history[e - 1].get(monitor), k)[i] if e else None
            best_value[i] = math.inf * sign if value is None else value
        if patience is not None:
            stopped |= (best_epoch > 0) & (state.epoch - best_epoch >= patience)
    skipped = _skipped_updates(state.train.opt_state, k) if skip_nonfinite else None
    return _Book(best_epoch, best_value, stopped, skipped, _spikes(state.train.opt_state, k))


def is_finished(
    state: FitState,
    *,
    epochs: int | None = None,
    patience: int | None = None,
    monitor: str = "val_loss",
    steps: int | None = None,
) -> bool:
    """Whether :func:`fit` would train ``state`` no further: all ``epochs`` (or ``steps``) done, or
    every member stopped (early stopping, or a non-finite loss)."""
    if steps is not None:
        return state.steps >= steps or bool(_open_book(state, monitor, patience, False).stopped.all())
    if state.position is not None:
        return False
    return state.epoch >= epochs or bool(_open_book(state, monitor, patience, False).stopped.all())


def _values(array, keep: np.ndarray) -> list:
    """Per-member floats of ``array``, None for members not kept (stopped or diverged)."""
    return [float(v) if kept else None for v, kept in zip(np.asarray(array).reshape(keep.shape), keep)]


def _train_metrics(sums: dict, named: tuple, members: int | None) -> dict:
    """``{"train_<name>": (K,) results}`` of the training metrics' summed states."""
    out = {}
    for m in named:
        state = np.asarray(sums[m.name], np.float64)
        out[f"train_{m.name}"] = np.asarray([m.result(s) for s in (state if members else [state])])
    return out


def _record(epoch: int, metrics: dict, val: dict | None, book: _Book, keep: np.ndarray, train) -> Record:
    record: Record = {"epoch": epoch, "train_loss": _values(metrics["loss"], keep)}
    record.update({name: _values(v, keep) for name, v in metrics.get("train_metrics", {}).items()})
    if book.skipped is not None:
        record["skipped"] = [int(v) for v in _skipped_updates(train.opt_state, keep.size) - book.skipped]
    if book.spikes is not None:  # this epoch's, as skipped
        record["spikes"] = [int(v) for v in _spikes(train.opt_state, keep.size) - book.spikes]
    if val is not None:
        record.update({f"val_{name}": _values(v, keep) for name, v in val.items()})
        record["best_epoch"] = [int(e) for e in book.best_epoch]
    return record


def _keep_best(improved: np.ndarray, params, best, members: int | None):
    """``best`` with every improved member's params taken from ``params``."""
    if best is None:
        return _copy_tree(params)
    if members is None:
        return _copy_tree(params) if improved[0] else best
    return _where_members(jnp.asarray(improved), params, best) if improved.any() else best


def _improve(book: _Book, val: dict, keep: np.ndarray, epoch: int, options: FitOptions) -> tuple[_Book, np.ndarray]:
    monitor = options.monitor
    sign = monitor_sign(monitor, options.metrics)
    current = np.asarray(val[monitor[len("val_") :]], dtype=np.float64).reshape(keep.shape)
    improved = keep & ((book.best_epoch == 0) | (sign * current < sign * book.best_value))
    book = book._replace(
        best_epoch=np.where(improved, epoch, book.best_epoch),
        best_value=np.where(improved, current, book.best_value),
    )
    return book, improved


def _chunk_hook(state: FitState, options: FitOptions, before: int) -> Callable:
    """``on_chunk(carry, position, last)`` for a chunked epoch: at every ``log_every_steps``-th step
    of the epoch the callbacks' ``on_step(fit_state, step_record)``; between two chunks their
    ``on_chunk(fit_state)`` with the state there, True from any of which stops the epoch."""
    chunk_hooks = hooks.bound(options.callbacks, hooks.OnChunk)
    loggers = hooks.bound(options.callbacks, hooks.OnStep)
    every = options.log_every_steps

    def on_chunk(carry, position, last: bool) -> bool:
        inside = state._replace(train=carry.state, position=position)
        if every is not None and position.steps % every == 0 and loggers:
            values = jax.device_get(carry.last)
            step = before + position.steps
            record = {"step": step, "epoch": state.epoch + 1, **{k: float(v) for k, v in values.items()}}
            for log in loggers:
                log(inside, record)
        if last or not chunk_hooks:
            return False
        return any([bool(hook(inside)) for hook in chunk_hooks])

    return on_chunk


def _epoch(
    state: FitState, book: _Book, compiled: programs.Programs, options: FitOptions
) -> tuple[FitState, _Book, Record | None]:
    """Runs one epoch (or the rest of one) and its validation; returns the new state, bookkeeping
    and record, or the state inside the epoch and no record when a callback stopped it there."""
    start = time.perf_counter()
    before = state.steps - (state.position.steps if state.position is not None else 0)
    hook = _chunk_hook(state, options, before)
    train, metrics, position = compiled.train_epoch(state.train, state.position, hook)
    if metrics is None:  # stopped between two chunks
        return state._replace(train=train, position=position), book, None
    metrics = jax.device_get(metrics)  # one host sync per epoch
    return _conclude(state, book, compiled, options, train, metrics, None, start, before)


class _Tally(NamedTuple):
    """A round's running sums at a chunk's end, on the host in their own dtypes (see :func:`_round`)."""

    total: np.ndarray
    weight: np.ndarray | None
    examples: float
    finite_steps: np.ndarray
    sums: dict | None


def _tally(carry, position) -> _Tally:
    total, weight, finite, sums = jax.device_get((carry.total, carry.weight, carry.finite_steps, carry.sums))
    return _Tally(np.asarray(total), weight, float(position.examples), np.asarray(finite), sums)


def _restart_sums(position):
    """``position`` (inside an epoch) with the running sums started afresh: a round's figures are
    its own, while the data goes on where it stands."""
    zero = jax.tree.map(jnp.zeros_like, (position.total, position.weight, position.sums))
    finite = jnp.full_like(position.finite_steps, position.steps)
    return position._replace(total=zero[0], weight=zero[1], sums=zero[2], examples=0, finite_steps=finite)


def _next_epoch(train: TrainState, so_far: _Tally, order: tuple) -> tuple[TrainState, Position]:
    """The start of a new epoch of the data inside a round: the key split as a new epoch splits it,
    and a position at its first step holding the round's sums so far (so that a checkpoint in this
    epoch holds the whole round's)."""
    key, shuffle_key = split_keys(train.key)
    finite = np.zeros_like(so_far.finite_steps)
    position = Position(shuffle_key, so_far.total, finite, 0, so_far.examples, so_far.sums, so_far.weight, order)
    return train._replace(key=key), position


def _round(
    state: FitState, book: _Book, compiled: programs.Programs, options: FitOptions
) -> tuple[FitState, _Book, Record | None]:
    """A fit by steps: runs the rest of the current round of ``eval_every`` steps (across epochs
    of the data when one ends inside it) and the validation; returns what :func:`_epoch` returns,
    the round in place of the epoch. The carry's sums restart with each round and go on across an
    epoch's end, so that a position inside a round (a checkpoint) holds the round's sums so far and
    resumes it exactly."""
    start, first, every = time.perf_counter(), state.steps, options.round_steps
    target = min((first // every + 1) * every, options.steps)
    train, position, pieces = state.train, state.position, []
    if position is not None and first % every == 0:
        position = _restart_sums(position)
    while True:
        if position is None and pieces:  # the data's epoch ended inside the round
            train, position = _next_epoch(train, pieces[-1][0], programs.epoch_order(options))
        base = (first if not pieces else pieces[-1][2]) - (position.steps if position is not None else 0)
        user_hook = _chunk_hook(state._replace(train=train), options, base)
        tallies: list[_Tally] = []

        def hook(carry, at, last, base=base, tallies=tallies, user_hook=user_hook):
            tallies.append(_tally(carry, at))
            if user_hook(carry, at, last):
                return True
            return not last and base + at.steps >= target

        train, metrics, position = compiled.train_epoch(train, position, hook)
        done = base + (position.steps if position is not None else int(jax.device_get(metrics["steps"])))
        pieces.append((tallies[-1], base, done))
        if position is not None and done < target:  # a callback stopped the round inside it
            return state._replace(train=train, position=position), book, None
        if done >= target:
            break
    round_start = (first // every) * every if first % every else first
    metrics = _round_metrics(pieces, round_start)
    return _conclude(state, book, compiled, options, train, metrics, position, start, round_start)


def _round_metrics(pieces: list, first: int) -> dict:
    """A round's ``{"loss", "first_nonfinite", "steps", "tokens"?, "sums"?}`` from its epoch pieces,
    each ``(tally at its end, the epoch's first global step, global steps at its end)``, the round
    begun at global step ``first``: the last tally holds the round's sums (they go on across epochs);
    a member's first non-finite step is found in the first piece whose total it made non-finite."""
    end = pieces[-1][0]
    total = np.asarray(end.total, np.float64)
    count = np.asarray(end.weight, np.float64) if end.weight is not None else np.full_like(total, end.examples)
    bad = np.full(np.shape(total), -1)
    for tally, base, _ in pieces:
        new = (bad < 0) & ~np.isfinite(tally.total)
        bad = np.where(new, np.maximum(base + np.asarray(tally.finite_steps) - first, 0), bad)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(np.isfinite(total), total / count, np.nan)
    # the steps actually run: a round ends on a chunk's end, at its target unless the data's chunks overshoot it
    out = {"loss": loss, "first_nonfinite": bad, "steps": pieces[-1][2] - first}
    if end.weight is not None:  # token targets: the real tokens trained on (the first member's)
        out["tokens"] = int(np.ravel(count)[0])
    if end.sums is not None:
        out["sums"] = end.sums
    return out


def _conclude(state, book, compiled, options, train, metrics, position, start, before):
    """The end of an epoch (or a fit by steps' round): validation, the record, the best params
    and the bookkeeping; returns the new state (inside a data epoch at ``position``), book, record."""
    k = options.members or 1
    if "sums" in metrics:
        metrics["train_metrics"] = _train_metrics(metrics.pop("sums"), options.metrics, options.members)
    epoch = state.epoch + 1
    active = ~book.stopped
    first_bad = np.asarray(metrics["first_nonfinite"]).reshape(k)
    diverged = active & (first_bad >= 0) if not options.skip_nonfinite else np.zeros(k, bool)
    if active.all() and diverged.all():  # every member diverged at once (always so for a single run)
        raise NonFiniteLossError(epoch, before + int(first_bad.min()) + 1)
    keep = active & ~diverged
    best = None if state.best_params is None else (state.best_params, state.best_model_state)
    val, validated = None, time.perf_counter()
    if compiled.validate is not None:
        params = averaged(train.params, train.opt_state)  # the moving average, when one is kept
        val = compiled.validate(params, train.model_state)
        book, improved = _improve(book, val, keep, epoch, options)
        best = _keep_best(improved, (params, train.model_state), best, options.members)
    record = _record(epoch, metrics, val, book, keep, train)
    now = time.perf_counter()
    record.update(seconds=now - start, steps=int(metrics["steps"]))
    if val is not None:
        record["val_seconds"] = now - validated
    if "tokens" in metrics:
        record["tokens"] = metrics["tokens"]
    if options.flops_per_step:
        busy = record["seconds"] - record.get("val_seconds", 0.0)
        record["flops_per_second"] = options.flops_per_step * record["steps"] * k / max(busy, 1e-9)
        record["mfu"] = record["flops_per_second"] / options.peak_flops
    if options.steps:
        record["step"] = before + int(metrics["steps"])
    stopped = book.stopped | diverged
    if options.patience is not None:
        stopped |= epoch - book.best_epoch >= options.patience
    skipped = _skipped_updates(train.opt_state, k) if book.skipped is not None else None
    book = book._replace(stopped=stopped, skipped=skipped, spikes=_spikes(train.opt_state, k))
    if options.members is None:  # a single run's records and best epoch hold scalars
        record = {name: v[0] if isinstance(v, list) else v for name, v in record.items()}
    best_epoch = int(book.best_epoch[0]) if options.members is None else [int(e) for e in book.best_epoch]
    state.history.append(record)  # the loop's own list (see _loop)
    best_params, best_model_state = (None, None) if best is None else best
    new = FitState(train, epoch, state.history, best_params, best_epoch, best_model_state, position)
    return new, book, record


def _epochs_left(state: FitState, options: FitOptions) -> bool:
    return state.epoch < options.epochs


def _steps_left(state: FitState, options: FitOptions) -> bool:
    return state.steps < options.steps


def _loop(state: FitState, compiled: programs.Programs, options: FitOptions) -> FitState:
    """Epochs until the last, every member stopped, or a callback asks to stop."""
    book = _open_book(state, options.monitor, options.patience, options.skip_nonfinite, options.metrics)
    state = state._replace(history=list(state.history))  # appended to by each epoch; the caller's stays as it is
    for on_run_start in hooks.bound(options.callbacks, hooks.OnRunStart):
        on_run_start(state)
    run, more = (_round, _steps_left) if options.steps else (_epoch, _epochs_left)
    try:
        while more(state, options) and not book.stopped.all():
            state, book, record = run(state, book, compiled, options)
            if record is None or any([bool(callback(state, record)) for callback in options.callbacks]):
                break
    except BaseException as error:
        for on_run_failure in hooks.bound(options.callbacks, hooks.OnRunFailure):
            on_run_failure(state, error)
        raise
    for on_run_end in hooks.bound(options.callbacks, hooks.OnRunEnd):
        on_run_end(state)
    return state


def fit(
    model: AnyModel,
    params: Params,
    x,
    y,
    *,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    epochs: int | None = None,
    batch_size: int | str,
    key: PRNGKey,
    validation: tuple | None = None,
    patience: int | None = None,
    monitor: str = "val_loss",
    drop_remainder: bool = False,
    callbacks: Sequence[Callback] = (),
    resume: FitState | None = None,
    compute_dtype=None,
    skip_nonfinite: bool = False,
    shuffle: bool = True,
    unroll: int = 1,
    mesh=None,
    hyperparams: dict | None = None,
    model_state: Any = None,
    per_example_grads: bool = False,
    chunk_steps: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    shuffle_buffer: int = 0,
    eval_batch_size: int | None = None,
    metrics=None,
    verbose: bool | str = False,
    sample_weight=None,
    class_weight=None,
    log_every_steps: int | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    sharding=None,
    accumulate: int = 1,
    device_invariant: int | None = None,
    memory_budget: int | None = None,
    peak_tflops: float | None = None,
    trainable: str | None = None,
    ema: float | None = None,
    skip_spikes: tuple[int, float] | None = None,
) -> FitState:
    """Trains ``model`` on ``(x, y)`` with minibatch ``optimizer`` steps, one compiled call per epoch.

    Args:
      model: the model.
      params: initial params (ignored when ``resume`` is given): the arrays ``model.init`` makes,
        by path and shape (with a leading member axis for a member run), else a ValueError names
        the first that differs.
      x: ``(n, ...)`` inputs; y: ``(n, ...)`` targets (integer labels for cross-entropy). Arrays
        in memory are placed on the device whole (the fast path). Data that is not is streamed
        (see :mod:`jaxnet.sources` and docs/data.md): ``np.memmap`` or :class:`jaxnet.NpyFile`
        arrays, or ``x`` a source with ``y`` None: an iterable of ``(x, y)`` batches, a Grain
        ``MapDataset``/``IterDataset``/``DataLoader``, :class:`jaxnet.Parquet`,
        :class:`jaxnet.Indexed`. Streamed epochs run in compiled chunks of steps, the next chunk
        read and transferred while the device runs the current one.
      loss: a loss name, per-example callable or :class:`LossSpec`.
      optimizer: any optax ``GradientTransformation``.
      epochs: total number of epochs (including those already done when resuming); or give
        ``steps`` instead.
      batch_size: examples per step; the last partial batch is padded and masked (its update
        averages over its real examples only) unless ``drop_remainder``. ``"auto"``: the largest
        power of two whose step fits ``memory_budget`` (:func:`fitting_batch_size`).
      key: PRNG key for shuffling; the run is reproducible from it.
      validation: optional ``(x_val: (m, ...), y_val: (m, ...))`` or a source, evaluated after
        every epoch in batches of ``eval_batch_size``.
      patience: stop after this many epochs without improvement of ``monitor`` (needs
        ``validation``).
      monitor: ``"val_loss"``, ``"val_accuracy"`` or ``"val_<name>"`` of one of ``metrics``. Lower
        is better for the loss, ``cross_entropy``, ``perplexity``, ``bits_per_token``, ``mse`` and
        ``mae``; higher for the others (a :class:`~jaxnet.metrics.Metric` says its own).
      drop_remainder: drop the last partial batch instead of masking it.
      callbacks: called after each epoch as ``cb(fit_state, record)``; returning True stops. A
        callback may also have the hooks ``on_run_start``, ``on_run_end``, ``on_chunk`` and
        ``on_step``, declared in :mod:`jaxnet.hooks`; ready-made ones are in
        :mod:`jaxnet.callbacks` and :mod:`jaxnet.loggers`.
      resume: a :class:`FitState` (returned by ``fit`` or restored from a checkpoint) to continue
        from; the result equals a run never interrupted.
      compute_dtype: e.g. ``jnp.bfloat16`` for mixed precision (float32 master params).
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of stopping
        (:func:`jaxnet.skip_nonfinite_updates`); each record then counts them in ``skipped``, and
        its ``train_loss`` is NaN when any of the epoch's losses was.
      shuffle: reshuffle the examples every epoch (from ``key``); False trains on them in order.
      unroll: ``lax.scan`` unroll factor for the steps of an epoch.
      mesh: a device mesh from :func:`jaxnet.make_mesh` (or :func:`jaxnet.make_data_mesh`): each
        batch is split over its ``"data"`` and ``"fsdp"`` axes (``batch_size`` must divide
        evenly); the params are laid out by ``sharding`` and the built-in rules of
        :mod:`jaxnet.sharding` (FSDP on ``"fsdp"``, tensor parallel on ``"model"``, replicated on
        a data-only mesh), the optimizer state following them. ``x``/``y`` may be global arrays
        (multi-process).
      sharding: with ``mesh``: ``{regex: spec}`` rules over the param paths that win over the
        built-in ones (:func:`jaxnet.sharding.param_specs`); checked before anything compiles.
      accumulate: compute each optimizer step's gradient over this many microbatches of
        ``batch_size / accumulate`` examples, one after the other inside the compiled step, then
        apply one update (the same update as the whole batch, in less memory).
      device_invariant: a power of two k: each step's gradient is the sum of those of k parts of
        ``batch_size / k`` rows, each device computing its own parts, added in one fixed order
        (:mod:`jaxnet.parts`). The run is then bitwise the same on any mesh of batch devices that
        divides k (one device included), so a checkpoint continues to the bit on another mesh; in
        another process too, when every process starts JAX's CPU backend with the same threads
        (:func:`jaxnet.parts.same_cpu_threads`, which the CLI calls; docs/sharding.md). It
        costs smaller matmuls and a replicated gradient (see docs/sharding.md); a ``"model"`` axis,
        ``accumulate``, ``per_example_grads`` and a model with a state (batch
        norm) are refused with it.
      memory_budget: bytes one device may use. Before the first step, XLA's memory analysis of
        the compiled step (params, optimizer state, a batch, activations; per device on a mesh)
        is compared with it, and a step that needs more is refused with the figures and what
        lowers them. Default: the device's own limit where it reports one (GPUs, TPUs); none on
        CPU.
      peak_tflops: the peak TFLOP/s of one device, for model FLOPs utilization: each record then
        holds ``flops_per_second`` (XLA's count of a step's FLOPs times the steps per second of
        training) and ``mfu`` (that over the peak of all the devices that train). Default: the
        dense bfloat16 peak of the accelerators in :data:`jaxnet.summaries.PEAK_TFLOPS`; none on
        CPU.
      trainable: a regex over the params' paths (``blocks/attn/q/w``): only the params it matches
        train; the others stay bitwise unchanged and the optimizer keeps no state for them
        (:func:`jaxnet.grouped`, which also gives groups their own learning rates).
      ema: keep an exponential moving average of the params with this decay (e.g. 0.999), updated
        inside the step (:func:`jaxnet.with_ema`); validation, early stopping and the returned
        ``params`` use it, and the raw params train on (and resume exactly).
      skip_spikes: ``(window, factor)``: a step whose loss exceeds the mean of the last ``window``
        by ``factor`` standard deviations is not applied (:func:`jaxnet.skip_spikes`); each record
        counts them so far in ``spikes``.
      hyperparams: member runs only: name -> ``(K,)`` per-member values of the hyperparameters of an
        ``optax.inject_hyperparams`` optimizer (see :func:`jaxnet.set_hyperparams`).
      model_state: a :class:`jaxnet.StatefulModel`'s initial state (``params, model_state =
        model.init(key)``; ``{}`` if it has none); None for a plain model. It is threaded through
        every step (running statistics), and the best epoch's is kept with its params.
      per_example_grads: the optimizer receives per-example gradients (leading batch axis), as
        :func:`jaxnet.dp_optimizer` (DP-SGD) needs: see :func:`jaxnet.make_per_example_update`.
      chunk_steps: the most steps per compiled call. Streamed data: at most this many (default:
        what ``chunk_bytes`` holds); resident data: epochs in calls of this many steps, so that a
        callback's ``on_chunk(fit_state)`` sees (and may checkpoint, or stop at) the state inside
        an epoch, which ``resume`` continues exactly (default None: one call per epoch).
      chunk_bytes: the bytes of one chunk of streamed batches (two are in flight).
      shuffle_buffer: sequential sources (iterables, Grain iterators): shuffle rows through a
        buffer of this many (0: their own order); resident arrays and indexed sources are
        shuffled globally by index, and refuse it.
      eval_batch_size: validation batch (default ``max(batch_size, 1024)``, at most the rows).
      metrics: named metrics (:mod:`jaxnet.metrics`: e.g. ``["f1", "precision", "recall",
        "top_5_accuracy"]``, or per-example callables), summed on the device over every batch:
        of each epoch's training steps (their training-mode predictions, before each update, as
        ``train_<name>``) and of the validation data (``val_<name>``).
      verbose: False (the default) prints nothing; True shows progress on stderr, a tqdm bar on a
        terminal or in a notebook and one line per epoch otherwise; ``"bar"`` or ``"lines"`` choose.
      sample_weight: ``(n,)`` weights of the training examples (resident arrays): each batch's
        loss is the weighted mean of its examples' (see :mod:`jaxnet._weights`). With targets of
        a token axis ``(n, T)``, also ``(n, T)``: a weight per token (the loss is then the
        weighted mean over the tokens; a weight of 0 masks a token like :data:`IGNORE_INDEX`).
      class_weight: ``"balanced"`` (``n / (classes * count)``, from ``y``) or ``{class: weight}``:
        each example's loss term is weighted by its class's (classification losses, any data).
        Validation is unweighted.
      log_every_steps: at every this many-th step of each epoch, callbacks' ``on_step`` get the step's
        ``loss``, ``grad_norm`` (global L2 norm of the gradients) and ``learning_rate`` (the rate
        applied, for an ``optax.inject_hyperparams`` optimizer), with its global ``step`` number
        and ``epoch``. Epochs then run in compiled chunks of at most this many steps (cost:
        bench/README.md, "Logging steps"); member runs do not log steps.
      steps: train for this many optimizer steps in all (instead of ``epochs``), as language
        models train: the data's epochs follow one another (each reshuffled) for as long as the
        steps last, and an endless source may be given (an iterator: each round continues it; one
        that ends before the steps are done raises ValueError). The loop then runs in rounds of
        ``eval_every`` steps, each ending with the validation and one record (``epoch``: the
        round's number, ``step``: the steps done, ``train_loss``: the mean over the round's
        examples or real tokens); ``patience`` counts rounds. Resumes exactly, also inside a round.
      eval_every: with ``steps``: the steps of a round (default: all of them, one round).

    Member runs (ensembles and sweeps): when ``key`` is a ``(K,)`` array of keys
    (:func:`jaxnet.member_keys`) and ``params`` have a leading axis K (:func:`jaxnet.init_members`),
    K models train at once, the epoch ``vmap``-ed over the member axis with the data shared. Each
    member then trains as it would alone with its own key: streamed data from an indexed source
    is read in every member's own order (K times the rows per chunk, within ``chunk_bytes``);
    sequential sources cannot give that and are refused. Records hold per-member lists
    (``train_loss``, ``val_loss``, ``val_accuracy``, ``best_epoch``); early stopping is per member
    (a member whose patience ran out keeps its best params, its later values are None) and the run
    stops when every member has stopped. A member whose loss turns non-finite stops likewise (None
    values); NonFiniteLossError is raised only when every member has.

    Returns:
      The final :class:`FitState`: the last epoch's complete train state (resumable exactly),
      the best params and epoch (with validation; ``.params`` picks them) and the history, one
      record per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` (when the loss
      has a metric), ``best_epoch`` (with validation), ``seconds`` and ``steps``.

    Raises:
      NonFiniteLossError: a step produced a non-finite loss (the state is left as it was before
        that epoch, which callbacks have already seen).
    """
    spec = get_loss(loss)
    _check_kinds(optimizer, key, mesh, epochs, steps, eval_every)
    optimizer = finetuning(optimizer, trainable=trainable, ema=ema, skip_spikes=skip_spikes)
    _check_call(params, resume, callbacks, unroll, compute_dtype)
    check_model_state(model, model_state if resume is None else resume.train.model_state)
    data = _check_data(x, y, validation, sample_weight, once=steps is not None or epochs == 1)
    named = get_metrics(metrics)
    members, mesh, sharding = _placement(key if resume is None else resume.train.key, device_invariant, mesh, sharding)
    auto = isinstance(batch_size, str) and batch_size == "auto"
    if auto:  # the smallest a mesh and microbatches allow, until XLA's memory analysis picks one
        batch_size = _smallest_batch(accumulate, mesh, device_invariant)
    _check_options(spec, batch_size, patience, monitor, data.validation, named)
    check_metric_targets(named, spec.integer_labels, spec.name)
    batch_size = _clamped_batch(batch_size, data.train, drop_remainder, mesh)
    if not auto:  # (else checked once auto has picked the size)
        _check_padding(model, model_state if resume is None else resume.train.model_state, data.train, batch_size,
                       drop_remainder)  # fmt: skip
    fresh = resume is None
    start = dict(skip_nonfinite=skip_nonfinite, hyperparams=hyperparams, model_state=model_state, sharding=sharding)
    resume = _starting(model, optimizer, params, key, batch_size, members, data, mesh, resume, start, (epochs, steps))
    outputs = _check_examples(spec, model, resume.train, data, named)
    _check_chunked(callbacks, data, chunk_steps, steps)
    options = FitOptions(
        epochs=epochs,
        steps=steps,
        eval_every=eval_every,
        batch_size=batch_size,
        members=members,
        patience=patience,
        monitor=monitor,
        callbacks=(*callbacks, *_progress(verbose, epochs or -(-steps // (eval_every or steps)))),
        drop_remainder=drop_remainder,
        shuffle=shuffle,
        unroll=unroll,
        compute_dtype=compute_dtype,
        skip_nonfinite=skip_nonfinite,
        per_example_grads=checks.boolean("per_example_grads", per_example_grads),
        chunk_steps=checks.optional_integer("chunk_steps", chunk_steps),
        chunk_bytes=checks.integer("chunk_bytes", chunk_bytes),
        shuffle_buffer=checks.integer("shuffle_buffer", shuffle_buffer, minimum=0),
        eval_batch_size=checks.optional_integer("eval_batch_size", eval_batch_size),
        metrics=named,
        log_every_steps=checks.optional_integer("log_every_steps", log_every_steps),
        class_weights=_class_weights(class_weight, spec, model, resume.train, data),
        sharding=_check_sharding(sharding, mesh, resume.train),
        accumulate=_check_accumulate(accumulate, batch_size),
        device_invariant=_check_invariant(
            device_invariant, batch_size, mesh, accumulate, per_example_grads, resume.train.model_state
        ),
        check_chunk=_chunk_check(spec, model, outputs, data),
    )
    _check_per_example(optimizer, resume.train.params, members, options.per_example_grads)
    if auto:
        shapes = (train_rows(data.train), programs.example_shapes(data.train))
        options, cost = _fitting_batch(model, spec, optimizer, options, resume.train, shapes, mesh, memory_budget)
        _check_padding(model, resume.train.model_state, data.train, options.batch_size, drop_remainder)
    _check_resumable(options, resume, data)
    options = _preflight(model, spec, optimizer, options, resume.train, data, mesh, memory_budget, peak_tflops,
                         cost if auto else None)  # fmt: skip
    return _run(programs.build_programs(model, spec, optimizer, options, mesh, data), options, resume, fresh)


def _run(compiled: programs.Programs, options: FitOptions, resume: FitState, fresh: bool) -> FitState:
    """The fit's loop from ``resume``, its state placed where the programs expect it. Epochs donate
    the state's buffers: a caller's state (not ``fresh``) is copied first, so that it stays valid."""
    train = compiled.place(resume.train)
    return _loop(resume._replace(train=train if fresh else _copy_tree(train)), compiled, options)


def _check_kinds(optimizer, key, mesh, epochs, steps, eval_every) -> None:
    """Refuses an ``optimizer``, ``key`` or ``mesh`` of the wrong kind, naming it, and a length
    of the fit that is not epochs or steps (:func:`_check_length`)."""
    _check_length(epochs, steps, eval_every)
    check_optimizer(optimizer)
    if key is not None:
        checks.key("key", key)
    if mesh is not None:
        shardinglib.check_mesh(mesh)


def _progress(verbose, epochs: int) -> tuple:
    """The progress callback that ``verbose`` asks for (none when False)."""
    if verbose is False or verbose is None:
        return ()
    if verbose not in (True, "bar", "lines"):
        raise ValueError(f"verbose must be False, True, 'bar' or 'lines', got {verbose!r}")
    return (progress.Progress(epochs, bar=None if verbose is True else verbose == "bar"),)


def _class_weights(class_weight, spec: LossSpec, model, train: TrainState, data: programs.Data):
    """The ``(classes,)`` class weights of ``class_weight`` for this model and data (or None)."""
    if class_weight is None:
        return None
    resident = isinstance(data.train, tuple)
    row, target = programs.example_shapes(data.train)
    if has_token_axis(jax.ShapeDtypeStruct((1, *target.shape), target.dtype)):
        raise ValueError(
            "class_weight weighs each example by its label's class, but these targets have a token axis (a label per "
            "token): weigh the tokens with sample_weight of the targets' shape (n, T) instead"
        )
    classes = _classes(spec, model, train, row)
    return weights.class_weights(class_weight, spec, classes, data.train[1] if resident else None)


def _one_member(train: TrainState) -> tuple:
    """``(params, model_state)`` of one member (a member run's first), for shapes."""
    params, model_state = train.params, train.model_state
    if num_members(train.key):
        params, model_state = jax.tree.map(lambda a: a[0], (params, model_state))
    return params, model_state


def _classes(spec: LossSpec, model, train: TrainState, row: jax.ShapeDtypeStruct) -> int:
    """The classes the model predicts for examples of shape ``row`` (from shapes only)."""
    return weights.num_classes(model, *_one_member(train), row, spec)


ELEMENTWISE_LOSSES = ("mse", "half_sse", "sigmoid_binary_cross_entropy")
"""Built-in losses that compare each output with its own target."""


def _check_examples(spec: LossSpec, model, train: TrainState, data: programs.Data, metrics: tuple = ()) -> tuple:
    """Refuses a GPT's resident input ids outside its vocabulary (:func:`_check_token_ids`); inputs
    the model fails on (:func:`jaxnet._weights.output_shape`, the error naming x); class
    ids that are not integers or whose shape does not match the model's class scores, resident ones
    outside its classes (streamed ones: :func:`_chunk_check`), a ``top_k_accuracy`` of more classes; and
    targets of an elementwise loss not shaped as the outputs (resident binary ones outside [0, 1]).
    Returns the shape of the model's outputs for one example."""
    _check_token_ids(model, data)
    row, target = programs.example_shapes(data.train)
    outputs = weights.output_shape(model, *_one_member(train), row)  # (an error of the model's names x)
    if spec.name in ELEMENTWISE_LOSSES:
        _check_elementwise_targets(spec, target, outputs, data)
    if spec.name != "softmax_cross_entropy":
        return outputs
    check_metric_targets(metrics, True, spec.name, outputs[-1] if outputs else 1)
    weights.check_class_id_shape("y", target.shape, outputs)
    weights.check_class_dtype("y", target.dtype)
    resident = {"y": data.train, "validation's y": data.validation}
    resident = {name: pair[1] for name, pair in resident.items() if isinstance(pair, tuple)}
    for name, y in resident.items():
        weights.check_class_targets(name, y, outputs)
    return outputs


def _starting(model, optimizer, params, key, batch_size, members, data, mesh, resume, start: dict, length) -> FitState:
    """The state a fit starts from: a fresh one (:func:`_start`, ``start`` its options) from
    ``params``, or ``resume`` once checked against the fit (:func:`_check_resume`)."""
    if resume is None:
        check_params(model, params, members)
        return _start(params, optimizer, key, batch_size, members, data, mesh, start)
    if start["hyperparams"]:
        raise ValueError("hyperparams are set when a member run starts; a resumed run keeps its optimizer state")
    _check_resume(model, optimizer, start["skip_nonfinite"], resume, members, *length)
    return resume


def _member_shapes(params: Params, members) -> Params:
    """The shapes and dtypes of one member's params (``members``: each leaf has a leading ``(K,)``)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:] if members else a.shape, a.dtype), params)


def _check_resume(model, optimizer, skip_nonfinite: bool, resume: FitState, members, epochs, steps) -> None:
    """Refuses a ``resume`` state of another model, of another optimizer (or one wrapped by other
    options), or further along than the fit asks."""
    check_params(model, resume.train.params, members)
    wrapped = skip_nonfinite_updates(optimizer) if skip_nonfinite else optimizer
    one = _member_shapes(resume.train.params, members)
    if jax.tree.structure(jax.eval_shape(wrapped.init, one)) != jax.tree.structure(resume.train.opt_state):
        raise ValueError(
            "resume: its optimizer state is not what this optimizer makes: give the optimizer the state was saved "
            "with, and the same skip_nonfinite, trainable, ema and skip_spikes"
        )
    if epochs is not None and resume.epoch > epochs:
        raise ValueError(f"epochs {epochs} is fewer than the {resume.epoch} the resumed state has trained: give more")
    if steps is not None and resume.steps > steps:
        raise ValueError(f"steps {steps} is fewer than the {resume.steps} the resumed state has trained: give more")


def _check_per_example(optimizer, params, members, per_example_grads) -> None:
    """With ``per_example_grads``, the optimizer must turn per-example gradients (a leading batch
    axis) into one update: a plain optax optimizer would return per-example updates."""
    if not per_example_grads:
        return
    one = _member_shapes(params, members)
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2, *a.shape), a.dtype), one)
    try:
        updates = jax.eval_shape(lambda g, p: optimizer.update(g, optimizer.init(p), p)[0], stacked, one)
        same = jax.tree.map(lambda u, p: u.shape == p.shape, updates, one)
        takes = all(jax.tree.leaves(same))
    except (TypeError, ValueError):
        takes = False
    if not takes:
        raise ValueError(
            "per_example_grads: the optimizer must reduce per-example gradients to one update (jaxnet.dp_optimizer); "
            "this one takes ordinary gradients: drop per_example_grads"
        )


def _check_chunked(callbacks, data: programs.Data, chunk_steps, steps) -> None:
    """A callback that saves every so many steps (``Checkpointer(every_steps=)``) needs epochs in
    chunks: resident data has them only with ``chunk_steps`` (or a fit by steps)."""
    every = [getattr(cb, "every_steps", None) for cb in callbacks]
    every = [n for n in every if n]
    if every and isinstance(data.train, tuple) and chunk_steps is None and steps is None:
        raise ValueError(
            f"callbacks: a Checkpointer's every_steps={every[0]} saves inside epochs, which resident data has in "
            f"chunks only: give chunk_steps={every[0]} too"
        )


def _chunk_check(spec: LossSpec, model, outputs: tuple, data: programs.Data) -> Callable | None:
    """For streamed data, ``check(prefix, arrays)`` of each chunk as it is read
    (:func:`jaxnet._weights.chunk_check`, ``outputs`` one example's; :func:`_check_examples`
    checks resident data whole); None when there is nothing to check."""
    if all(part is None or isinstance(part, tuple) for part in (data.train, data.validation)):
        return None
    return weights.chunk_check(spec, model, outputs, *programs.example_shapes(data.train))


def _check_token_ids(model, data: programs.Data) -> None:
    """A GPT's resident input ids must lie in its vocabulary (:func:`jaxnet._weights.check_token_ids`)."""
    gpt = getattr(model, "apply", None)
    if isinstance(gpt, GPT):
        for name, pair in {"x": data.train, "validation's x": data.validation}.items():
            if isinstance(pair, tuple):
                weights.check_token_ids(name, pair[0], gpt.config.vocab_size)


def _check_elementwise_targets(spec: LossSpec, target, outputs: tuple, data: programs.Data) -> None:
    weights.check_target_shape("y", target.shape, outputs)
    resident = {"y": data.train, "validation's y": data.validation}
    for name, pair in resident.items():
        if isinstance(pair, tuple):
            weights.check_target_shape(name, np.shape(pair[1])[1:], outputs)
            if spec.name == "sigmoid_binary_cross_entropy":
                weights.check_binary_targets(name, pair[1])


def _start(params, optimizer, key, batch_size: int, members, data, mesh, options: dict) -> FitState:
    """A fresh fit's state (laid out on ``mesh``), after the estimate of its memory (without a
    mesh that shards params: :func:`_preflight` then asks XLA)."""
    one = _member_shapes(params, members)
    if mesh is None or shardinglib.batch_devices(mesh) == mesh.size:
        check_fit_memory(one, optimizer, batch_size, members or 1, _resident_bytes(data))
    return init_fit_state(params, optimizer, key, mesh=mesh, **options)


def _check_resumable(options: FitOptions, resume: FitState, data) -> None:
    if 0 < options.shuffle_buffer < options.batch_size:
        raise ValueError(
            f"shuffle_buffer {options.shuffle_buffer} is smaller than batch_size {options.batch_size}: give at least "
            "a batch (or 0 for the source's own order)"
        )
    resident = isinstance(data.train, tuple)
    if options.shuffle_buffer and (resident or data.train.kind == "indexed"):
        raise ValueError(
            "shuffle_buffer shuffles the rows of a sequential source (an iterable, a Grain iterator, a Parquet "
            "file); these rows are shuffled whole every epoch (shuffle=True): drop it"
        )
    if resume.position is not None and options.chunk_steps is None and not options.steps and resident:
        raise ValueError(
            "resume: the state stands inside an epoch, which resumes only in chunks: give chunk_steps as in the "
            "run that saved it"
        )
    _check_order(resume.position, programs.epoch_order(options))


_ORDER = ("batch_size", "shuffle", "drop_remainder", "shuffle_buffer")


def _listed(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _check_order(position, order: tuple) -> None:
    """A state inside an epoch resumes only with the epoch's reading order: another batch size or
    shuffle would read its rows from another place, some twice and some never."""
    saved = () if position is None else tuple(position.order)
    changed = [(name, a, b) for name, a, b in zip(_ORDER, saved, order, strict=False) if a != b]
    if changed:
        was, now = (_listed([f"{name} {pair[i]}" for name, *pair in changed]) for i in (0, 1))
        raise ValueError(
            f"resume: the state stands inside an epoch read with {was}, which this fit gives as {now}: give "
            f"{was} to finish that epoch (a state at an epoch's end resumes with any)"
        )


class MemoryBudgetError(ArgumentError):
    """A training step needs more memory per device than its budget (see ``fit(memory_budget=)``):
    ``figures`` says how much, the message also what lowers it."""

    def __init__(self, message: str, *names: str, figures: str | None = None):
        super().__init__(message, *names)
        self.figures = figures


def _preflight(model, spec, optimizer, options: FitOptions, train, data, mesh, budget, peak, cost=None) -> FitOptions:
    """Before anything runs: refuses a step that XLA says needs more than ``budget`` bytes on one
    device (default: the device's reported limit; none on CPU), and returns ``options`` with the
    step's FLOPs and the devices' peak when utilization can be reported. ``cost``: the step's
    :func:`jaxnet._programs.step_cost` when already known (a batch size ``auto`` found it)."""
    if budget is None and (options.members is not None or memory_limit()[1] == "host memory"):
        source = ""  # no device limit to hold to (members: check_fit_memory's estimate)
    else:
        budget, source = _budget(budget)
    peak = summaries.peak_tflops() if peak is None else checks.number("peak_tflops", peak, 0.0, strict=True)
    if budget is None and peak is None:
        return options
    need = cost or programs.step_cost(model, spec, optimizer, options, train, programs.example_shapes(data.train), mesh)
    if budget is not None and need["total"] > budget:
        state, temp = _size(need["state"]), _size(need["temp"])
        figures = (f"one training step needs {_size(need['total'])} per device (XLA's memory analysis: params, "
                   f"optimizer state and a batch {state}, activations and scratch {temp}), over {source}")  # fmt: skip
        raise MemoryBudgetError(
            checks.escape(figures) + ": shard the params over more devices ({0} with an fsdp axis), recompute "
            "activations ({1}), split each batch into microbatches ({2}) or lower {3}",
            "mesh", "remat", "accumulate", "batch_size", figures=figures,
        )  # fmt: skip
    if peak is None or not need["flops"]:
        return options
    devices = 1 if mesh is None else mesh.size
    return dataclasses.replace(options, flops_per_step=need["flops"], peak_flops=peak * 1e12 * devices)


def fitting_batch_size(
    model: AnyModel,
    params: Params,
    x,
    y=None,
    *,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    memory_budget: int | None = None,
    mesh=None,
    sharding=None,
    accumulate: int = 1,
    device_invariant: int | None = None,
    model_state: Any = None,
    compute_dtype: Any = None,
) -> int:
    """The largest power-of-two batch size whose training step fits ``memory_budget`` bytes per
    device (default: the device's limit; the host's memory on CPU), by XLA's memory analysis of
    the compiled step (compiled for shapes only: nothing is allocated), at most the training
    rows; what ``fit(batch_size="auto")`` trains with. The arguments are :func:`fit`'s.

    Raises:
      MemoryBudgetError: not even the smallest batch fits.
    """
    source = sources.as_source(x, y, "x", once=True)
    if source is None:  # arrays: their shapes are all it needs (nothing is placed on a device)
        x, y = (a if hasattr(a, "shape") else np.asarray(a) for a in (x, y))
        rows, example = len(x), tuple(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in (x, y))
    else:
        rows, example = train_rows(source), programs.example_shapes(source)
    if device_invariant is not None:  # the state whole on every device, as fit lays it out
        mesh, sharding = _invariant_layout(mesh, sharding)
    smallest = _smallest_batch(accumulate, mesh, device_invariant)
    invariant = _check_invariant(device_invariant, smallest, mesh, accumulate, False, model_state)
    options = FitOptions(epochs=1, batch_size=smallest, compute_dtype=compute_dtype, sharding=sharding,
                         accumulate=accumulate, device_invariant=invariant)  # fmt: skip
    state = jax.eval_shape(lambda p, s: init_state(p, optimizer, jax.random.key(0), s), params, model_state)
    found, _ = _fitting_batch(model, get_loss(loss), optimizer, options, state, (rows, example), mesh, memory_budget)
    return found.batch_size


def _smallest_batch(accumulate, mesh, device_invariant=None) -> int:
    """The smallest power of two that ``accumulate`` microbatches and a mesh's batch devices divide
    (and ``device_invariant``'s parts)."""
    devices = 1 if mesh is None else shardinglib.batch_devices(mesh)
    need = checks.integer("accumulate", accumulate) * devices
    if device_invariant is not None:
        need = max(need, parts.check_parts(device_invariant, devices, mesh))
    if need & (need - 1):
        raise ArgumentError(
            f"{{0}} 'auto' picks a power of two, which {{1}} {accumulate} times {devices} batch devices does not "
            "divide: give a batch size",
            "batch_size", "accumulate",
        )  # fmt: skip
    return need


def _fitting_batch(model, spec, optimizer, options: FitOptions, train, data, mesh, budget) -> tuple[FitOptions, dict]:
    """``(options, cost)``: ``options`` with the largest power-of-two batch (from
    ``options.batch_size``, the smallest, up to the training rows) whose step XLA says fits
    ``budget`` (default: :func:`memory_limit`), and that step's :func:`jaxnet._programs.step_cost`.
    ``data``: ``(rows or None, (x, y) of one example's shapes)``."""
    budget, source = _budget(budget)
    rows, example = data
    top = 1 << 20 if rows is None else 1 << max(0, rows.bit_length() - 1)
    sizes = [options.batch_size << k for k in range(max(1, (top // options.batch_size).bit_length()))]

    costs = {}

    def fits(b: int) -> bool:
        costs[b] = programs.step_cost(model, spec, optimizer, dataclasses.replace(options, batch_size=b), train,
                                      example, mesh)  # fmt: skip
        return costs[b]["total"] <= budget

    if not fits(sizes[0]):
        raise MemoryBudgetError(
            f"{{0}} 'auto': not even a batch of {sizes[0]} fits {source}: shard the params ({{1}}), recompute "
            "activations ({2}) or give a larger budget ({3})",
            "batch_size", "mesh", "remat", "memory_budget",
        )  # fmt: skip
    lo, hi = 0, len(sizes) - 1  # sizes[lo] fits; find the last that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(sizes[mid]) else (lo, mid - 1)
    return dataclasses.replace(options, batch_size=sizes[lo]), costs[sizes[lo]]


def _budget(budget: int | None) -> tuple[int, str]:
    """``(bytes, as an error names them)``: ``memory_budget`` checked, else the first device's
    limit (:func:`memory_limit`: the host's memory on CPU)."""
    if budget is not None:
        budget = checks.integer("memory_budget", budget)
        return budget, f"the memory budget of {_size(budget)}"
    limit, where = memory_limit()
    return limit, f"the {where}'s {_size(limit)}"


def train_rows(train) -> int | None:
    """The training examples of resident arrays or an indexed source (None: a stream of unknown length)."""
    if isinstance(train, tuple):
        return int(train[0].shape[0])
    return getattr(train, "num_rows", None)


def _size(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_sharding(rules, mesh, train: TrainState):
    """``rules``, checked against the params (before anything compiles); None without a mesh."""
    if rules is None:
        return None
    if mesh is None:
        raise ValueError("sharding rules lay params out on a mesh: give mesh=jaxnet.make_mesh(...) too")
    shardinglib.param_specs(train.params, mesh, rules)
    return rules


def _placement(key, device_invariant, mesh, sharding) -> tuple:
    """``(members, mesh, sharding)``: the members of ``key`` (None: a single run), and for a
    ``device_invariant`` single run its :func:`_invariant_layout` (found before the batch size,
    which a mesh keeps whole)."""
    members = num_members(key)
    if device_invariant is not None and members is None:
        mesh, sharding = _invariant_layout(mesh, sharding)
    return members, mesh, sharding


def _invariant_layout(mesh, sharding):
    """``(mesh, sharding)`` of a ``device_invariant`` fit: one device's mesh when none is given
    (wherever a resumed state was), and the state whole on every device. Laid out in shards, the
    optimizer's update is a program that depends on the device count, which XLA fuses, and so
    rounds, differently (:func:`jaxnet.parts.alone`)."""
    if sharding is not None:
        raise ArgumentError("{0} keeps the params whole on every device: drop {1}", "device_invariant", "sharding")
    mesh = shardinglib.one_device_mesh() if mesh is None else mesh
    return mesh, [(".*", jax.sharding.PartitionSpec())]


def _check_invariant(k, batch_size: int, mesh, accumulate, per_example_grads, model_state=None) -> int | None:
    if k is None:
        return None
    if jax.tree.leaves(model_state):
        raise ArgumentError(
            "{0}: the model has a state (e.g. batch norm's statistics), which parts on different devices cannot "
            "thread in order: drop {0}",
            "device_invariant",
        )
    k = parts.check_parts(k, 1 if mesh is None else shardinglib.batch_devices(mesh), mesh)
    if batch_size % k:
        raise ArgumentError(
            f"{{0}} {k} does not divide {{1}} {batch_size} into equal parts: give a batch size that it divides",
            "device_invariant", "batch_size",
        )  # fmt: skip
    if accumulate != 1 or per_example_grads:
        taken = "accumulate" if accumulate != 1 else "per_example_grads"
        raise ArgumentError("{0} already splits each batch into parts: drop {1}", "device_invariant", taken)
    return k


def _check_accumulate(accumulate, batch_size: int) -> int:
    checks.integer("accumulate", accumulate)
    if batch_size % accumulate:
        raise ArgumentError(
            f"{{0}} {accumulate} does not divide {{1}} {batch_size} into equal microbatches: give a divisor",
            "accumulate", "batch_size",
        )  # fmt: skip
    return accumulate


def counts_padding(model, model_state) -> bool:
    """Whether ``model``'s batch statistics would count the padding of a partial batch: a
    :class:`jaxnet.StatefulModel` with ``batch_statistics``, or a batched one with state (a
    library's batch norm, which cannot weigh examples)."""
    if not isinstance(model, StatefulModel):
        return False
    return model.batch_statistics or (model.batched and bool(jax.tree.leaves(model_state)))


def _check_padding(model, model_state, train, batch_size: int, drop_remainder: bool) -> None:
    """Refuses a final partial batch for a model that :func:`counts_padding`."""
    if drop_remainder or not counts_padding(model, model_state):
        return
    rows = train_rows(train)
    if rows is not None and rows % batch_size:
        raise ArgumentError(
            f"{{0}} {batch_size} leaves a final batch of {rows % batch_size} of the {rows} training examples, "
            "padded with weightless copies; this model's batch statistics (its library's batch norm) would count "
            "the copies: pass {1}=True, or a {0} that divides the examples",
            "batch_size", "drop_remainder",
        )  # fmt: skip


def _clamped_batch(batch_size: int, train, drop_remainder: bool, mesh) -> int:
    """A batch larger than the resident training rows is the rows: the same single batch per epoch,
    without allocating (or computing on) the padding up to ``batch_size``."""
    if not isinstance(train, tuple) or drop_remainder or mesh is not None:
        return batch_size
    return max(1, min(batch_size, train[0].shape[0]))


def _resident_bytes(data: programs.Data) -> int:
    parts = [part for part in data if isinstance(part, tuple)]
    return sum(a.nbytes for part in parts for a in part)


def check_fit_memory(
    params, optimizer: optax.GradientTransformation, batch_size: int, members: int = 1, data_bytes: int = 0
) -> None:
    """Refuses a fit whose estimated memory exceeds the device's, before anything is allocated.

    Args:
      params: one member's params, or their ``jax.ShapeDtypeStruct`` (``jax.eval_shape``).
      optimizer: the optax optimizer (its state is estimated with ``jax.eval_shape``).
      batch_size: examples per step; members: K (1 for a single run).
      data_bytes: the bytes of the data placed on the device.
    """
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    opt_state = jax.eval_shape(optimizer.init, one)
    check_memory(estimate_member_bytes(one, opt_state, batch_size, members) + data_bytes, members)
