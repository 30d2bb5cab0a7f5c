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


def lr_scale(schedule: str, total_steps: int, warmup: int = 0, floor: bool = False):
    """``scale(count) -> factor`` of the learning rate over ``total_steps`` optimizer steps: a linear
    warmup from 0 over ``warmup`` steps, then ``schedule`` over the rest (1 at its start). With
    ``floor``, the weight of the schedule's floor instead: ``warmup * (1 - schedule)``, so that
    ``lr * scale + min_lr * floor`` decays from ``lr`` to ``min_lr`` (nanoGPT's cosine)."""
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
    if floor:
        decay = main
        main = lambda count: 1.0 - decay(count)  # noqa: E731  (a schedule is a function of the count)
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, 1.0, warmup)
    if floor:  # no floor while warming up
        return optax.join_schedules([optax.constant_schedule(0.0), main], [warmup])
    return optax.join_schedules([ramp, main], [warmup])


def base_factory(
    name: str,
    *,
    decay: bool,
    momentum: float | None = None,
    nesterov: bool = False,
    min_lr: float = 0.0,
    beta2: float | None = None,
    decay_mask=None,
):
    """``make(learning_rate, lr_scale=1.0, weight_decay=0.0) -> optax optimizer`` for ``name``, the
    rate ``learning_rate * lr_scale``; with ``min_lr``, ``make(..., floor_scale=0.0)`` whose rate is
    ``learning_rate * lr_scale + min_lr * floor_scale``; ``beta2`` for the
    optimizers with a second moment; ``decay_mask`` (a pytree of bools, or a function of the params
    returning one) selects the leaves weight decay applies to."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    base = getattr(optax, name)
    options = {}
    if momentum is not None:
        options["momentum"] = momentum
    if nesterov:
        options["nesterov"] = True
    if beta2 is not None:
        options["b2"] = beta2
    decoupled = takes(name, "weight_decay")
    if decay_mask is not None and decoupled:
        options["mask"] = decay_mask

    def build(rate, weight_decay):
        if decoupled:  # always given: lion's own default would decay a config that says 0
            return base(rate, weight_decay=weight_decay, **options)
        if not decay:
            return base(rate, **options)
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base(rate, **options))

    def make(learning_rate, lr_scale=1.0, weight_decay=0.0):
        return build(learning_rate * lr_scale, weight_decay)

    def make_with_floor(learning_rate, lr_scale=1.0, weight_decay=0.0, floor_scale=0.0):
        return build(learning_rate * lr_scale + min_lr * floor_scale, weight_decay)

    # (a floor is a hyperparameter of its own in the optimizer state: only runs that have one carry it)
    return make_with_floor if min_lr else make


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
    min_lr: float = 0.0,
    beta2: float | None = None,
    decay_mask=None,
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
      min_lr, beta2, decay_mask: as in :func:`base_factory` (``min_lr``: the floor a decaying
        schedule ends at).
    """
    make = base_factory(
        name, decay="weight_decay" in hyperparams, momentum=momentum, nesterov=nesterov, min_lr=min_lr, beta2=beta2,
        decay_mask=decay_mask,
    )  # fmt: skip
    scale = lr_scale(schedule, total_steps, warmup)
    floor = {"floor_scale": lr_scale(schedule, total_steps, warmup, floor=True)} if min_lr else {}
    tx = optax.inject_hyperparams(make)(lr_scale=scale, **floor, **hyperparams)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum).gradient_transformation()
    return tx
