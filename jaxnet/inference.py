"""Batched evaluation and prediction of a model and its params, on any data ``fit`` takes.

:func:`evaluate` and :func:`predict` run in compiled batches of ``batch_size`` examples (the last
padded, so one program serves them all) over resident arrays, memory-mapped arrays, lazy rows,
Grain datasets or iterables of batches (:mod:`jaxnet.sources`); memory is bounded by a chunk of
batches, not by the data. ``fit``'s validation is the same computation.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxnet import _feed as feed
from jaxnet import _programs as programs
from jaxnet import _weights as weights
from jaxnet import sources
from jaxnet.forward import AnyModel, apply_batch, check_model_state, check_params
from jaxnet.losses import LossSpec, PerExample, get_loss
from jaxnet.metrics import get_metrics

DEFAULT_BATCH = 1024


def _checked(model, batch_size, params, model_state) -> int:
    """``batch_size``, after the model, its state and its params (one model's: take a member run's
    apart with :func:`jaxnet.take_member`) are checked."""
    check_model_state(model, model_state)
    check_params(model, params)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def evaluate(
    model: AnyModel,
    params,
    x,
    y=None,
    *,
    loss: str | PerExample | LossSpec,
    batch_size: int = DEFAULT_BATCH,
    model_state: Any = None,
    chunk_bytes: int = feed.CHUNK_BYTES,
    metrics=None,
) -> dict[str, float]:
    """The weighted mean ``loss`` (and ``accuracy`` for classification losses) over every example.

    Args:
      model, params: the model and its params (``model_state`` too for a stateful model; eval mode).
      x, y: ``(n, ...)`` arrays (resident or memory-mapped), or ``x`` a data source or an
        iterable of ``(x, y)`` batches with ``y`` None.
      loss: the loss (name, per-example callable or :class:`jaxnet.LossSpec`).
      batch_size: examples per compiled step.
      chunk_bytes: the bytes of a chunk of batches read ahead from a streamed source.
      metrics: named metrics (:mod:`jaxnet.metrics`: ``"f1"``, ``"top_5_accuracy"``, ``"r2"``, a
        per-example callable), summed over every batch on the device.

    Returns:
      ``{"loss": float, "accuracy": float?, <metric>: float ...}``.
    """
    batch_size = _checked(model, batch_size, params, model_state)
    spec, named = get_loss(loss), get_metrics(metrics)
    source = sources.as_source(x, y, "x", once=True)
    if source is None:
        rows = len(x)
        if rows == 0:
            raise ValueError("x has no examples: give at least one")
        if len(y) != rows:
            raise ValueError(f"x has {rows} examples but y has {len(y)}: give as many targets as inputs")
        if spec.name == "softmax_cross_entropy":
            outputs = weights.output_shape(model, params, model_state, jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype))
            weights.check_class_targets("y", y, outputs)
        chunk = feed.make_eval_chunk(model, spec, gather=True, metrics=named)
        validate = programs.resident_validation(chunk, x, y, min(batch_size, rows), None, lambda t: t, named)
        return {name: float(v) for name, v in validate(params, model_state).items()}
    sources.require_targets(source, "x")
    row, target = programs.example_shapes(source)
    outputs = weights.output_shape(model, params, model_state, row) if spec.name == "softmax_cross_entropy" else None
    check = weights.chunk_check(spec, model, outputs, row, target)
    put = programs.checked_put(jax.device_put, check, "")
    sums = programs.streamed_sums(model, spec, source, batch_size, chunk_bytes, named, put)
    return {name: float(v) for name, v in feed.means_of(sums(params, model_state), named).items()}


def _inputs(x, batch_size: int) -> Iterator[np.ndarray]:
    """The inputs of ``x`` in order, in blocks of any size."""
    source = x if isinstance(x, (sources.Indexed, sources.GrainMap, sources.Sequential)) else None
    if source is None:
        source = sources.as_source(x, None, "x", once=True)
    if source.kind == "indexed":
        for start in range(0, source.num_rows, batch_size):
            yield source.read(np.arange(start, min(start + batch_size, source.num_rows)))[0]
    elif isinstance(source, sources.Parquet):
        yield from (block for block, _ in source.blocks(0, shuffle=False))  # the file's order
    else:  # an iterable of input batches, or of (x, y) pairs (or {"x", "y"} dicts) whose y is ignored
        yield from source.inputs()


def _blocks(x, batch_size: int) -> Iterator[np.ndarray]:
    """Inputs in order, in blocks of exactly ``batch_size`` rows (the last may be shorter)."""
    if hasattr(x, "shape") and hasattr(x, "__getitem__"):
        for start in range(0, len(x), batch_size):
            yield np.asarray(x[start : start + batch_size])
        return
    for block, _ in sources.batches_of(((b, b) for b in _inputs(x, batch_size)), batch_size, 0, 0):
        yield block


def predict_batches(
    model: AnyModel, params, x, *, batch_size: int = DEFAULT_BATCH, model_state: Any = None
) -> Iterator[np.ndarray]:
    """:func:`predict`, one ``(m, ...)`` numpy array per batch of at most ``batch_size`` rows (for
    outputs too large to hold: write each away)."""
    batch_size = _checked(model, batch_size, params, model_state)
    run = jax.jit(lambda p, s, xs: apply_batch(model, p, s, xs)[0])
    pending = None  # one batch in flight: the next is read while the device computes
    for block in _blocks(x, batch_size):
        current = (run(params, model_state, sources.padded_rows(block, batch_size)), len(block))
        if pending is not None:
            yield np.asarray(pending[0])[: pending[1]]
        pending = current
    if pending is not None:
        yield np.asarray(pending[0])[: pending[1]]


def predict(model: AnyModel, params, x, *, batch_size: int = DEFAULT_BATCH, model_state: Any = None) -> np.ndarray:
    """The model's raw outputs ``(n, ...)`` on every example of ``x`` (arrays, memory-mapped arrays,
    lazy rows, a Grain dataset or an iterable of batches), in eval mode, ``batch_size`` per call."""
    parts = list(predict_batches(model, params, x, batch_size=batch_size, model_state=model_state))
    if not parts:
        raise ValueError("x has no examples")
    return np.concatenate(parts)
