"""Data fed from the host in compiled chunks: streamed epochs, batched evaluation and prediction.

A chunk is S batches stacked, ``(S, b, ...)``, run by one compiled ``lax.scan``
(:func:`jaxnet.epoch.make_steps`). While the device runs a chunk, a background thread reads,
stacks and transfers the next (double buffering): the device waits only when the host cannot
keep up. S comes from a memory budget (:data:`CHUNK_BYTES`; about three chunks in flight).

Indexed sources are read in the epoch's keyed order (:func:`jaxnet.epoch.epoch_batches`, the
layout resident data gets); sequential sources in their own order, through
:func:`jaxnet.sources.batches_of`. In a run of several processes each reads its share of every
global batch of an indexed source (its columns of the batch), and
:func:`jax.make_array_from_process_local_data` assembles the global chunk.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import sharding as shardinglib
from jaxnet import sources
from jaxnet._weights import weighed
from jaxnet.epoch import epoch_batches, epoch_metrics, num_batches, start_carry
from jaxnet.forward import apply_batch
from jaxnet.losses import LossSpec, has_token_axis, loss_sums
from jaxnet.members import num_members
from jaxnet.shuffle import permutation_at

CHUNK_BYTES = 32 * 2**20
"""Default bytes of one chunk of streamed batches (x, y and weights); about three are in flight."""


# An epoch's batch layout in one compiled call (eagerly, the permutation's ops dispatch one by one).
_epoch_layout = jax.jit(epoch_batches, static_argnums=(1, 2, 3, 4))
_member_layouts = jax.jit(jax.vmap(epoch_batches, in_axes=(0, None, None, None, None)), static_argnums=(1, 2, 3, 4))


def epoch_layout(shuffle_key, n: int, batch_size: int, drop_remainder: bool, shuffle: bool):
    """``(index, weight)`` of an epoch (:func:`jaxnet.epoch.epoch_batches`) as device arrays,
    ``(nb, b)``; or ``(K, nb, b)``, one layout per member, for a ``(K,)`` array of keys."""
    layout = _epoch_layout if num_members(shuffle_key) is None else _member_layouts
    return layout(shuffle_key, n, batch_size, drop_remainder, shuffle)


def _permuted(shuffle_key, wrapped, n: int):
    return permutation_at(shuffle_key, n, wrapped)


_permuted_at = jax.jit(_permuted, static_argnums=(2,))
_member_permuted_at = jax.jit(jax.vmap(_permuted, in_axes=(0, None, None)), static_argnums=(2,))


class Layout(NamedTuple):
    """An epoch's batch layout computed a run of steps at a time (:meth:`steps`), never whole: the
    same rows as :func:`jaxnet.epoch.epoch_batches` (bitwise), for sources of any number of rows.
    ``shape`` is ``(nb, b)``, or ``(K, nb, b)`` for a ``(K,)`` array of keys (one order per member)."""

    shuffle_key: Any
    n: int
    batch_size: int
    shape: tuple
    shuffle: bool

    @classmethod
    def of(cls, shuffle_key, n: int, batch_size: int, drop_remainder: bool, shuffle: bool) -> Layout:
        k = None if shuffle_key is None else num_members(shuffle_key)
        nb = num_batches(n, batch_size, drop_remainder)
        return cls(shuffle_key, n, batch_size, ((k,) if k else ()) + (nb, batch_size), shuffle)

    def steps(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(index, weight)`` of steps ``first .. stop - 1``: ``(..., stop - first, b)`` numpy arrays
        (positions past the ``n`` rows repeat the order cyclically, weight 0, as in ``epoch_batches``)."""
        b = self.batch_size
        positions = np.arange(first * b, stop * b, dtype=np.int64)  # on the host: no int32 overflow
        wrapped = (positions % self.n).astype(np.uint32)
        if self.shuffle:
            at = _permuted_at if len(self.shape) == 2 else _member_permuted_at
            index = np.asarray(jax.device_get(at(self.shuffle_key, wrapped, self.n)))
        else:
            index = np.broadcast_to(wrapped.astype(np.int32), (*self.shape[:-2], len(wrapped)))
        weight = np.broadcast_to((positions < self.n).astype(np.float32), index.shape)
        shape = (*self.shape[:-2], stop - first, b)
        return index.reshape(shape), weight.reshape(shape)


def split_keys(key):
    """``(key, shuffle_key)`` of a new epoch from the train state's key (per member for ``(K,)`` keys)."""
    if num_members(key) is None:
        return tuple(jax.random.split(key))
    both = jax.vmap(jax.random.split)(key)
    return both[:, 0], both[:, 1]


class Chunk(NamedTuple):
    """S stacked batches: ``arrays`` ``(xs, ys[, ws])``, numpy on the host or placed on devices."""

    arrays: tuple
    steps: int
    weighted: bool
    examples: int


class Position(NamedTuple):
    """Where an epoch stands between two chunks: what resumes it exactly.

    Attributes:
      shuffle_key: the epoch's shuffling key (its order of indexed rows, its sequential seed).
      total, finite_steps: the epoch's running loss sum and first non-finite step (see
        :class:`jaxnet.epoch.Carry`).
      steps: the steps done in the epoch; examples: the real examples they trained on (their
        summed weight with sample weights).
      sums: the epoch's training metric states so far (None without metrics).
      weight: with token targets, the real tokens trained on so far (see
        :class:`jaxnet.epoch.Carry`); None otherwise.
      order: how the epoch reads its rows, ``(batch_size, shuffle, drop_remainder,
        shuffle_buffer)``: a resume must read them the same way (() when not known: a checkpoint
        of an older version).
    """

    shuffle_key: Any
    total: Any
    finite_steps: Any
    steps: int
    examples: int
    sums: Any = None
    weight: Any = None
    order: tuple = ()


def chunk_steps(spec: sources.RowSpec, batch_size: int, budget: int = CHUNK_BYTES, most: int | None = None) -> int:
    """Steps per chunk: as many batches as ``budget`` bytes hold (at least 1, at most ``most``)."""
    per_step = batch_size * (spec.row_bytes + 4)
    steps = max(1, budget // max(per_step, 1))
    return int(min(steps, most) if most else steps)


def seed_of(key) -> int:
    """A numpy seed from a JAX key (for sequential sources and their shuffle buffers)."""
    data = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return int(sum(int(v) << (32 * i) for i, v in enumerate(data)))


class Share(NamedTuple):
    """This process's part of each global batch: columns ``[start, stop)`` of ``batch_size``."""

    start: int
    stop: int
    batch_size: int

    @staticmethod
    def of(batch_size: int, mesh=None) -> Share:
        if mesh is None or jax.process_count() == 1:
            return Share(0, batch_size, batch_size)
        per = batch_size // jax.process_count()
        return Share(jax.process_index() * per, (jax.process_index() + 1) * per, batch_size)


def indexed_chunks(source, order: Layout, padded: bool, steps: int, start: int, share: Share):
    """Chunks of an epoch over an indexed source in the order of ``order`` (``(nb, b)``, or
    ``(K, nb, b)`` for K members: each chunk then ``(K, S, b, ...)``, every member's own rows), the
    last batch's padding weighted 0 when ``padded``; each chunk's rows are computed when it is read."""
    nb = order.shape[-2]
    for s in range(start, nb, steps):
        index, weight = order.steps(s, min(s + steps, nb))
        rows = index[..., share.start : share.stop]
        x, y = source.read(rows.reshape(-1))
        arrays = (x.reshape(*rows.shape, *x.shape[1:]), y.reshape(*rows.shape, *y.shape[1:]))
        w = weight[..., share.start : share.stop] if padded else None
        one = rows[(0,) * (rows.ndim - 2)] if w is None else w[(0,) * (w.ndim - 2)]  # a member's: all alike
        examples = one.size if w is None else int(one.sum())
        yield Chunk(arrays if w is None else (*arrays, w), rows.shape[-2], w is not None, examples)
        source.release()


def _stacked(xs: list, ys: list) -> tuple:
    """The batches stacked ``(S, b, ...)`` into aligned arrays (placed on a CPU device in place)."""
    out = []
    for parts in (xs, ys):
        stacked = sources.aligned_empty((len(parts), *parts[0].shape), parts[0].dtype)
        np.stack(parts, out=stacked)
        out.append(stacked)
    return tuple(out)


def _padded(x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple:
    """A last, partial batch as a chunk of one step: zero rows appended, weighted 0."""
    w = (np.arange(batch_size) < len(x)).astype(np.float32)
    return sources.padded_rows(x, batch_size)[None], sources.padded_rows(y, batch_size)[None], w[None]


def sequential_chunks(
    source, batch_size: int, steps: int, seed: int, shuffle: bool, shuffle_buffer: int, drop_remainder: bool, start
):
    """Chunks of an epoch over a sequential source, ``start`` batches skipped (a resumed epoch);
    full batches in chunks of ``steps``, a last partial batch padded and weighted in its own."""

    def read() -> Iterator:
        return sources.batches_of(source.blocks(seed, shuffle), batch_size, seed, shuffle_buffer)

    if getattr(source, "once", False):  # an iterator is continued (what a round read ahead kept), not read again
        batches = source.continued(start, read, keep=4 * steps + 4)
    else:
        batches = read()
        for done in range(start):
            if next(batches, None) is None:
                raise sources.DataError(
                    f"{source.name} ended after {done} batches, before step {start} where the checkpoint stands: "
                    "a resumed run needs the same data, in the same order"
                )
    xs, ys = [], []
    full = start
    for x, y in batches:
        if len(x) < batch_size and drop_remainder and full == 0:
            raise sources.DataError(
                f"{source.name} holds {len(x)} rows, fewer than one batch of {batch_size}, and drop_remainder drops "
                "them: lower the batch size"
            )
        full += len(x) == batch_size
        if len(x) < batch_size:  # the last batch
            if xs:
                yield Chunk(_stacked(xs, ys), len(xs), False, len(xs) * batch_size)
                xs, ys = [], []
            if not drop_remainder:
                yield Chunk(_padded(x, y, batch_size), 1, True, len(x))
            return
        xs.append(x)
        ys.append(y)
        if len(xs) == steps:
            yield Chunk(_stacked(xs, ys), steps, False, steps * batch_size)
            xs, ys = [], []
    if xs:
        yield Chunk(_stacked(xs, ys), len(xs), False, len(xs) * batch_size)


_END = object()


class _Failure(NamedTuple):
    error: BaseException


def prefetched(chunks: Iterator[Chunk], put: Callable, depth: int = 1) -> Iterator[Chunk]:
    """``chunks`` read, stacked and placed by ``put`` in a background thread, ``depth`` ahead of
    the consumer. An error in the thread is raised in the consumer; closing the iterator stops it."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                ready.put(chunk._replace(arrays=put(chunk.arrays)))
            ready.put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(_Failure(e))

    thread = threading.Thread(target=produce, name="jaxnet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass


def placer(mesh=None) -> Callable:
    """``put(arrays)``: stacked ``(S, b, ...)`` host arrays onto the device, or split over ``mesh``'s
    ``"data"`` axis along ``b`` (from each process's share in a multi-process run)."""
    if mesh is None:
        return jax.device_put
    sharding = NamedSharding(mesh, P(None, shardinglib.batch_axes(mesh)))
    if jax.process_count() == 1:
        return functools.partial(jax.device_put, device=sharding)

    def put(arrays):
        count = jax.process_count()

        def one(a):
            shape = (a.shape[0], a.shape[1] * count, *a.shape[2:])
            return jax.make_array_from_process_local_data(sharding, a, shape)

        return tuple(one(a) for a in arrays)

    return put


class StreamLayout(NamedTuple):
    """How an epoch of a source is cut: fixed for a fit."""

    batch_size: int
    steps: int
    drop_remainder: bool
    shuffle: bool
    shuffle_buffer: int
    share: Share


def epoch_chunks(source, layout: StreamLayout, shuffle_key, start: int) -> tuple[Iterator[Chunk], Callable]:
    """``(chunks, divisor)`` of one epoch over ``source``: its chunks from step ``start``, and what
    the epoch's loss total is divided by, as a function of the real examples trained on."""
    b = layout.batch_size
    if source.kind == "indexed":
        n = source.num_rows
        order = Layout.of(shuffle_key, n, b, layout.drop_remainder, layout.shuffle)
        nb = order.shape[-2]
        padded = nb * b > n
        chunks = indexed_chunks(source, order, padded, layout.steps, start, layout.share)
        return chunks, (lambda examples: n if padded else nb)
    seed = seed_of(shuffle_key)
    buffer = layout.shuffle_buffer if layout.shuffle else 0
    chunks = sequential_chunks(source, b, layout.steps, seed, layout.shuffle, buffer, layout.drop_remainder, start)
    return chunks, (lambda examples: examples)


def resident_chunks(
    n: int, layout: StreamLayout, shuffle_key, start: int, sample_weight=None
) -> tuple[Iterator[Chunk], Callable]:
    """``(chunks, divisor)`` of an epoch of ``n`` resident rows cut into chunks of steps: each
    chunk is its rows' ``(index[, weight])`` ``(S, b)`` (``(K, S, b)`` for K members' keys), for
    steps that gather from the arrays; ``sample_weight`` ``(n,)`` (or ``(n, T)``) multiplies the
    weights (which every chunk then has)."""
    index, weight = epoch_layout(shuffle_key, n, layout.batch_size, layout.drop_remainder, layout.shuffle)
    nb = index.shape[-2]
    padded = nb * layout.batch_size > n
    divisor = n if padded else nb
    if sample_weight is not None:
        weight = weighed(weight, sample_weight, index)
        padded = True
    # on the host: slicing device arrays chunk by chunk would dispatch a program per slice
    index, weight = jax.device_get((index, weight))
    sums = weight.reshape(*index.shape[:-1], -1).sum(axis=-1, dtype=np.float64)  # (nb,), or (K, nb) per member
    if sample_weight is not None:
        divisor = sums.sum(axis=-1)
    first = sums.reshape(-1, nb)[0]  # the first member's: for the position (the divisor does not use it)

    def chunks():
        lead = (slice(None),) * (index.ndim - 2)  # (K,) members' axis; the weights may have a token axis last
        for s in range(start, nb, layout.steps):
            steps_at = (*lead, slice(s, s + layout.steps))
            part = (index[steps_at],) + ((weight[steps_at],) if padded else ())
            steps = part[0].shape[-2]
            examples = float(first[s : s + steps].sum()) if padded else steps * layout.batch_size
            yield Chunk(part, steps, padded, examples)

    return chunks(), (lambda examples: divisor)


def counts_examples(source, layout: StreamLayout) -> bool:
    """Whether the epoch's total adds each loss times its examples (else the mean of batch losses)."""
    if source.kind != "indexed":
        return True
    return num_batches(source.num_rows, layout.batch_size, layout.drop_remainder) * layout.batch_size > source.num_rows


def run_epoch(
    chunks_for: Callable,
    program: Callable,
    put: Callable,
    train,
    position: Position | None,
    on_chunk,
    fresh=None,
    order: tuple = (),
):
    """One epoch in chunks (or the rest of one, from ``position``).

    Args:
      chunks_for: ``(shuffle_key, start) -> (chunks, divisor)`` (:func:`epoch_chunks`).
      program: ``program(weighted)`` is the compiled ``steps(carry, *chunk.arrays) -> carry``.
      put: places a chunk's arrays (in the prefetch thread); None: the chunks are read in this
        thread, as they come (resident data: index arrays only).
      train: the train state; position: where a resumed epoch stands, or None for a new epoch.
      on_chunk: ``on_chunk(carry, position, last)`` after each chunk (``last`` True after the
        epoch's last); True from it after any other stops the epoch there.
      fresh: ``fresh(train) -> carry`` of a new epoch (default :func:`jaxnet.epoch.start_carry`;
        the metric sums and logged values of a fit's).
      order: the epoch's :attr:`Position.order`, recorded in every position.

    Returns:
      ``(train, metrics, position)``: metrics as :func:`jaxnet.epoch.make_epoch`'s and ``position``
      None; or metrics None and the position reached when ``on_chunk`` stopped the epoch.
    """
    fresh = fresh or start_carry
    if position is None:
        key, shuffle_key = split_keys(train.key)
        carry, examples, steps = fresh(train._replace(key=key)), 0, 0
    else:
        shuffle_key, examples, steps = position.shuffle_key, position.examples, position.steps
        # copies: the carry is donated, and the caller's state (resumable again) must stay valid
        kept = (position.total, position.finite_steps, position.sums, position.weight)
        total, finite_steps, sums, weight = jax.tree.map(lambda a: jnp.array(a, copy=True), kept)
        carry = fresh(train)
        done = jnp.full(carry.steps.shape, steps, jnp.int32)  # (K,) in a member run
        carry = carry._replace(total=total, finite_steps=finite_steps, steps=done, sums=sums, weight=weight)
    chunks, divisor = chunks_for(shuffle_key, steps)
    pending = None
    stream = prefetched(chunks, put) if put is not None else chunks
    try:
        for chunk in stream:
            if pending is not None and on_chunk(carry, pending, False):
                return carry.state, None, pending
            carry = program(chunk.weighted)(carry, *chunk.arrays)
            steps, examples = steps + chunk.steps, examples + chunk.examples
            pending = Position(
                shuffle_key, carry.total, carry.finite_steps, steps, examples, carry.sums, carry.weight, order
            )
    finally:
        stream.close()
    if pending is not None:
        on_chunk(carry, pending, True)
    return carry.state, dict(epoch_metrics(carry, divisor(examples)), steps=steps), None


# ----------------------------------------------------------------------------- evaluation


def _example_sums(model, spec: LossSpec, metrics: tuple, params, model_state, x, y, w) -> dict:
    """Weighted sums over one batch: ``loss``, ``accuracy`` (with a metric), ``weight``, and each
    named metric's state (:mod:`jaxnet.metrics`) under ``"metric:<name>"``."""
    predictions, _ = apply_batch(model, params, model_state, x, weight=w)
    if has_token_axis(y):  # token targets: every real token is a term, IGNORE_INDEX ones none
        loss, count = loss_sums(spec.fn, predictions, y, w)
        sums = {"loss": loss.astype(jnp.float32), "weight": count.astype(jnp.float32)}
        if spec.metric is not None:
            sums["accuracy"] = loss_sums(spec.metric, predictions, y, w)[0].astype(jnp.float32)
    else:
        sums = {"loss": jnp.sum(w * jax.vmap(spec.fn)(predictions, y).astype(jnp.float32)), "weight": jnp.sum(w)}
        if spec.metric is not None:
            sums["accuracy"] = jnp.sum(w * jax.vmap(spec.metric)(predictions, y).astype(jnp.float32))
    outputs = predictions.shape[-1] if predictions.ndim > 1 else 1
    for m in metrics:
        sums[f"metric:{m.name}"] = m.update(m.zeros(outputs), predictions, y, w)
    return sums


def make_eval_chunk(model, spec: LossSpec, *, gather: bool, metrics: tuple = ()) -> Callable:
    """``(params, model_state, xs, ys, ws) -> sums`` over stacked batches, or with ``gather``
    ``(params, model_state, x, y, index, weight) -> sums`` over the rows of resident arrays."""

    def run(params, model_state, batch_of, scanned):
        def batch_sums(item):
            return _example_sums(model, spec, metrics, params, model_state, *batch_of(item))

        def one(total, item):
            return jax.tree.map(jnp.add, total, batch_sums(item)), None

        first = jax.tree.map(lambda a: a[0], scanned)
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(batch_sums, first))
        return jax.lax.scan(one, zero, scanned)[0]

    if gather:

        def gathered(params, model_state, x, y, index, weight):
            return run(params, model_state, lambda item: (x[item[0]], y[item[0]], item[1]), (index, weight))

        return gathered

    def stacked(params, model_state, xs, ys, ws):
        return run(params, model_state, lambda item: item, (xs, ys, ws))

    return stacked


def means_of(total: dict, metrics: tuple = ()) -> dict[str, np.ndarray]:
    """``{"loss", "accuracy"?, <metric names>}`` from summed states: the weighted means, and each
    metric's result (float64 on the host; per member when the sums have a member axis)."""
    weight = np.asarray(total["weight"], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            name: np.asarray(v, np.float64) / weight
            for name, v in total.items()
            if name != "weight" and not name.startswith("metric:")
        }
    for m in metrics:
        state = np.asarray(total[f"metric:{m.name}"], np.float64)
        out[m.name] = np.asarray(m.result(state) if weight.ndim == 0 else [m.result(s) for s in state])
    return out


def eval_layout(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)`` ``(nb, b)`` of ``n`` rows in order, the last batch padded (weight 0)."""
    nb = max(1, math.ceil(n / batch_size))
    flat = np.arange(nb * batch_size)
    return (flat % n).reshape(nb, batch_size).astype(np.int32), (flat < n).astype(np.float32).reshape(nb, batch_size)


def source_batches(source, batch_size: int, steps: int) -> Iterator[Chunk]:
    """Every example of ``source`` once, in order, in weighted chunks (padding weighs 0)."""
    if source.kind == "indexed":
        order = Layout.of(None, source.num_rows, batch_size, drop_remainder=False, shuffle=False)
        yield from indexed_chunks(source, order, True, steps, 0, Share(0, batch_size, batch_size))
        return
    for chunk in sequential_chunks(source, batch_size, steps, 0, False, 0, False, 0):
        if not chunk.weighted:
            xs, ys = chunk.arrays
            chunk = chunk._replace(arrays=(xs, ys, np.ones(xs.shape[:2], np.float32)), weighted=True)
        yield chunk
