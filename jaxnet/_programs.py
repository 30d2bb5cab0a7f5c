"""The compiled programs of a fit, bound to its data: epochs and validation.

:func:`build_programs` returns two host functions that :func:`jaxnet.fit`'s loop calls, whatever the data:

- ``train_epoch(train, position, on_chunk) -> (train, metrics, position)``: resident data runs
  each epoch as one compiled call (:func:`jaxnet.epoch.make_epoch`; plain, data parallel on a
  mesh, or vmapped over members), or in chunks of steps that gather from the resident arrays
  when ``chunk_steps`` asks for positions inside epochs; streamed data (a source of
  :mod:`jaxnet.sources`) runs in chunks fed from the host (:mod:`jaxnet._feed`).
- ``validate(params, model_state) -> {"loss", "accuracy"?}``: batched weighted means over the
  validation data, resident (one call) or streamed (chunk by chunk), per member.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxnet import _feed as feed
from jaxnet import parallel
from jaxnet import sharding as shardinglib
from jaxnet._options import FitOptions
from jaxnet.epoch import (
    logged_template,
    make_epoch,
    make_steps,
    metric_zeros,
    num_batches,
    outputs_of,
    start_carry,
)
from jaxnet.losses import has_token_axis
from jaxnet.step import make_update, skip_nonfinite_updates, weigh_classes

DEFAULT_EVAL_BATCH = 1024


class Programs(NamedTuple):
    """What the loop runs: see the module docstring. ``place`` puts a train state where the
    programs expect it (on a mesh: laid out by the fit's sharding rules)."""

    train_epoch: Callable
    validate: Callable | None
    place: Callable


class Data(NamedTuple):
    """A fit's data: ``train`` a resident ``(x, y)`` pair (``(x, y, sample_weight)`` with weights)
    or a source; ``validation`` a resident pair or a source, or None."""

    train: Any
    validation: Any


def _update(model, spec, optimizer, options: FitOptions, mesh):
    if options.skip_nonfinite:
        optimizer = skip_nonfinite_updates(optimizer)
    update = make_update(
        model,
        spec,
        optimizer,
        compute_dtype=options.compute_dtype,
        outputs=bool(options.metrics),
        gradients=options.logs_steps,
        per_example=options.per_example_grads,
        accumulate=options.accumulate,
        device_invariant=options.device_invariant,
        mesh=mesh,
    )
    if options.class_weights is not None:
        update = weigh_classes(update, options.class_weights)
    if mesh is not None:
        parallel.check_batch_size(options.batch_size, shardinglib.batch_devices(mesh))
        update = parallel.constrain_batch(update, mesh)
    return update


def _layout(options: FitOptions, steps: int, mesh) -> feed.StreamLayout:
    b = options.batch_size
    return feed.StreamLayout(
        b, steps, options.drop_remainder, options.shuffle, options.shuffle_buffer, feed.Share.of(b, mesh)
    )


def epoch_order(options: FitOptions) -> tuple:
    """How a fit's epochs read their rows (:attr:`jaxnet._feed.Position.order`), as plain Python
    values (a checkpoint stores them as JSON; a caller may give NumPy scalars): the shuffle buffer
    counts only when rows are shuffled."""
    shuffle = bool(options.shuffle)
    buffer = int(options.shuffle_buffer) if shuffle else 0
    return (int(options.batch_size), shuffle, bool(options.drop_remainder), buffer)


def _fresh(update, options: FitOptions, x, y) -> Callable:
    """``fresh(train) -> carry`` of a new chunked epoch: zero metric sums and a logged-values
    template, their shapes found once from the update's (``x``, ``y``: anything with the rows'
    shapes); per member (a leading axis K on every leaf) in a member run."""
    metrics, log = options.metrics, options.logs_steps
    found: list = []

    def fresh(train):
        if not found:
            rows = options.batch_size  # a whole batch: an accumulating update splits it
            batch = tuple(jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype) for a in (x, y))
            sums = metric_zeros(metrics, outputs_of(update, train, x, y, rows)) if metrics else None
            last = logged_template(jax.eval_shape(lambda s, b: update(s, b)[1], train, batch)) if log else None
            found.append((sums, last))
        return start_carry(train, *found[0], tokens=has_token_axis(y) or options.class_weights is not None)

    return fresh if options.members is None else jax.jit(jax.vmap(fresh))


def _steps(update, options: FitOptions, *, weighted: bool, count: bool, gather: bool) -> Callable:
    """:func:`jaxnet.epoch.make_steps` of ``update`` with the fit's unroll, metrics and step logging."""
    return make_steps(
        update, weighted=weighted, count=count, gather=gather, unroll=options.unroll, metrics=options.metrics,
        log=options.log_every_steps,
    )  # fmt: skip


def _chunk_steps(options: FitOptions, most: int | None, epoch_steps: int | None = None) -> int | None:
    """The steps per chunk: at most ``most`` (or ``chunk_steps``), and dividing every period a chunk
    must end on: ``log_every_steps`` (every logged step ends a chunk) and, for a fit by steps, its
    ``eval_every`` and ``steps`` and the ``epoch_steps`` of an epoch (so that an evaluation falls on
    a chunk's end in every epoch)."""
    most = most or options.chunk_steps
    periods = [options.log_every_steps] + ([options.round_steps, options.steps, epoch_steps] if options.steps else [])
    every = math.gcd(*[p for p in periods if p]) if any(periods) else None
    if every is None:
        return most
    if most is None:
        return every
    return max(d for d in range(1, min(most, every) + 1) if every % d == 0)


def _resident_epochs(update, options: FitOptions, train: tuple, compile: Callable) -> Callable:
    members = options.members
    x, y, *weight = train
    n, b = x.shape[0], options.batch_size
    layout = dict(drop_remainder=options.drop_remainder, shuffle=options.shuffle, unroll=options.unroll)
    layout.update(metrics=options.metrics)
    epoch = make_epoch(
        update, n, b, sample_weights=bool(weight), weighs_classes=options.class_weights is not None, **layout
    )
    steps = num_batches(n, b, options.drop_remainder)
    if members is not None:
        epoch = jax.vmap(epoch, in_axes=(0, None, None, *[None] * len(weight)))
    whole_epoch = compile(epoch)
    chunk = _chunk_steps(options, None, steps)
    if chunk is None:

        def whole(train, position, on_chunk):
            train, metrics = whole_epoch(train, x, y, *weight)
            return train, dict(metrics, steps=steps), None

        return whole
    weighted = steps * b > n or bool(weight)
    # a fit by steps sums each loss times its examples: its rounds end inside epochs
    steps_fn = _steps(update, options, weighted=weighted, count=weighted or bool(options.steps), gather=True)
    if members is not None:  # each member's carry and rows (index, weight); the arrays shared
        steps_fn = jax.vmap(steps_fn, in_axes=(0, None, None, 0, *[0] * weighted))
    run = compile(steps_fn)
    chunks_for = functools.partial(
        feed.resident_chunks, n, _layout(options, chunk, None), sample_weight=weight[0] if weight else None
    )
    fresh = _fresh(update, options, x, y)

    def program(weighted: bool):
        return lambda carry, *arrays: run(carry, x, y, *arrays)

    def chunked(train, position, on_chunk):
        return feed.run_epoch(chunks_for, program, None, train, position, on_chunk, fresh, epoch_order(options))

    return chunked


def _streamed_epochs(update, options: FitOptions, source, mesh, compile: Callable) -> Callable:
    members = options.members
    b = options.batch_size
    if members is not None and source.kind != "indexed":
        raise ValueError(
            "x: each member of a member run reads the data in its own order, which an iterable or a Parquet file "
            "cannot give: use an indexed source (arrays, memory-mapped .npy, a Grain MapDataset) or train the "
            "members one by one"
        )
    if source.kind == "indexed":
        if options.drop_remainder and b > source.num_rows:
            raise ValueError(
                f"batch_size {b} exceeds the {source.num_rows} training examples with drop_remainder: "
                "lower the batch size"
            )
    elif mesh is not None and jax.process_count() > 1:
        raise ValueError(
            "x: a multi-process run reads its share of each batch from an indexed source (arrays, memory-mapped "
            ".npy, a Grain MapDataset); an iterable cannot be split: give every process the same indexed source"
        )
    spec = source.spec if source.kind == "indexed" else source.first_spec()
    # a member run's chunk holds every member's batches: the budget is shared
    per_chunk = b * (members or 1)
    most = feed.chunk_steps(spec, per_chunk, options.chunk_bytes, options.chunk_steps)
    epoch_steps = num_batches(source.num_rows, b, options.drop_remainder) if source.kind == "indexed" else None
    if source.kind != "indexed" and options.steps:  # its epochs may end at any step: every round must too
        epoch_steps = 1
    steps = _chunk_steps(options, most, epoch_steps)
    layout = _layout(options, steps, mesh)
    count = feed.counts_examples(source, layout) or bool(options.steps)

    @functools.cache
    def program(weighted: bool):
        steps_fn = _steps(update, options, weighted=weighted, count=count, gather=False)
        if members is not None:  # the carry and every chunk array have the member axis first
            steps_fn = jax.vmap(steps_fn)
        return compile(steps_fn)

    put = checked_put(feed.placer(mesh), options.check_chunk, "")
    chunks_for = functools.partial(feed.epoch_chunks, source, layout)
    rows = [
        jax.ShapeDtypeStruct((1, *shape), dtype)
        for shape, dtype in ((spec.x_shape, spec.x_dtype), (spec.y_shape, spec.y_dtype))
    ]
    fresh = _fresh(update, options, *rows)

    def streamed(train, position, on_chunk):
        return feed.run_epoch(chunks_for, program, put, train, position, on_chunk, fresh, epoch_order(options))

    return streamed


def checked_put(put: Callable, check: Callable | None, prefix: str) -> Callable:
    """``put`` that first checks a chunk's host arrays (``check(prefix, arrays)``, in the prefetch
    thread: its error is raised in the loop)."""
    if check is None:
        return put

    def put_checked(arrays):
        check(prefix, arrays)
        return put(arrays)

    return put_checked


def eval_batch_size(given: int | None, batch_size: int, rows: int | None) -> int:
    """The validation batch: ``given``, else ``max(batch_size, DEFAULT_EVAL_BATCH)``, at most the rows."""
    size = given if given is not None else max(batch_size, DEFAULT_EVAL_BATCH)
    return max(1, min(size, rows)) if rows else size


def resident_validation(evaluate_chunk, x, y, batch_size: int, members: int | None, place, metrics=()) -> Callable:
    """``validate(params, model_state) -> {"loss", "accuracy"?}`` over resident ``x``, ``y`` in one
    call: a scan over batches of ``batch_size`` that gather their rows (per member with ``members``)."""
    index, weight = place(feed.eval_layout(x.shape[0], batch_size))
    program = evaluate_chunk
    if members is not None:
        program = jax.vmap(program, in_axes=(0, 0, None, None, None, None))
    program = jax.jit(program)

    def validate(params, model_state):
        return feed.means_of(jax.device_get(program(params, model_state, x, y, index, weight)), metrics)

    return validate


def streamed_sums(
    model, spec, source, batch_size: int, chunk_bytes: int, metrics=(), put=jax.device_put, members: int | None = None
):
    """``sums(params, model_state) -> {"loss", "weight", "accuracy"?}``: one pass over ``source``
    in chunks (read ahead in the background), summed on the host in float64 (per member, ``(K,)``,
    with ``members``: every member's params on the same chunks)."""
    chunk = feed.make_eval_chunk(model, spec, gather=False, metrics=metrics)
    if members is not None:
        chunk = jax.vmap(chunk, in_axes=(0, 0, None, None, None))
    run = jax.jit(chunk)
    spec_rows = source.spec if source.kind == "indexed" else source.first_spec()
    steps = feed.chunk_steps(spec_rows, batch_size, chunk_bytes)

    def sums(params, model_state):
        total: dict = {}
        stream = feed.prefetched(feed.source_batches(source, batch_size, steps), put)
        try:
            for chunk in stream:
                part = jax.device_get(run(params, model_state, *chunk.arrays))
                for name, v in part.items():
                    total[name] = total.get(name, 0.0) + np.float64(v)
        finally:
            stream.close()
        return total

    return sums


def step_cost(model, spec, optimizer, options: FitOptions, state, rows, mesh) -> dict:
    """What one training step needs on one device, from XLA's analyses of the compiled step
    (compiled for shapes only: nothing is allocated): ``{"state": the arguments (the train state
    and a batch), "temp": activations and scratch, "output": outputs not aliased to the donated
    state, "total"}`` in bytes, and ``"flops"``: the step's floating-point operations (XLA's cost
    analysis, over all devices of a mesh). ``rows``: ``(x, y)`` of one example's shapes and dtypes."""
    update = _update(model, spec, optimizer, options, mesh)
    batch = [jax.ShapeDtypeStruct((options.batch_size, *r.shape), r.dtype) for r in rows]
    shapes = jax.eval_shape(lambda s: s, state)
    if mesh is not None:
        layout = shardinglib.state_shardings(shapes, mesh, options.sharding)
        shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, layout)
        split = parallel.batch_sharding(mesh)
        batch = [jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=split) for b in batch]
    lowered = jax.jit(update, donate_argnums=(0,)).lower(shapes, tuple(batch))
    analysis = lowered.compile().memory_analysis()
    out = {
        "state": analysis.argument_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "output": max(0, analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
    }
    costs = lowered.cost_analysis()  # before partitioning: the whole step's
    costs = (costs[0] if costs else {}) if isinstance(costs, list) else (costs or {})
    return dict(out, total=sum(out.values()), flops=costs.get("flops"))


def build_programs(model, spec, optimizer, options: FitOptions, mesh, data: Data) -> Programs:
    """The programs of a fit (see the module docstring); ``options`` are fit's arguments."""
    members = options.members
    if mesh is not None and members is not None:
        raise ValueError("member runs train on one device: drop mesh, or train members one by one on the mesh")
    if members is not None and options.logs_steps:
        raise ValueError("log_every_steps: member runs do not log steps: drop log_every_steps")
    update = _update(model, spec, optimizer, options, mesh)
    place, place_state = (lambda tree: tree), (lambda state: state)

    def compile(fn):  # the train state (the first argument) is donated
        return jax.jit(fn, donate_argnums=(0,))

    if mesh is not None:  # data replicated, the state laid out by the sharding rules
        place = functools.partial(parallel.put_replicated, mesh=mesh)

        def place_state(state):
            return shardinglib.put(state, shardinglib.state_shardings(state, mesh, options.sharding))

        def compile(fn):
            jitted = jax.jit(shardinglib.constrain_outputs(fn, mesh, options.sharding), donate_argnums=(0,))
            return shardinglib.placed_inputs(jitted, mesh)

    if isinstance(data.train, tuple):
        train_epoch = _resident_epochs(update, options, place(data.train), compile)
    else:
        train_epoch = _streamed_epochs(update, options, data.train, mesh, compile)
    validate = None
    if data.validation is not None:
        resident = isinstance(data.validation, tuple)
        rows = data.validation[0].shape[0] if resident else getattr(data.validation, "num_rows", None)
        b = eval_batch_size(options.eval_batch_size, options.batch_size, rows)
        metrics = options.metrics
        if resident:
            chunk = feed.make_eval_chunk(model, spec, gather=True, metrics=metrics)
            validate = resident_validation(chunk, *place(data.validation), b, members, place, metrics)
        else:
            put = checked_put(jax.device_put, options.check_chunk, "validation's ")
            sums = streamed_sums(model, spec, data.validation, b, options.chunk_bytes, metrics, put, members)

            def validate(params, model_state):
                return feed.means_of(sums(params, model_state), metrics)

    return Programs(train_epoch, validate, place_state)


def example_shapes(train) -> tuple:
    """``(x, y)`` of one example's shapes and dtypes, of ``train`` an ``(x, y, ...)`` tuple of
    resident arrays or a source."""
    if isinstance(train, tuple):
        return tuple(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in train[:2])
    spec = train.spec if train.kind == "indexed" else train.first_spec()
    return jax.ShapeDtypeStruct(spec.x_shape, spec.x_dtype), jax.ShapeDtypeStruct(spec.y_shape, spec.y_dtype)
