"""Core types: a model is a pair of pure functions; training state is a NamedTuple of pytrees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any
"""A plain pytree of arrays: nested dicts and lists of ``jax.Array``."""

PRNGKey = jax.Array
"""A JAX PRNG key, as made by ``jax.random.key`` or ``jax.random.PRNGKey``."""

Batch = tuple
"""``(x, y)`` or ``(x, y, weights)``: leading axis is the example axis."""


class Model(NamedTuple):
    """A model: ``init(key) -> params`` and ``apply(params, x) -> y`` for one example.

    Both functions are pure. ``apply`` sees a single example (no batch axis);
    use :func:`jaxnet.batched` (``jax.vmap``) for batches.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
      params: the model parameters (a pytree).
      opt_state: the optax optimizer state for ``params``.
      key: the PRNG key threaded through training (shuffling, dropout, noise).
      step: number of updates applied so far, an int32 scalar.
    """

    params: Params
    opt_state: Any
    key: PRNGKey
    step: jax.Array
