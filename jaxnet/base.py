"""Core types: a model is a pair of pure functions; training state is a NamedTuple of pytrees.

The model contract (``docs/models.md``): a plain :class:`Model` is ``init(key) -> params`` and
``apply(params, x) -> y`` for one example. A :class:`StatefulModel` is ``init(key) -> (params,
state)`` and ``apply(params, state, x, ctx) -> (y, state)``: its apply also gets a
:class:`Context` (train or eval mode, a PRNG key, the example's weight and the batch axis) and
may carry non-trainable state (running statistics) that it returns updated.

Shapes in jaxnet's docstrings use one legend of axis letters, the way nanoGPT writes
``(B, T, C)``; a docstring writes ``(b, ...)`` and points here:

======  ==================================================================================
letter  axis
======  ==================================================================================
``K``   members: models trained together under ``vmap`` (ensembles, sweeps)
``n``   examples (rows) of a whole data set or split
``b``   examples of one batch (``batch_size``)
``nb``  batches of an epoch (``ceil(n / b)``, or ``n // b`` with ``drop_remainder``)
``S``   steps of one compiled chunk (``S`` batches stacked: ``(S, b, ...)``)
``T``   tokens (positions) of one sequence
``V``   vocabulary: token ids, and the logits over them
``C``   classes, or a layer's channels / features (``in_dim``, ``out_dim`` where both occur)
``d``   features of one example (a table's encoded columns)
``...`` the example's own shape (``x.shape[1:]``)
======  ==================================================================================

Single-example shapes (what ``apply`` sees) drop the leading ``K``, ``n`` and ``b``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
"""A plain pytree of arrays: nested dicts and lists of ``jax.Array``."""

PRNGKey = jax.Array
"""A JAX PRNG key, as made by ``jax.random.key`` or ``jax.random.PRNGKey``."""

Batch = tuple
"""``(x, y)`` or ``(x, y, weights)``: leading axis is the example axis."""

BATCH_AXIS = "batch"
"""The name of the batch axis that jaxnet's ``vmap`` over examples binds (as in Equinox's docs)."""


class Model(NamedTuple):
    """A model: ``init(key) -> params`` and ``apply(params, x) -> y`` for one example.

    Both functions are pure. ``apply`` sees a single example (no batch axis);
    use :func:`jaxnet.batched` (``jax.vmap``) for batches.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


class Context(NamedTuple):
    """What a :class:`StatefulModel`'s ``apply`` gets besides params, state and the input.

    Attributes:
      train: True in a training step, False in evaluation and prediction (a Python bool).
      key: this example's PRNG key in a training step (distinct per example and step); None in
        eval mode, where nothing may be random.
      weight: this example's weight, a scalar: 0.0 for the padding of a final partial batch.
      axis_name: the batch axis bound by jaxnet's ``vmap`` (:data:`BATCH_AXIS`), or None when the
        example is applied alone (per-example gradients, a direct call).
    """

    train: bool
    key: PRNGKey | None = None
    weight: jax.Array | float = 1.0
    axis_name: str | None = None

    def mean(self, value: jax.Array) -> jax.Array:
        """The weighted mean of ``value`` over the batch (padding excluded); same shape as ``value``.

        Raises:
          ValueError: there is no batch axis (a batch statistic of one example means nothing).
        """
        if self.axis_name is None:
            raise ValueError(
                "this model computes statistics over the batch (e.g. batch_norm), which needs the whole batch: "
                "apply it through jaxnet (fit, apply_batch), not one example alone or with per-example gradients"
            )
        total = jax.lax.psum(self.weight, self.axis_name)
        return jax.lax.psum(value * self.weight, self.axis_name) / jnp.maximum(total, 1e-12)

    def fold(self, data: int) -> Context:
        """This context with its key (if any) folded with ``data``: a distinct stream per sub-layer."""
        return self if self.key is None else self._replace(key=jax.random.fold_in(self.key, data))


class StatefulModel(NamedTuple):
    """A model whose apply takes a :class:`Context` and carries non-trainable state.

    ``init(key) -> (params, state)`` and ``apply(params, state, x, ctx) -> (y, state)``, both pure;
    ``state`` is a plain pytree (``{}`` when there is none, e.g. a model that only needs dropout)
    that the optimizer never touches. ``apply`` sees one example, like :class:`Model`'s, unless
    ``batched``: then it gets the whole batch ``(b, ...)`` and ``ctx`` holds one key for the batch
    and ``(b,)`` weights (the form of modules written for batches, e.g. from Flax or Haiku).

    ``batch_statistics``: ``apply`` takes statistics over the batch that it cannot weigh by
    ``ctx.weight`` (a library's batch norm, e.g. ``eqx.nn.BatchNorm``), so the padding of a final
    partial batch would count in them: ``fit`` refuses such a batch unless ``drop_remainder``. A
    ``batched`` model with state is taken to be one. (jaxnet's own :func:`jaxnet.batch_norm`
    weighs by ``ctx.mean`` and needs neither.)
    """

    init: Callable[[PRNGKey], tuple[Params, Any]]
    apply: Callable[[Params, Any, jax.Array, Context], tuple[jax.Array, Any]]
    batched: bool = False
    batch_statistics: bool = False


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
      params: the model parameters (a pytree).
      opt_state: the optax optimizer state for ``params``.
      key: the PRNG key threaded through training (shuffling, dropout, noise).
      step: number of updates applied so far, an int32 scalar.
      model_state: a :class:`StatefulModel`'s state (running statistics), None for a plain model.
    """

    params: Params
    opt_state: Any
    key: PRNGKey
    step: jax.Array
    model_state: Any = None


def path_name(path) -> str:
    """A pytree path as ``blocks/attn/q/w`` (list indices as numbers: ``layers/0/w``)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
