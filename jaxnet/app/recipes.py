"""Training recipes from optax, by name: optimizers, learning-rate schedules, warmup, clipping,
gradient accumulation.

:func:`optimizer` builds what a run's config describes, all from optax:

- the base optimizer ``optax.<name>`` (:data:`OPTIMIZERS`), with ``momentum``/``nesterov`` where it
  has them; weight decay decoupled for optimizers that take ``weight_decay`` (``adamw``, ``lion``,
  ``lamb`` ...), else an L2 term added to the gradient (``optax.add_decayed_weights``, PyTorch's
  ``weight_decay``);
- the learning rate ``lr * scale(step)``, ``scale`` from :func:`lr_scale` (constant, cosine,
  linear, exponential, one-cycle; optional linear warmup), both injected
  (``optax.inject_hyperparams``) so that member runs sweep ``learning_rate`` and logged steps read
  the rate applied (``learning_rate * lr_scale`` in the state's hyperparameters);
- ``optax.clip_by_global_norm`` first, and ``optax.MultiSteps`` around it all for accumulation.
"""

from __future__ import annotations

import inspect

import optax

OPTIMIZERS = (
    "sgd",
    "adam",
    "adamw",
    "lion",
    "lamb",
    "rmsprop",
    "adafactor",
    "adagrad",
    "adamax",
    "adamaxw",
    "nadam",
    "nadamw",
    "radam",
    "novograd",
    "lars",
    "yogi",
    "adabelief",
    "amsgrad",
    "adan",
    "sm3",
)
"""Optimizers by name: ``optax.<name>(learning_rate, ...)``."""

SCHEDULES = ("constant", "cosine", "linear", "exponential", "onecycle")
"""Learning-rate schedules: the rate's shape over the run's optimizer steps."""

EXPONENTIAL_END = 0.01
"""``exponential`` decays the rate to this fraction of ``lr`` at the run's last step."""


def _parameters(name: str) -> set[str]:
    return set(inspect.signature(getattr(optax, name)).parameters)


def takes(name: str, parameter: str) -> bool:
    """Whether ``optax.<name>`` takes ``parameter`` (``momentum``, ``nesterov``, ``weight_decay``)."""
    return parameter in _parameters(name)


def lr_scale(schedule: str, total_steps: int, warmup: int = 0):
    """``scale(count) -> factor`` of the learning rate over ``total_steps`` optimizer steps: a linear
    warmup from 0 over ``warmup`` steps, then ``schedule`` over the rest (1 at its start)."""
    rest = max(total_steps - warmup, 1)
    shapes = {
        "constant": lambda: optax.constant_schedule(1.0),
        "cosine": lambda: optax.cosine_decay_schedule(1.0, rest),
        "linear": lambda: optax.linear_schedule(1.0, 0.0, rest),
        "exponential": lambda: optax.exponential_decay(1.0, rest, EXPONENTIAL_END),
        "onecycle": lambda: optax.cosine_onecycle_schedule(max(total_steps, 1), 1.0),
    }
    if schedule not in shapes:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    main = shapes[schedule]()
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), main], [warmup])


def base_factory(name: str, *, decay: bool, momentum: float | None = None, nesterov: bool = False):
    """``make(learning_rate, lr_scale=1.0, weight_decay=0.0) -> optax optimizer`` for ``name``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    base = getattr(optax, name)
    options = {}
    if momentum is not None:
        options["momentum"] = momentum
    if nesterov:
        options["nesterov"] = True
    decoupled = takes(name, "weight_decay")

    def make(learning_rate, lr_scale=1.0, weight_decay=0.0):
        rate = learning_rate * lr_scale
        if decoupled:  # always given: lion's own default would decay a config that says 0
            return base(rate, weight_decay=weight_decay, **options)
        if not decay:
            return base(rate, **options)
        return optax.chain(optax.add_decayed_weights(weight_decay), base(rate, **options))

    return make


def optimizer(
    name: str,
    hyperparams: dict,
    *,
    schedule: str = "constant",
    total_steps: int = 1,
    warmup: int = 0,
    momentum: float | None = None,
    nesterov: bool = False,
    clip_norm: float | None = None,
    grad_accum: int = 1,
) -> optax.GradientTransformation:
    """The optax optimizer of a recipe (see the module docstring).

    Args:
      name: a name in :data:`OPTIMIZERS`.
      hyperparams: ``{"learning_rate": lr[, "weight_decay": wd]}``, injected (the first member's
        values; a member run sets the others in the state).
      schedule, total_steps, warmup: the rate's shape over the optimizer steps (:func:`lr_scale`).
      momentum, nesterov: for optimizers that take them (sgd, rmsprop, sm3 ...).
      clip_norm: clip the gradients' global L2 norm to this first (None: no clipping).
      grad_accum: apply one update per this many batches, of their mean gradient.
    """
    make = base_factory(name, decay="weight_decay" in hyperparams, momentum=momentum, nesterov=nesterov)
    scale = lr_scale(schedule, total_steps, warmup)
    tx = optax.inject_hyperparams(make)(lr_scale=scale, **hyperparams)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()
    return tx
