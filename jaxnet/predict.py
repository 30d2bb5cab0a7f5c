"""Predictions and metrics of trained models, with a member axis everywhere.

A saved model holds one member or an ensemble of K (params with a leading axis K). Everything here
runs the K members under one ``vmap`` (K = 1 for a single model) and then combines them: an
ensemble averages its members' probabilities (classification) or outputs (regression); one
member is used as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import arch as archlib
from jaxnet import data as datalib
from jaxnet.files import SavedModel
from jaxnet.forward import apply_batch
from jaxnet.losses import batch_mean, get_loss
from jaxnet.task import prepare_targets

_EPS = 1e-7


def load(saved: SavedModel, arch: str | None = None) -> archlib.Bound:
    """The model, params and state of ``saved``, every member stacked on a leading axis (K = 1
    for a single model). ``arch`` names a user's factory again (``file.py:factory``): needed for
    such a model, never imported otherwise."""
    model = archlib.build(saved.meta, arch)
    k = saved.meta.get("members")
    bound = archlib.bind(model, saved.params, saved.state, k, where="the saved model")
    if k:
        return bound
    return bound._replace(params=_stack(bound.params), state=_stack(bound.state))


def _stack(tree):
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def member_outputs(model, params, state, x) -> jax.Array:
    """Raw outputs ``(K, n, out)`` of K members (params and state with a leading axis K) on
    inputs ``(n, d)``, in eval mode."""

    def one(p, s, x):
        return apply_batch(model, p, s, x)[0]

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))(params, state, np.asarray(x))


def combine(outputs: jax.Array, loss: str) -> jax.Array:
    """One model's outputs ``(n, out)`` from K members' ``(K, n, out)``: the member itself when
    K = 1; else the average of the members' probabilities, returned as logits (the log of the
    average) for the classification losses, the average output for regression."""
    if outputs.shape[0] == 1:
        return outputs[0]
    if loss == "softmax_cross_entropy":
        return jnp.log(jnp.clip(jnp.mean(jax.nn.softmax(outputs, axis=-1), axis=0), _EPS, 1.0))
    if loss == "sigmoid_binary_cross_entropy":
        p = jnp.clip(jnp.mean(jax.nn.sigmoid(outputs), axis=0), _EPS, 1 - _EPS)
        return jnp.log(p) - jnp.log1p(-p)
    return jnp.mean(outputs, axis=0)


def probabilities(outputs, loss: str) -> np.ndarray:
    """Raw outputs ``(n, out)`` as predictions: softmax or sigmoid probabilities for the
    classification losses, unchanged for regression."""
    if loss == "softmax_cross_entropy":
        outputs = jax.nn.softmax(outputs, axis=-1)
    elif loss == "sigmoid_binary_cross_entropy":
        outputs = jax.nn.sigmoid(outputs)
    return np.asarray(outputs)


def load_features(saved: SavedModel, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs for a saved model from CSV (columns by feature name) or ``.npz`` (``x``).

    Returns ``(x, y)``: ``x`` ``(n, d)`` standardized as in training; ``y`` the raw target column
    (or the npz's ``y``) when present, else None.
    """
    x, y = datalib.load_features(path, saved.meta["feature_names"], target=saved.meta.get("target"))
    expected = len(saved.meta["feature_names"])
    if x.shape[1] != expected:
        raise ValueError(f"{path} has {x.shape[1]} features but the model expects {expected}")
    return datalib.standardize(x, datalib.Standardizer(saved.mean, saved.std)), y


def regression_metrics(outputs, targets) -> dict[str, float]:
    """MSE, MAE and R² (coefficient of determination, averaged over outputs) of ``(n, k)`` arrays."""
    outputs, targets = np.asarray(outputs, np.float64), np.asarray(targets, np.float64)
    error = outputs - targets
    spread = np.sum((targets - targets.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(spread > 0, 1.0 - np.sum(error**2, axis=0) / spread, np.nan)
    return {"mse": float(np.mean(error**2)), "mae": float(np.mean(np.abs(error))), "r2": float(np.mean(r2))}


def _loss_and_accuracy(outputs, y, loss: str) -> dict:
    spec = get_loss(loss)
    out = {"loss": batch_mean(spec.fn)(outputs, y)}
    if spec.metric is not None:
        out["accuracy"] = batch_mean(spec.metric)(outputs, y)
    return out


_jit_loss_and_accuracy = jax.jit(_loss_and_accuracy, static_argnames="loss")


def _scores(outputs, y, meta: dict, losses: dict, scaler=None) -> dict:
    out = {k: float(v) for k, v in losses.items()}
    if meta["task"] == "regression":
        out.update(regression_metrics(to_units(outputs, scaler), to_units(y, scaler)))
    return out


def to_units(values, scaler):
    """Regression outputs or targets ``(n, k)`` from standardized units back to the target's own
    (``scaler`` is the training split's ``(mean, std)`` of the targets, or None: unchanged)."""
    if scaler is None or scaler[0] is None:
        return np.asarray(values)
    return np.asarray(values, np.float64) * np.asarray(scaler[1], np.float64) + np.asarray(scaler[0], np.float64)


def metrics_of(outputs, y, meta: dict, scaler=None) -> dict:
    """``{"loss", "accuracy"}`` for classification, ``{"loss", "mse", "mae", "r2"}`` for
    regression, of one model's outputs ``(n, out)`` against prepared targets ``y``. The loss is
    the training loss, in the units the model was trained in; MSE, MAE and R² are in the
    target's own units (``scaler``: the targets' standardization, or None)."""
    return _scores(outputs, y, meta, _jit_loss_and_accuracy(outputs, np.asarray(y), meta["loss"]), scaler)


def targets_for(saved: SavedModel, y) -> np.ndarray:
    """Raw targets ``(n,)`` or ``(n, k)`` prepared as the model's loss expects: ``(n,)`` int32
    labels for cross-entropy, ``(n, k)`` float32 otherwise (standardized as in training)."""
    meta = saved.meta
    y = prepare_targets(np.asarray(y), meta["loss"], meta["sizes"][-1] if meta["num_classes"] else None)
    if saved.target_mean is None:
        return y
    return ((y - saved.target_mean) / saved.target_std).astype(np.float32)


def _scaler(saved: SavedModel):
    return None if saved.target_mean is None else (saved.target_mean, saved.target_std)


def predict(saved: SavedModel, x: np.ndarray, arch: str | None = None) -> np.ndarray:
    """Predictions ``(n, out)`` for standardized inputs ``x: (n, d)``: class probabilities for the
    classification losses, outputs in the target's units for regression; an ensemble averages
    its members."""
    loss = saved.meta["loss"]
    outputs = combine(member_outputs(*load(saved, arch), x), loss)
    if saved.meta["task"] == "regression":
        return to_units(outputs, _scaler(saved)).astype(np.float32)
    return probabilities(outputs, loss)


def evaluate(saved: SavedModel, x: np.ndarray, y: np.ndarray, arch: str | None = None) -> dict:
    """The metrics (:func:`metrics_of`) of a saved model on standardized ``x: (n, d)`` and raw
    targets ``y``; an ensemble is evaluated on its averaged predictions."""
    outputs = combine(member_outputs(*load(saved, arch), x), saved.meta["loss"])
    return metrics_of(outputs, targets_for(saved, y), saved.meta, _scaler(saved))


def member_metrics(meta: dict, bound: archlib.Bound, x, y, scaler=None) -> list[dict]:
    """The metrics (:func:`metrics_of`) of each of K members (``bound``'s params and state with a
    leading axis K) on prepared ``x: (n, d)`` and ``y``, in one compiled call."""

    def run(params, state, x, y):
        outputs = jax.vmap(lambda p, s: apply_batch(bound.model, p, s, x)[0])(params, state)
        return outputs, jax.vmap(lambda o: _loss_and_accuracy(o, y, meta["loss"]))(outputs)

    outputs, losses = jax.device_get(jax.jit(run)(bound.params, bound.state, np.asarray(x), np.asarray(y)))
    return [_scores(outputs[i], y, meta, {k: v[i] for k, v in losses.items()}, scaler) for i in range(len(outputs))]
