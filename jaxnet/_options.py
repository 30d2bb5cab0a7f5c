"""The options of one :func:`jaxnet.fit`, checked once and read by its loop and its programs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxnet._feed import CHUNK_BYTES
from jaxnet.hooks import Callback
from jaxnet.metrics import Metric


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class FitOptions:
    """What a fit does besides its model, loss, optimizer and data: :func:`jaxnet.fit`'s keyword
    arguments after their checks (each field's meaning is that argument's; see its docstring).

    The loop reads the bookkeeping (``epochs``, or ``steps`` and ``eval_every`` for a fit by
    steps, whose rounds of ``eval_every`` steps take the place of epochs; ``patience``,
    ``monitor``, ``callbacks``);
    the programs (``jaxnet._programs``) read how steps are made and fed. ``members`` is K for a
    member run, None for a single one; ``class_weights`` the ``(C,)`` weights of the classes, or
    None; ``check_chunk(prefix, arrays)`` checks each streamed chunk's host arrays as it is read
    (``prefix`` "" or "validation's "), or is None. Axis letters: :mod:`jaxnet.base`.
    """

    epochs: int | None
    batch_size: int
    steps: int | None = None
    eval_every: int | None = None
    members: int | None = None
    patience: int | None = None
    monitor: str = "val_loss"
    callbacks: tuple[Callback, ...] = ()
    drop_remainder: bool = False
    shuffle: bool = True
    unroll: int = 1
    compute_dtype: Any = None
    skip_nonfinite: bool = False
    per_example_grads: bool = False
    chunk_steps: int | None = None
    chunk_bytes: int = CHUNK_BYTES
    shuffle_buffer: int = 0
    eval_batch_size: int | None = None
    metrics: tuple[Metric, ...] = ()
    log_every_steps: int | None = None
    class_weights: jax.Array | None = None
    sharding: Any = None
    accumulate: int = 1
    device_invariant: int | None = None
    flops_per_step: float | None = None
    peak_flops: float | None = None
    check_chunk: Callable[[str, tuple], None] | None = None

    @property
    def round_steps(self) -> int | None:
        """A fit by steps: the steps between two evaluations (``eval_every``, else all ``steps``)."""
        return (self.eval_every or self.steps) if self.steps else None

    @property
    def logs_steps(self) -> bool:
        """Whether steps are logged (``log_every_steps`` given): the update then returns each
        step's loss, gradient norm and learning rate."""
        return self.log_every_steps is not None
