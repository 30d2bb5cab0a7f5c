"""A JAX profiler trace of a few training steps, for TensorBoard's profile plugin.

The training loop runs whole epochs as single compiled calls, whose trace shows one long program;
:func:`trace_steps` instead traces a few calls of the jitted update step on the first batches, each
marked as a step (``jax.profiler.StepTraceAnnotation``), after one untraced call that compiles.
Open the result with ``tensorboard --logdir DIR`` (the profile plugin, ``pip install
tensorboard-plugin-profile``) or Perfetto.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax

STEPS = 5
"""Steps traced by default."""


def trace_steps(step: Callable, state, batches: Iterable, logdir, steps: int = STEPS) -> Path:
    """Traces ``steps`` calls of ``step(state, batch) -> (state, metrics)`` into ``logdir``.

    Args:
      step: a jitted update (:func:`jaxnet.make_train_step`); the first call, untraced, compiles it.
      state: the train state to start from (donated by a donating step).
      batches: at least ``steps + 1`` batches (reused cyclically when fewer).
      logdir: the trace folder (``plugins/profile/<run>/*.xplane.pb`` is written under it).
      steps: the number of traced steps.

    Returns:
      ``logdir``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: give at least one batch to trace")
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(logdir)):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = step(state, batches[(i + 1) % len(batches)])
                jax.block_until_ready(metrics)
    return logdir
