"""One epoch as a pure function: a keyed shuffle, minibatches (the last padded and masked), a ``lax.scan``.

:func:`make_epoch` turns a per-batch update into ``epoch(state, x, y) -> (state, metrics)``, to be
jitted, vmapped over members or sharded over devices; :func:`jaxnet.fit` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxnet.base import PRNGKey, TrainState
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


def _epoch_batches(shuffle_key, x, y, layout):
    """``(scanned, batch_of)``: what the scan runs over and ``batch_of(i, item) -> batch``."""
    num_examples, batch_size, drop_remainder, shuffle, padded = layout
    if not (shuffle or padded):  # the data's own order: each step slices its batch from x and y

        def sliced(i, _):
            return (
                jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size),
                jax.lax.dynamic_slice_in_dim(y, i * batch_size, batch_size),
            )

        return None, sliced
    index, weight = epoch_batches(shuffle_key, num_examples, batch_size, drop_remainder, shuffle)
    if _row_bytes(x) + _row_bytes(y) >= GATHER_PER_STEP_BYTES:  # each step gathers its rows

        def gathered(_, item):
            rows, *w = item
            return (x[rows], y[rows], *w)

        return ((index, weight) if padded else (index,)), gathered
    # one gather of the whole epoch up front (see GATHER_PER_STEP_BYTES)
    return ((x[index], y[index], weight) if padded else (x[index], y[index])), lambda _, item: item


class Carry(NamedTuple):
    """An epoch in progress, carried from step to step (and from chunk to chunk of a streamed epoch).

    Attributes:
      state: the train state.
      total: the running sum of the batch losses (each times its number of real examples when the
        epoch counts examples: padded or streamed batches).
      finite_steps: the number of steps after which ``total`` was still finite: a non-finite loss
        leaves the sum non-finite for the rest of the epoch, so this is the first non-finite step.
      steps: the steps done in this epoch.
    """

    state: TrainState
    total: jax.Array
    finite_steps: jax.Array
    steps: jax.Array


def start_carry(state: TrainState) -> Carry:
    """The carry of an epoch's first step (the loss summed in the params' float dtype, at least float32)."""
    # distinct arrays: a chunked epoch donates the carry, and a buffer cannot be donated twice
    steps = [jnp.zeros((), jnp.int32) for _ in range(2)]
    return Carry(state, jnp.zeros((), _float_dtype(state.params)), *steps)


def epoch_metrics(carry: Carry, divisor) -> dict:
    """``{"loss", "first_nonfinite"}`` of a finished epoch: ``total / divisor`` (NaN if not finite)."""
    finite = jnp.isfinite(carry.total)
    return {
        "loss": jnp.where(finite, carry.total / divisor, jnp.nan),
        "first_nonfinite": jnp.where(finite, -1, carry.finite_steps),
    }


def _step_body(update: Update, weighted: bool, count: bool) -> Callable[[Carry, tuple], Carry]:
    """One step: ``(carry, batch) -> carry``. ``weighted`` batches are ``(x, y, w)``; ``count``
    adds each batch's loss times its real examples (``sum(w)``, or the batch size) to the total.

    The epoch's metrics accumulate in the carry (a per-step output buffer would hold members x
    steps losses when vmapped). The step index is carried (XLA merges it with the loop's own
    counter); a select of it costs less per step than counting.
    """

    def body(carry: Carry, batch) -> Carry:
        state, metrics = update(carry.state, batch)
        loss = metrics["loss"]
        if count:
            loss = loss * (jnp.sum(batch[2]) if weighted else batch[0].shape[0])
        total = carry.total + loss.astype(carry.total.dtype)
        steps = carry.steps + 1
        return Carry(state, total, jnp.where(jnp.isfinite(total), steps, carry.finite_steps), steps)

    return body


def make_steps(update: Update, *, weighted: bool, count: bool, gather: bool, unroll: int = 1) -> Callable:
    """A run of steps of an epoch as a pure function: a chunk of a streamed or checkpointed epoch.

    Args:
      update: the per-batch update, as in :func:`make_epoch`.
      weighted: batches carry per-example weights (padding).
      count: the total adds each loss times its real examples (see :class:`Carry`).
      gather: the steps gather their rows from whole arrays by index; otherwise they scan over
        stacked batches.
      unroll: ``lax.scan`` unroll factor.

    Returns:
      With ``gather``: ``steps(carry, x: (n, ...), y: (n, ...), index: (S, b)[, weight: (S, b)])``;
      otherwise ``steps(carry, xs: (S, b, ...), ys: (S, b, ...)[, ws: (S, b)])``; both ``-> carry``.
    """
    body = _step_body(update, weighted, count)

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
      sum overflowed), or -1}``. The loss is summed in the params' float dtype (at least
      float32). Under ``optax.apply_if_finite`` the optimizer state counts the skipped updates
      (``total_notfinite``).
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

    body = _step_body(update, padded, padded)

    def epoch(state: TrainState, x: jax.Array, y: jax.Array):
        key, shuffle_key = jax.random.split(state.key)
        scanned, batch_of = _epoch_batches(shuffle_key, x, y, layout)
        carry = start_carry(state._replace(key=key))
        carry, _ = jax.lax.scan(
            lambda c, item: (body(c, batch_of(c.steps, item)), None), carry, scanned, length=nb, unroll=unroll
        )
        return carry.state, epoch_metrics(carry, num_examples if padded else nb)

    return epoch
