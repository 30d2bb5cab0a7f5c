"""Named metrics accumulated on the device: sums over batches, exact over the whole set.

A :class:`Metric` keeps a small state of weighted sums (a confusion matrix for precision, recall
and F1) that ``update`` adds a batch to and ``result`` turns into the figure, on the host in
float64. Batched evaluation (:func:`jaxnet.evaluate`, ``fit``'s validation) sums the states over
every batch of the data, so a macro F1 is the F1 of the whole set's confusion matrix, not a mean of
per-batch figures.

Names: ``accuracy``, ``top_k_accuracy`` (``top_5_accuracy`` etc.), ``cross_entropy``,
``perplexity`` (``exp`` of the mean cross-entropy), ``bits_per_token`` (the mean cross-entropy in
bits: bits per byte or per character with a byte or character tokenizer),
``precision``, ``recall``, ``f1`` (macro averages over the classes present in the targets or the
predictions, as scikit-learn's ``average="macro"``), ``mse``, ``mae``, ``r2``; or any per-example
callable ``(prediction, target) -> scalar``, reported as its weighted mean under its ``__name__``
(with a token axis, the callable gets one token: ``(V,)`` logits and a scalar label). Lower is
better for the losses and errors (:data:`LOWER_IS_BETTER`), higher for the rest.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet._checks import ArgumentError, escape
from jaxnet.losses import has_token_axis, safe_targets, softmax_cross_entropy, token_weights


class Metric(NamedTuple):
    """A metric as sums: ``zeros(outputs) -> state``, ``update(state, predictions: (b, out),
    targets: (b, ...), weights: (b,)) -> state`` and ``result(state) -> float`` (numpy state).
    ``lower_is_better``: its direction, for early stopping and for picking the best member."""

    name: str
    zeros: Callable[[int], Any]
    update: Callable[..., Any]
    result: Callable[[Any], float]
    lower_is_better: bool = False


LOWER_IS_BETTER = ("loss", "cross_entropy", "perplexity", "bits_per_token", "mse", "mae")
"""The figures of which a lower value is better: the loss and the built-in metrics that are losses
or errors. Of the others (accuracies, precision, recall, f1, r2, and a callable's mean unless given
as a :class:`Metric` with ``lower_is_better=True``) a higher is better."""


def monitor_sign(monitor: str, metrics: Sequence[Metric] = ()) -> float:
    """1 when a lower ``monitor`` (``val_loss``, ``train_loss``, ``val_<metric>``) is better, -1
    when a higher is: by the metric of that name among ``metrics``, else by :data:`LOWER_IS_BETTER`."""
    name = monitor.split("_", 1)[1] if monitor.startswith(("val_", "train_")) else monitor
    for metric in metrics:
        if metric.name == name:
            return 1.0 if metric.lower_is_better else -1.0
    return 1.0 if name in LOWER_IS_BETTER else -1.0


def _ratio(top, bottom) -> float:
    bottom = float(bottom)
    return float(top) / bottom if bottom else float("nan")


def _mean_metric(name: str, per_example: Callable) -> Metric:
    """The weighted mean of a per-example function."""

    def update(state, predictions, targets, weights):
        values = jax.vmap(per_example)(predictions, targets).astype(jnp.float32)
        values = values.reshape(values.shape[0], -1).mean(axis=1)
        return state + jnp.stack([jnp.sum(weights * values), jnp.sum(weights)])

    return Metric(name, lambda outputs: jnp.zeros(2, jnp.float32), update, lambda s: _ratio(s[0], s[1]))


def top_k_accuracy(k: int) -> Metric:
    """1 when the label is among the ``k`` largest logits."""

    def one(logits, label):
        return jnp.sum((jax.lax.top_k(logits, k)[1] == label).astype(jnp.float32))

    return _mean_metric(f"top_{k}_accuracy", one)


def _confusion(name: str, reduce: Callable[[np.ndarray], float]) -> Metric:
    """A metric of the weighted confusion matrix ``(classes, classes)``: rows true, columns predicted."""

    def update(state, logits, labels, weights):
        classes = state.shape[0]
        predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), classes, dtype=jnp.float32)
        true = jax.nn.one_hot(labels, classes, dtype=jnp.float32) * weights[:, None]
        return state + true.T @ predicted

    return Metric(name, lambda outputs: jnp.zeros((outputs, outputs), jnp.float32), update, reduce)


def _per_class(matrix: np.ndarray):
    matrix = np.asarray(matrix, np.float64)
    tp = np.diag(matrix)
    true, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (true + predicted) > 0  # scikit-learn's labels: those in the targets or the predictions
    return tp, true, predicted, present


def _macro(values: np.ndarray, present: np.ndarray) -> float:
    return float(np.mean(values[present])) if present.any() else float("nan")


def _precision(matrix) -> float:
    tp, _, predicted, present = _per_class(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _macro(np.where(predicted > 0, tp / predicted, 0.0), present)  # zero_division=0


def _recall(matrix) -> float:
    tp, true, _, present = _per_class(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _macro(np.where(true > 0, tp / true, 0.0), present)


def _f1(matrix) -> float:
    tp, true, predicted, present = _per_class(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _macro(np.where(true + predicted > 0, 2 * tp / (true + predicted), 0.0), present)


def _errors(name: str) -> Metric:
    """MSE or MAE over every output of every example (weighted by example)."""

    def update(state, predictions, targets, weights):
        error = (predictions - jnp.reshape(targets, predictions.shape)).astype(jnp.float32)
        error = jnp.square(error) if name == "mse" else jnp.abs(error)
        per_example = error.reshape(error.shape[0], -1)
        return state + jnp.stack([jnp.sum(weights * per_example.sum(axis=1)), jnp.sum(weights) * per_example.shape[1]])

    return Metric(name, lambda outputs: jnp.zeros(2, jnp.float32), update, lambda s: _ratio(s[0], s[1]))


def _r2_update(state, predictions, targets, weights):
    targets = jnp.reshape(targets, predictions.shape).astype(jnp.float32)
    t = targets.reshape(targets.shape[0], -1)
    e = (predictions.reshape(t.shape) - t).astype(jnp.float32)
    w = weights[:, None]
    sums = jnp.stack(
        [jnp.sum(w * jnp.ones_like(t), 0), jnp.sum(w * t, 0), jnp.sum(w * t * t, 0), jnp.sum(w * e * e, 0)]
    )
    return state + sums


def _r2_result(state) -> float:
    """R² per output from the sums, averaged over the outputs with any spread (as ``jaxnet.app.saved``)."""
    w, t, tt, ee = np.asarray(state, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = tt - t * t / w
        r2 = np.where(spread > 0, 1.0 - ee / spread, np.nan)
    return float(np.mean(r2))


def _r2() -> Metric:
    return Metric("r2", lambda outputs: jnp.zeros((4, outputs), jnp.float32), _r2_update, _r2_result)


def _cross_entropy(logits, label):
    return softmax_cross_entropy(logits, label)  # (NaN for a label outside the classes)


def _accuracy(logits, label):
    return (jnp.argmax(logits, axis=-1) == label).astype(jnp.float32)


def _exp_ratio(state) -> float:
    return float(np.exp(_ratio(state[0], state[1])))


def _bits_ratio(state) -> float:
    return _ratio(state[0], state[1]) / float(np.log(2.0))


def _of_cross_entropy(name: str, result: Callable) -> Metric:
    """A figure of the mean cross-entropy (nats): its ``result`` of the summed state."""
    mean = _mean_metric(name, _cross_entropy)
    return mean._replace(result=result)


BUILT_IN: dict[str, Callable[[], Metric]] = {
    "accuracy": lambda: _mean_metric("accuracy", _accuracy),
    "cross_entropy": lambda: _mean_metric("cross_entropy", _cross_entropy),
    "perplexity": lambda: _of_cross_entropy("perplexity", _exp_ratio),
    "bits_per_token": lambda: _of_cross_entropy("bits_per_token", _bits_ratio),
    "precision": lambda: _confusion("precision", _precision),
    "recall": lambda: _confusion("recall", _recall),
    "f1": lambda: _confusion("f1", _f1),
    "mse": lambda: _errors("mse"),
    "mae": lambda: _errors("mae"),
    "r2": _r2,
}
"""The metrics by name (``top_k_accuracy`` takes its k from the name: ``top_5_accuracy``)."""


def per_token(metric: Metric) -> Metric:
    """``metric`` that also takes targets with a token axis: predictions ``(b, T, V)`` and labels
    ``(b, T)`` are scored as ``b * T`` examples, each token weighted by its sequence's weight and
    the :data:`jaxnet.losses.IGNORE_INDEX` tokens by 0 (other targets pass through unchanged)."""

    def update(state, predictions, targets, weights):
        if has_token_axis(targets) and predictions.ndim == targets.ndim + 1:
            w = token_weights(targets, weights, targets.shape).reshape(-1)
            flat = predictions.reshape(-1, predictions.shape[-1])
            return metric.update(state, flat, safe_targets(targets).reshape(-1), w.astype(jnp.float32))
        return metric.update(state, predictions, targets, weights)

    return metric._replace(update=update)


def get_metric(metric: str | Callable | Metric) -> Metric:
    """A :class:`Metric` from a name, a per-example callable or a Metric; each takes targets with
    a token axis too (:func:`per_token`)."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        top = re.fullmatch(r"top_(\d+)_accuracy", metric)
        if top:
            return per_token(top_k_accuracy(int(top.group(1))))
        if metric in BUILT_IN:
            return per_token(BUILT_IN[metric]())._replace(lower_is_better=metric in LOWER_IS_BETTER)
        names = ", ".join([*BUILT_IN, "top_k_accuracy (e.g. top_5_accuracy)"])
        raise ValueError(f"unknown metric {metric!r}: use one of {names}, or a callable (prediction, target)")
    if callable(metric):
        return per_token(_mean_metric(getattr(metric, "__name__", "metric"), metric))
    raise TypeError(f"metrics: expected names or callables, got {metric!r}")


def get_metrics(metrics: Sequence | None) -> tuple[Metric, ...]:
    """The metrics of a ``metrics=`` argument, checked for duplicate names."""
    if metrics is None:
        return ()
    if isinstance(metrics, (str, Metric)) or callable(metrics):
        raise TypeError("metrics must be a list of names or callables, e.g. metrics=['f1']")
    found = tuple(get_metric(m) for m in metrics)
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics: the names {names} repeat; give each metric once")
    return found


CLASS_METRICS = ("accuracy", "cross_entropy", "perplexity", "bits_per_token", "precision", "recall", "f1")
VALUE_METRICS = ("mse", "mae", "r2")


def check_metric_targets(
    metrics: tuple[Metric, ...], integer_labels: bool, loss_name: str, classes: int | None = None
) -> None:
    """Refuses built-in metrics that do not fit the loss's targets: the class metrics (and
    ``top_k_accuracy``) need integer labels, ``mse``, ``mae`` and ``r2`` real-valued targets;
    ``top_k_accuracy`` needs at least ``k`` classes (when ``classes`` is known)."""
    for m in metrics:
        top = re.fullmatch(r"top_(\d+)_accuracy", m.name)
        problem = None
        if top and integer_labels and classes is not None and int(top.group(1)) > classes:
            problem = f"{m.name!r} needs at least {top.group(1)} classes; the model has {classes}"
        elif (m.name in CLASS_METRICS or top) and not integer_labels:
            problem = f"{m.name!r} scores class labels, but the loss {loss_name!r} has real-valued targets"
        elif m.name in VALUE_METRICS and integer_labels:
            problem = (
                f"{m.name!r} compares outputs with real-valued targets, but the loss {loss_name!r} has class labels"
            )
        if problem is not None:
            raise ArgumentError("{0}: " + escape(problem), "metrics")
