"""Callbacks for :func:`jaxnet.fit`: checkpoints on a schedule, signals, progress.

A callback is called after every epoch as ``callback(fit_state, record)`` and stops training by
returning True; it may also define ``on_run_start(fit_state)`` and ``on_run_end(fit_state)``
(the latter runs when the loop ends without an error: all epochs done, early stopping, or a
callback's stop). The same callbacks serve single and member runs.
"""

from __future__ import annotations

import _thread
import concurrent.futures
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxnet import _checks as checks
from jaxnet import checkpoint
from jaxnet._progress import Progress  # noqa: F401  (a callback of this family)
from jaxnet.hooks import OnChunk, OnRunEnd, OnRunFailure, OnRunStart, Record
from jaxnet.loop import FitState


class Checkpointer(OnRunStart, OnChunk, OnRunEnd, OnRunFailure):
    """Saves the fit state into ``directory`` every ``every`` epochs, every ``every_steps`` steps,
    and when the run ends.

    Args:
      directory: the checkpoint folder (see :func:`jaxnet.checkpoint.save`).
      every: save after every ``every``-th epoch (None: only at the end of the run).
      keep: keep the newest ``keep`` checkpoints (None: all).
      metadata: JSON metadata saved with every checkpoint (e.g. the run's config).
      every_steps: also save inside epochs, at the first chunk boundary after every
        ``every_steps`` optimizer steps (the position in the data included: a resume continues
        the epoch exactly). Needs epochs in chunks: streamed data, or ``fit(chunk_steps=...)``
        (``fit`` refuses it otherwise). Chunks are cut within each epoch, saves are due by the
        run's steps: 10-step epochs in chunks of 3 end chunks at steps 3, 6, 9, 10, 13, ...;
        ``every_steps=3`` saves at 3, 6, 9, 13, 16, 19 (no multiple of 3 passed between 9 and 10)
        and at the run's end. ``every=1`` adds each epoch's end.
      asynchronous: training goes on while a checkpoint is written: the state is copied to the
        host (:func:`jaxnet.checkpoint.snapshot`), then written by a background thread. At most
        one write is in flight (the next save waits for it); the run's end waits for the last.
        A failed write (a full disk) is raised by the next save or at the run's end. A process
        killed during a write leaves the checkpoints before it usable, as with synchronous saves.
        A multi-process run saves synchronously: orbax's writes of all processes meet at
        barriers, which a background thread would interleave with the training's own.

    Examples:
      >>> saver = Checkpointer("/tmp/run/checkpoints", every=5)  # doctest: +SKIP
      >>> fit(..., callbacks=[saver])                            # doctest: +SKIP
    """

    def __init__(
        self,
        directory,
        *,
        every: int | None = None,
        keep: int | None = 3,
        metadata: dict | None = None,
        every_steps: int | None = None,
        asynchronous: bool = True,
    ):
        self.directory = Path(directory)
        self.asynchronous = checks.boolean("asynchronous", asynchronous)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self.every = checks.optional_integer("every", every)
        self.keep = checks.optional_integer("keep", keep)
        self.every_steps = checks.optional_integer("every_steps", every_steps)
        self.metadata = dict(metadata or {})
        self.saved_steps: int | None = None
        self.last: FitState | None = None

    def on_run_start(self, state: FitState) -> None:
        resumed = state.epoch or state.position is not None
        self.saved_steps = state.steps if resumed else None  # a resumed state is saved already

    def __call__(self, state: FitState, record: Record) -> None:
        self.last = state
        if self.every is not None and state.epoch % self.every == 0:
            self.save(state)
        elif self._step_due(state):
            self.save(state)

    def on_chunk(self, state: FitState) -> None:
        self.last = state
        if self._step_due(state) and bool(np.isfinite(np.asarray(state.position.total)).any()):
            self.save(state)  # (never once the epoch's loss (every member's) went non-finite: the last good one stays)

    def _step_due(self, state: FitState) -> bool:
        if self.every_steps is None:
            return False
        return state.steps // self.every_steps > (self.saved_steps or 0) // self.every_steps

    def on_run_end(self, state: FitState) -> None:
        if (state.epoch or state.position is not None) and state.steps != self.saved_steps:
            self.save(state)
        try:
            self.wait()
        finally:
            self._close()

    def on_run_failure(self, state: FitState, error: BaseException) -> None:
        """The run failed: the write in flight finishes (an error of its own is left to the run's),
        so that the checkpoints on disk are final when the error reaches the caller."""
        try:
            self.wait()
        except Exception:
            pass  # the older checkpoints are intact; the run's own error is the one to report
        finally:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None

    def save(self, state: FitState) -> Path:
        """Saves the checkpoint of ``state`` (written in the background when ``asynchronous``:
        :meth:`wait` for it); returns its folder."""
        snap = checkpoint.snapshot(state, self.metadata)
        self.wait()  # at most one write in flight; raises the last one's error
        if self.asynchronous and jax.process_count() == 1:  # orbax's writes of many processes meet at barriers
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxnet-checkpoint")
            self._pending = self._writer.submit(checkpoint.write, self.directory, snap, keep=self.keep)
            path = self.directory.absolute() / str(snap.steps)
        else:
            path = checkpoint.write(self.directory, snap, keep=self.keep)
        self.saved_steps = state.steps
        return path

    def wait(self) -> None:
        """Waits for the write in flight, if any; raises its error (an OSError naming the checkpoint)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


class Interrupt(OnChunk):
    """Turns SIGINT/SIGTERM into a stop at the next epoch boundary (or chunk boundary of an epoch in chunks).

    Use as a context manager around training; the first signal sets ``signum``, calls
    ``notify(message)`` and makes the callback return True (stop). A second SIGINT raises
    KeyboardInterrupt at once (a second SIGTERM terminates): checkpoints are finalized
    atomically, so nothing is corrupted. A KeyboardInterrupt that lands where Python cannot raise
    it (a garbage-collection callback, a ``__del__``), which Python would print as ``Exception
    ignored in ...`` and drop, is delivered again a moment later instead, where it can be raised.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notify: Callable[[str], None] | None = None):
        self.signum: int | None = None
        self.notify = notify
        self._previous: dict = {}
        self._again: threading.Timer | None = None

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        if self.notify is not None:
            name = signal.Signals(signum).name
            self.notify(f"stopping at the end of this epoch, or of this chunk of steps ({name}; again to quit at once)")

    def __enter__(self) -> Interrupt:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = self._hook
        if self._again is not None:
            self._again.cancel()

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._hook(unraisable)
            return
        if self._again is None or not self._again.is_alive():  # one at a time: it is the same interrupt
            self._again = threading.Timer(0.05, _thread.interrupt_main)  # raised in the main thread
            self._again.daemon = True
            self._again.start()

    def __call__(self, state, record) -> bool:
        return self._stop()

    def on_chunk(self, state) -> bool:
        """Stops a long (streamed) epoch at the next chunk boundary too."""
        return self._stop()

    def _stop(self) -> bool:
        if jax.process_count() > 1:  # all processes stop at the same boundary, with the signal one got
            signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
            self.signum = int(np.max(signums)) or None
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(self.signum or 0)
