"""One epoch as a pure function: a keyed shuffle, minibatches (the last padded and masked), a ``lax.scan``.

:func:`make_epoch` turns a per-batch update into ``epoch(state, x, y) -> (state, metrics)``, to be
jitted, vmapped over members or sharded over devices; :func:`jaxnet.fit` runs it.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet._weights import weighed
from jaxnet.base import PRNGKey, TrainState
from jaxnet.losses import has_token_axis
from jaxnet.shuffle import index_permutation
from jaxnet.step import Update


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Minibatches per epoch: ``ceil(n / b)``, or ``floor(n / b)`` with ``drop_remainder``."""
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def epoch_batches(key: PRNGKey, num_examples: int, batch_size: int, drop_remainder: bool = False, shuffle: bool = True):
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
# takes at least this many bytes, and the whole epoch's rows up front otherwise (per step needs no
# second copy of the data on the device). The threshold and the measurements behind it:
# bench/README.md, "Gathering shuffled batches".
GATHER_PER_STEP_BYTES = 1024


def _row_bytes(a: jax.Array) -> int:
    return math.prod(a.shape[1:]) * a.dtype.itemsize


def _float_dtype(tree) -> jnp.dtype:
    """The widest float dtype of ``tree``'s leaves, at least float32 (float64 under x64)."""
    floats = [a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.result_type(jnp.float32, *floats)


def _epoch_batches(shuffle_key, x, y, layout, sample_weight=None):
    """``(scanned, batch_of, divisor)``: what the scan runs over, ``batch_of(i, item) -> batch``,
    and what the epoch's loss total is divided by. ``sample_weight`` ``(n,)`` (or ``(n, T)``) weighs every batch."""
    num_examples, batch_size, drop_remainder, shuffle, padded = layout
    nb = num_batches(num_examples, batch_size, drop_remainder)
    if not (shuffle or padded or sample_weight is not None):  # the data's own order: each step slices x and y

        def sliced(i, _):
            return (
                jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size),
                jax.lax.dynamic_slice_in_dim(y, i * batch_size, batch_size),
            )

        return None, sliced, nb
    index, weight = epoch_batches(shuffle_key, num_examples, batch_size, drop_remainder, shuffle)
    divisor = num_examples if padded else nb
    if sample_weight is not None:
        weight = weighed(weight, sample_weight, index)
        padded, divisor = True, jnp.sum(weight)
    if _row_bytes(x) + _row_bytes(y) >= GATHER_PER_STEP_BYTES:  # each step gathers its rows

        def gathered(_, item):
            rows, *w = item
            return (x[rows], y[rows], *w)

        return ((index, weight) if padded else (index,)), gathered, divisor
    # one gather of the whole epoch up front (see GATHER_PER_STEP_BYTES)
    scanned = (x[index], y[index], weight) if padded else (x[index], y[index])
    return scanned, lambda _, item: item, divisor


def outputs_of(update: Update, state: TrainState, x, y, rows: int = 1) -> int:
    """The number of outputs the model predicts per example (from shapes only, on a batch of
    ``rows``: a whole batch, which an accumulating update splits), for metric states."""
    batch = tuple(jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype) for a in (x, y))
    shape = jax.eval_shape(lambda s, b: update(s, b)[1]["predictions"], state, batch).shape
    return shape[-1] if len(shape) > 1 else 1


class Carry(NamedTuple):
    """An epoch in progress, carried from step to step (and from chunk to chunk of a streamed epoch).

    Attributes:
      state: the train state.
      total: the running sum of the batch losses (each times its number of real examples when the
        epoch counts examples: padded or streamed batches).
      finite_steps: the number of steps after which ``total`` was still finite: a non-finite loss
        leaves the sum non-finite for the rest of the epoch, so this is the first non-finite step.
      steps: the steps done in this epoch.
      sums: the states of the epoch's training metrics (:mod:`jaxnet.metrics`) by name, summed
        over its steps' training-mode predictions (None without metrics).
      last: the last step's ``loss``, ``grad_norm`` and ``learning_rate`` when steps are logged
        (None otherwise).
      weight: with token targets (:func:`jaxnet.losses.has_token_axis`), the running count of the
        real tokens trained on: ``total`` then adds each step's loss times its tokens, and the
        epoch's loss is ``total / weight``, the mean over every real token (None otherwise).
    """

    state: TrainState
    total: jax.Array
    finite_steps: jax.Array
    steps: jax.Array
    sums: dict | None = None
    last: dict | None = None
    weight: jax.Array | None = None


def start_carry(state: TrainState, sums: dict | None = None, last: dict | None = None, tokens: bool = False) -> Carry:
    """The carry of an epoch's first step (the loss summed in the params' float dtype, at least
    float32), with the metrics' zero ``sums`` and a ``last`` template when asked for, and a zero
    token count with ``tokens`` (targets with a token axis)."""
    # distinct arrays: a chunked epoch donates the carry, and a buffer cannot be donated twice
    steps = [jnp.zeros((), jnp.int32) for _ in range(2)]
    fresh = (None if tree is None else jax.tree.map(jnp.zeros_like, tree) for tree in (sums, last))
    dtype = _float_dtype(state.params)
    weight = jnp.zeros((), dtype) if tokens else None
    return Carry(state, jnp.zeros((), dtype), *steps, *fresh, weight)


def metric_zeros(metrics: tuple, outputs: int) -> dict | None:
    """The zero states of ``metrics`` for a model of ``outputs`` outputs (None without metrics)."""
    return {m.name: m.zeros(outputs) for m in metrics} or None


def logged_template(update_outputs: dict) -> dict:
    """The zero ``carry.last`` of logged steps: ``loss``, ``grad_norm`` and, when the update
    returns one (an injected optimizer), ``learning_rate``."""
    names = ("loss", "grad_norm", *(("learning_rate",) if "learning_rate" in update_outputs else ()))
    return {name: jnp.zeros((), jnp.float32) for name in names}


def epoch_metrics(carry: Carry, divisor) -> dict:
    """``{"loss", "first_nonfinite", "sums"?}`` of a finished epoch: ``total / divisor`` (NaN if
    not finite) and the training metrics' states."""
    finite = jnp.isfinite(carry.total)
    if carry.weight is not None:  # token targets: the mean over every real token of the epoch
        divisor = carry.weight
    out = {
        "loss": jnp.where(finite, carry.total / divisor, jnp.nan),
        "first_nonfinite": jnp.where(finite, -1, carry.finite_steps),
    }
    if carry.sums is not None:
        out["sums"] = carry.sums
    return out


def _metric_sums(metrics: tuple, sums: dict, predictions, batch, weighted: bool) -> dict:
    x, y = batch[0], batch[1]
    w = batch[2] if weighted else jnp.ones((x.shape[0],), jnp.float32)
    return {m.name: m.update(sums[m.name], predictions, y, w.astype(jnp.float32)) for m in metrics}


def _logged(out: dict, carry: Carry, every: int) -> dict:
    """``carry.last``, replaced by this step's logged values when it is an ``every``-th step
    of the epoch; the gradients' global norm is computed on those steps only."""
    logged = (carry.steps + 1) % every == 0
    norm = jax.lax.cond(
        logged,
        lambda g: optax.tree_utils.tree_norm(g).astype(jnp.float32),
        lambda g: jnp.zeros((), jnp.float32),
        out["grads"],
    )
    values = {**out, "grad_norm": norm}
    return {k: jnp.where(logged, values[k].astype(jnp.float32), carry.last[k]) for k in carry.last}


def _step_body(
    update: Update, weighted: bool, count: bool, metrics: tuple = (), log: int | None = None
) -> Callable[[Carry, tuple], Carry]:
    """One step: ``(carry, batch) -> carry``. ``weighted`` batches are ``(x, y, w)``; ``count``
    adds each batch's loss times its real examples (``sum(w)``, or the batch size) to the total.
    ``metrics`` add the step's predictions to the carry's sums; ``log`` (N) keeps every N-th step's
    logged values in ``carry.last`` (the update must return predictions, and gradients, for them).

    The epoch's metrics accumulate in the carry (a per-step output buffer would hold members x
    steps losses when vmapped). The step index is carried (XLA merges it with the loop's own
    counter); a select of it costs less per step than counting.
    """

    def body(carry: Carry, batch) -> Carry:
        state, out = update(carry.state, batch)
        loss, weight = out["loss"], carry.weight
        if weight is not None:  # token targets: the loss times the step's real tokens (or examples)
            real = out["weight"] if "weight" in out else jnp.sum(batch[2]) if weighted else batch[0].shape[0]
            loss, weight = loss * real, weight + jnp.asarray(real).astype(weight.dtype)
        elif count:
            loss = loss * (jnp.sum(batch[2]) if weighted else batch[0].shape[0])
        total = carry.total + loss.astype(carry.total.dtype)
        steps = carry.steps + 1
        sums = carry.sums
        if metrics:
            sums = _metric_sums(metrics, sums, out["predictions"], batch, weighted)
        last = _logged(out, carry, log) if log else carry.last
        finite_steps = jnp.where(jnp.isfinite(total), steps, carry.finite_steps)
        return Carry(state, total, finite_steps, steps, sums, last, weight)

    return body


def make_steps(
    update: Update,
    *,
    weighted: bool,
    count: bool,
    gather: bool,
    unroll: int = 1,
    metrics: tuple = (),
    log: int | None = None,
) -> Callable:
    """A run of steps of an epoch as a pure function: a chunk of a streamed or checkpointed epoch.

    Args:
      update: the per-batch update, as in :func:`make_epoch`.
      weighted: batches carry per-example weights (padding).
      count: the total adds each loss times its real examples (see :class:`Carry`).
      gather: the steps gather their rows from whole arrays by index; otherwise they scan over
        stacked batches.
      unroll: ``lax.scan`` unroll factor.
      metrics, log: training metrics summed in the carry, and every ``log``-th step's values kept
        (see :func:`_step_body`).

    Returns:
      With ``gather``: ``steps(carry, x: (n, ...), y: (n, ...), index: (S, b)[, weight: (S, b)])``;
      otherwise ``steps(carry, xs: (S, b, ...), ys: (S, b, ...)[, ws: (S, b)])``; both ``-> carry``.
    """
    body = _step_body(update, weighted, count, metrics, log)

    if gather:

        def gathered(carry: Carry, x, y, index, *weight):
            def one(c, item):
                rows, *w = item
                return body(c, (x[rows], y[rows], *w)), None

            return jax.lax.scan(one, carry, (index, *weight), unroll=unroll)[0]

        return gathered

    def stacked(carry: Carry, *batches):
        return jax.lax.scan(lambda c, batch: (body(c, batch), None), carry, batches, unroll=unroll)[0]

    return stacked


def make_epoch(
    update: Update,
    num_examples: int,
    batch_size: int,
    *,
    drop_remainder: bool = False,
    shuffle: bool = True,
    unroll: int = 1,
    metrics: tuple = (),
    sample_weights: bool = False,
    weighs_classes: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
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
      metrics: :class:`jaxnet.metrics.Metric` s of the training predictions, summed over the epoch
        (the update must return ``predictions``: ``make_update(..., outputs=True)``).
      sample_weights: the epoch takes a fourth argument, per-example weights ``(n,)``: each
        batch's loss is their weighted mean, the epoch's loss their weighted mean over the epoch.
      weighs_classes: ``update`` weighs each example by its class and reports the weight
        (:func:`jaxnet.step.weigh_classes`): the epoch's loss is the weighted mean over it.

    Returns:
      ``epoch(state, x: (n, ...), y: (n, ...)[, sample_weight: (n,)]) -> (state, metrics)``, with
      metrics ``{"loss": mean train loss over examples (NaN if any step's loss was not finite),
      "first_nonfinite": index of the first step whose loss was not finite (or whose running
      sum overflowed), or -1, "sums": the metrics' states (with metrics)}``. The loss is summed in
      the params' float dtype (at least float32). Under ``optax.apply_if_finite`` the optimizer
      state counts the skipped updates (``total_notfinite``).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if drop_remainder and batch_size > num_examples:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {num_examples} training examples with drop_remainder: "
            "lower the batch size"
        )
    nb = num_batches(num_examples, batch_size, drop_remainder)
    padded = nb * batch_size > num_examples  # only then do updates need per-example weights
    layout = (num_examples, batch_size, drop_remainder, shuffle, padded)
    weighted = padded or sample_weights
    body = _step_body(update, weighted, weighted, metrics)

    def epoch(state: TrainState, x: jax.Array, y: jax.Array, *sample_weight):
        if len(sample_weight) != int(sample_weights):
            raise TypeError(f"epoch takes {3 + int(sample_weights)} arguments (sample_weights={sample_weights})")
        key, shuffle_key = jax.random.split(state.key)
        scanned, batch_of, divisor = _epoch_batches(shuffle_key, x, y, layout, *sample_weight)
        sums = metric_zeros(metrics, outputs_of(update, state, x, y, batch_size)) if metrics else None
        carry = start_carry(state._replace(key=key), sums, tokens=has_token_axis(y) or weighs_classes)
        carry, _ = jax.lax.scan(
            lambda c, item: (body(c, batch_of(c.steps, item)), None), carry, scanned, length=nb, unroll=unroll
        )
        return carry.state, epoch_metrics(carry, divisor)

    return epoch
