"""The hooks :func:`jaxnet.fit` calls on its callbacks, declared once.

A callback is any callable ``cb(fit_state, record)`` (:class:`Callback`, called after every epoch);
it may also have any of the methods below, each one a protocol of its own, which ``fit`` calls
when the callback has it. The ready-made callbacks (:mod:`jaxnet.callbacks`) and loggers
(:mod:`jaxnet.loggers`) name the protocols they implement as their bases; a plain function or an
object of your own needs no base: having the method is enough.

All hooks run on the host, between compiled calls, in the order the callbacks were given. The
``FitState`` a hook receives is valid during the call: its ``train`` arrays are donated to the next
compiled call, so a hook that keeps a state for later copies it first
(``jax.tree.map(jnp.copy, state)``), as :class:`jaxnet.callbacks.Checkpointer` does by saving it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jaxnet.loop import FitState

Record = dict[str, Any]
"""One epoch's figures (``epoch``, ``train_loss``, ``val_loss`` ...; per-member lists in a member
run), or one logged step's (``step``, ``epoch``, ``loss``, ``grad_norm``, ``learning_rate``)."""


@runtime_checkable
class Callback(Protocol):
    """Called after every epoch with the state and the epoch's record; returning True stops the fit
    (after this epoch, whose state is returned).

    The state's arrays are valid while the hook runs, and until the next epoch starts: the
    next epoch takes over (donates) the buffers of ``state.train``, so a callback that keeps a
    state for later copies its arrays, ``kept = jax.tree.map(jnp.copy, state.train)`` (as
    :func:`jaxnet.checkpoint.snapshot` does); ``state.best_params`` and the history are not
    donated. The same holds for every hook below."""

    def __call__(self, state: FitState, record: Record) -> bool | None: ...


@runtime_checkable
class OnRunStart(Protocol):
    def on_run_start(self, state: FitState) -> None:
        """Called once before the first epoch (with a resumed run's state when resuming)."""


@runtime_checkable
class OnRunEnd(Protocol):
    def on_run_end(self, state: FitState) -> None:
        """Called once when the loop ends without an error (the last epoch, early stopping, or a
        callback's stop), with the final state."""


@runtime_checkable
class OnRunFailure(Protocol):
    def on_run_failure(self, state: FitState, error: BaseException) -> None:
        """Called once when the loop stops with an error (a non-finite loss, KeyboardInterrupt),
        with the last state the loop completed, before the error propagates: finish what is under
        way (the :class:`jaxnet.callbacks.Checkpointer` waits for its write in flight)."""


@runtime_checkable
class OnChunk(Protocol):
    def on_chunk(self, state: FitState) -> bool | None:
        """Called between two compiled chunks of an epoch (streamed data, or ``chunk_steps``),
        with the state inside the epoch (``state.position`` says where); True stops the fit there,
        and ``resume`` continues the epoch exactly."""


@runtime_checkable
class OnStep(Protocol):
    def on_step(self, state: FitState, record: Record) -> None:
        """Called for every ``log_every_steps``-th step with that step's record (``step``,
        ``epoch``, ``loss``, ``grad_norm``, ``learning_rate``)."""


def bound(callbacks, hook: type) -> list:
    """The ``hook`` methods (one protocol's single method) of the ``callbacks`` that have it."""
    (name,) = (n for n in vars(hook) if n.startswith("on_"))
    return [getattr(cb, name) for cb in callbacks if isinstance(cb, hook)]
