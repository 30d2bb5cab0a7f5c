"""Losses and metrics: per-example functions, and their weighted batch means.

A per-example loss maps ``(prediction, target) -> scalar`` for one example; :func:`batch_mean`
turns it into a function of whole batches with optional per-example weights (the weights mask
padding in a final partial batch). Integer targets with a token axis ``(b, T)`` make each token a
term: a per-token loss (``softmax_cross_entropy`` on logits ``(b, T, V)``) is averaged over the real
tokens of the whole batch, and targets equal to :data:`IGNORE_INDEX` (padding) count nowhere.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

PerExample = Callable[[jax.Array, jax.Array], jax.Array]


def half_sum_squares(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """``1/2 * sum((y - t)**2)`` over the outputs of one example (the worked example's L).

    Args:
      prediction: ``(out,)`` network output.
      target: ``(out,)`` target.

    Examples:
      >>> float(half_sum_squares(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])))
      2.5
    """
    return 0.5 * jnp.sum((prediction - target) ** 2)


def mean_squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """``mean((y - t)**2)`` over the outputs of one example; shapes ``(out,)`` or scalars."""
    return jnp.mean((prediction - target) ** 2)


def softmax_cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Cross-entropy of softmax(logits) against an integer class label.

    Args:
      logits: ``(classes,)`` unnormalized scores.
      label: scalar int in ``[0, classes)`` (another gives NaN: never a wrapped, clamped class).
    """
    label = jnp.asarray(label, jnp.int32)
    inside = (label >= 0) & (label < jnp.shape(logits)[-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(inside, label, 0))
    return jnp.where(inside, loss, jnp.nan)


def sigmoid_binary_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Binary cross-entropy of sigmoid(logits) against targets in {0, 1}, averaged over outputs.

    Args:
      logits: ``(out,)`` or scalar.
      target: same shape as ``logits``, values in [0, 1].
    """
    target = jnp.reshape(target, jnp.shape(logits)).astype(logits.dtype)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))


def accuracy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """1.0 if ``argmax(logits) == label`` else 0.0, for one example."""
    return (jnp.argmax(logits, axis=-1) == label).astype(jnp.float32)


def binary_accuracy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Fraction of outputs whose sign (logit > 0) matches a {0, 1} target, for one example."""
    target = jnp.reshape(target, jnp.shape(logits))
    return jnp.mean(((logits > 0) == (target > 0.5)).astype(jnp.float32))


class LossSpec(NamedTuple):
    """A named loss: the per-example function, its accuracy metric (None for regression),
    and whether targets are integer class labels."""

    name: str
    fn: PerExample
    metric: PerExample | None
    integer_labels: bool


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("half_sse", half_sum_squares, None, False),
        LossSpec("mse", mean_squared_error, None, False),
        LossSpec("softmax_cross_entropy", softmax_cross_entropy, accuracy, True),
        LossSpec("sigmoid_binary_cross_entropy", sigmoid_binary_cross_entropy, binary_accuracy, False),
    )
}
"""Losses by name."""

ALIASES = {"sse": "half_sse", "cross_entropy": "softmax_cross_entropy", "bce": "sigmoid_binary_cross_entropy"}


def get_loss(loss: str | PerExample | LossSpec) -> LossSpec:
    """Resolves a loss name (see ``LOSSES``; aliases ``sse``, ``cross_entropy``, ``bce``), a
    per-example callable (no accuracy metric) or a :class:`LossSpec`."""
    if isinstance(loss, LossSpec):
        return loss
    if isinstance(loss, str):
        name = ALIASES.get(loss, loss)
        if name in LOSSES:
            return LOSSES[name]
        names = sorted(LOSSES) + sorted(ALIASES)
        raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(names)}")
    if callable(loss):
        return LossSpec(getattr(loss, "__name__", "custom"), loss, None, False)
    raise TypeError(f"loss must be a name or a callable (prediction, target) -> scalar, got {loss!r}")


IGNORE_INDEX = -100
"""A target token with this id counts nowhere: not in the loss, its mean or any metric (padding).
PyTorch's ``CrossEntropyLoss`` and Hugging Face use the same value."""


def has_token_axis(targets) -> bool:
    """Whether batched ``targets`` (an array or ``jax.ShapeDtypeStruct``, ``(b, ...)``) are integer
    labels with a sequence axis, ``(b, T)``: each token is a term of the loss and the metrics, the
    :data:`IGNORE_INDEX` tokens masked out."""
    return len(targets.shape) >= 2 and jnp.issubdtype(targets.dtype, jnp.integer)


def token_weights(targets: jax.Array, weights: jax.Array | None, values_shape) -> jax.Array:
    """The weight of each term ``(b, *r)`` of a batch's per-example values: the example's weight
    (``weights`` ``(b,)``, or per-token ``(b, T)``; None: 1), times 0 for an :data:`IGNORE_INDEX`
    target when the values have the targets' shape (one value per token)."""
    w = jnp.ones(values_shape[:1], jnp.float32) if weights is None else weights
    w = jnp.reshape(w, w.shape + (1,) * (len(values_shape) - w.ndim))
    if has_token_axis(targets) and tuple(targets.shape) == tuple(values_shape):
        w = w * (targets != IGNORE_INDEX)
    return jnp.broadcast_to(w, values_shape)


def safe_targets(targets: jax.Array) -> jax.Array:
    """``targets`` with every :data:`IGNORE_INDEX` token replaced by 0, a valid id (its term is
    weighted 0, and a valid id keeps NaN out of the gradient that a ``where`` would not mask)."""
    return jnp.where(targets == IGNORE_INDEX, 0, targets) if has_token_axis(targets) else targets


def loss_sums(fn: PerExample, predictions, targets, weights=None) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)``: the weighted sum of ``fn``'s terms over a batch and their total weight.

    A term is one example, or one token when ``fn`` returns a value per token (integer targets
    ``(b, T)``, predictions ``(b, T, V)``): then the count is the number of real tokens (weighted),
    :data:`IGNORE_INDEX` targets excluded, and ``fn`` gets them as id 0 (weighted 0). A ``fn``
    that returns one value per sequence gets the targets as they are, :data:`IGNORE_INDEX`
    included, to mask them itself. Summed in the values' float dtype, at least float32.
    """
    safe = safe_targets(targets)
    if has_token_axis(targets) and jax.eval_shape(jax.vmap(fn), predictions, safe).shape != targets.shape:
        safe = targets  # one value per sequence: fn sees (and masks) the padding itself
    values = jax.vmap(fn)(predictions, safe)
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))  # float64 stays float64
    w = token_weights(targets, weights, values.shape).astype(values.dtype)
    return jnp.sum(w * values), jnp.sum(w)


def batch_mean(fn: PerExample) -> Callable[..., jax.Array]:
    """Turns a per-example function into a weighted mean over a batch.

    Returns:
      ``f(predictions: (b, ...), targets: (b, ...), weights: (b,) | None) -> scalar``,
      ``sum(w * fn(p, t)) / sum(w)``; 0 when all weights are 0. Reduced in the values' float
      dtype, at least float32 (bfloat16 values are summed in float32, float64 stay float64). For
      targets with a token axis (:func:`has_token_axis`) and a per-token ``fn`` (such as
      :func:`softmax_cross_entropy` on logits ``(b, T, V)``), the mean over the real tokens of the
      whole batch: the sum of the token terms over their count (:func:`loss_sums`), not a mean of
      per-sequence means.

    Examples:
      >>> f = batch_mean(half_sum_squares)
      >>> float(f(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.array([1.0, 0.0])))
      0.5
      >>> logits = jnp.zeros((1, 3, 4))  # one sequence of 3 tokens, 4 ids: each term log(4)
      >>> round(float(batch_mean(softmax_cross_entropy)(logits, jnp.array([[1, 2, IGNORE_INDEX]]))), 4)
      1.3863
    """

    def reduced(predictions, targets, weights=None):
        if has_token_axis(targets):
            total, count = loss_sums(fn, predictions, targets, weights)
            return jnp.where(count > 0, total / jnp.maximum(count, 1e-30), 0.0)
        values = jax.vmap(fn)(predictions, targets)
        values = values.astype(jnp.promote_types(values.dtype, jnp.float32))  # float64 stays float64
        if weights is None:
            return jnp.mean(values)
        weights = weights.astype(values.dtype)
        total = jnp.sum(weights)
        return jnp.where(total > 0, jnp.sum(weights * values) / jnp.maximum(total, 1e-30), 0.0)

    return reduced


def with_label_smoothing(loss: str | PerExample | LossSpec, smoothing: float) -> LossSpec:
    """Softmax cross-entropy against labels smoothed by ``smoothing`` (``optax.smooth_labels``:
    ``(1 - a) * one_hot + a / classes``); the accuracy metric stays that of the true labels."""
    spec = get_loss(loss)
    if smoothing == 0:
        return spec
    if spec.name != "softmax_cross_entropy":
        raise ValueError(f"label smoothing is for softmax_cross_entropy, not {spec.name!r}")
    if not 0 < smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing!r}")

    def smoothed(logits, label):
        target = optax.smooth_labels(jax.nn.one_hot(label, logits.shape[-1], dtype=logits.dtype), smoothing)
        return optax.softmax_cross_entropy(logits, target)

    return LossSpec(spec.name, smoothed, spec.metric, True)
