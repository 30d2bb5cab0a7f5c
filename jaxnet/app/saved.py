"""Predictions and metrics of saved models, with a member axis everywhere, in batches.

A saved model holds one member or an ensemble of K (params with a leading axis K). Everything here
runs the K members under one ``vmap`` (K = 1 for a single model) and then combines them: an
ensemble averages its members' probabilities (classification) or outputs (regression); one
member is used as it is.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import groups, lowrank, sources, summaries
from jaxnet.app import arch as archlib
from jaxnet.app import config as configlib
from jaxnet.app import data as datalib
from jaxnet.app import files, report, tables
from jaxnet.app.files import SavedModel
from jaxnet.app.rundir import RunFolder
from jaxnet.app.task import prepare_targets
from jaxnet.forward import apply_batch
from jaxnet.losses import batch_mean, get_loss
from jaxnet.metrics import check_metric_targets, get_metrics

_EPS = 1e-7


def bind_saved(saved: SavedModel, arch: str | None = None) -> archlib.Bound:
    """The model, params and state of ``saved``, every member stacked on a leading axis (K = 1
    for a single model). ``arch`` names a user's factory again (``file.py:factory``): needed for
    such a model, never imported otherwise."""
    model = archlib.build_model(saved.meta, arch)
    k = saved.meta.get("members")
    bound = archlib.bind(model, saved.params, saved.state, k, where="the saved model")
    if k:
        return bound
    return bound._replace(params=_stack(bound.params), state=_stack(bound.state))


def _stack(tree):
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


@functools.cache
def _outputs_program(model):
    """The compiled ``(params, state, x) -> outputs (K, n, out)`` of a model (one per model, so
    that chunk after chunk reuses it)."""

    def one(p, s, x):
        return apply_batch(model, p, s, x)[0]

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


BATCH_ROWS = 4096
"""Rows per compiled call when outputs are computed in batches."""


def member_outputs(model, params, state, x, batch_size: int = BATCH_ROWS) -> np.ndarray:
    """Raw outputs ``(K, n, out)`` of K members (params and state with a leading axis K) on
    inputs ``(n, d)`` (an array or lazy rows), in eval mode, ``batch_size`` rows per call (the
    last batch padded, so that one program serves every batch)."""

    run = _outputs_program(model)
    n = len(x)
    if n <= batch_size and sources.is_resident(x):
        return np.asarray(run(params, state, np.asarray(x)))
    parts = []
    for start in range(0, n, batch_size):
        block = np.asarray(x[start : start + batch_size])
        real = len(block)
        parts.append(np.asarray(run(params, state, sources.padded_rows(block, batch_size)))[:, :real])
    return np.concatenate(parts, axis=1)


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


def encoder_of(saved: SavedModel) -> tables.Encoder:
    """How a saved model's inputs are made from a table's columns (numeric columns by its
    feature names for a model trained on arrays)."""
    columns = saved.meta.get("columns")
    names = saved.meta["feature_names"]
    if columns is None:
        return tables.numeric(names)
    encoder = tables.Encoder.from_json(columns)
    if len(encoder.feature_names) != len(names):
        raise ValueError(f"the model's 'columns' make {len(encoder.feature_names)} features, it has {len(names)}")
    return encoder


def input_chunks(
    saved: SavedModel,
    path,
    target: str | None = None,
    targets: bool = True,
    rows: int = datalib.CHUNK_ROWS,
    id_column: str | None = None,
    delimiter: str | None = None,
):
    """The raw chunks (:class:`jaxnet.app.data.InputRows`, :func:`jaxnet.app.data.feature_chunks`) of a
    saved model's inputs in ``path``: a table's columns found by name and encoded as in training,
    ``y`` the ``target`` column(s) (default: the ones trained on) when the data has them and
    ``targets`` asks for them, ``ids`` the ``id_column``'s values. A CSV's ``delimiter`` defaults
    to the training run's ``--delimiter`` when the file's header holds it, else it is sniffed from
    the header (:func:`jaxnet.app.tables.sniff_delimiter`)."""
    target = (target or saved.meta.get("target")) if targets else None
    trained = (saved.meta.get("config") or {}).get("delimiter")
    if delimiter is None and trained is not None and tables.is_csv(path):  # the run's, if the header has it
        delimiter = tables.sniff_delimiter(os.fspath(path), prefer=trained)
    classes = saved.meta.get("classes")
    return datalib.feature_chunks(path, encoder_of(saved), target, classes, rows, id_column, delimiter)


def load_features(saved: SavedModel, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs for a saved model from a table (columns by name), ``.npz`` (``x``) or a folder.

    Returns ``(x, y)``: ``x`` ``(n, d)`` encoded and standardized as in training; ``y`` the raw
    targets (class indices for named classes) when present, else None.
    """
    chunks = list(input_chunks(saved, path))
    x = np.concatenate([c[0] for c in chunks])
    y = None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])
    return datalib.standardize(x, datalib.Standardizer(saved.mean, saved.std)), y


def _loss_and_accuracy(outputs, y, loss: str) -> dict:
    spec = get_loss(loss)
    out = {"loss": batch_mean(spec.fn)(outputs, y)}
    if spec.metric is not None:
        out["accuracy"] = batch_mean(spec.metric)(outputs, y)
    return out


_jit_loss_and_accuracy = jax.jit(_loss_and_accuracy, static_argnames="loss")


def to_units(values, scaler):
    """Regression outputs or targets ``(n, k)`` from standardized units back to the target's own
    (``scaler`` is the training split's ``(mean, std)`` of the targets, or None: unchanged)."""
    if scaler is None or scaler[0] is None:
        return np.asarray(values)
    return np.asarray(values, np.float64) * np.asarray(scaler[1], np.float64) + np.asarray(scaler[0], np.float64)


def metrics_of(outputs, y, meta: dict, scaler=None, metrics=()) -> dict:
    """``{"loss", "accuracy"}`` for classification, ``{"loss", "mse", "mae", "r2"}`` for
    regression (and ``per_target``: each target's ``{"mse", "mae", "r2"}`` when there are several),
    of one model's outputs ``(n, out)`` against prepared targets ``y``, and the named ``metrics``
    (:mod:`jaxnet.metrics`). The loss and the named metrics are in the units the model was
    trained in; MSE, MAE and R² in the target's own (``scaler``: the targets' standardization, or
    None)."""
    tally = Tally(meta, scaler, metrics)
    tally.add(outputs, y)
    return tally.metrics()


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


def predict_saved(saved: SavedModel, x: np.ndarray, arch: str | None = None) -> np.ndarray:
    """Predictions ``(n, out)`` for standardized inputs ``x: (n, d)``: class probabilities for the
    classification losses, outputs in the target's units for regression; an ensemble averages
    its members."""
    return _predictions(saved, member_outputs(*bind_saved(saved, arch), x))


def evaluate_saved(saved: SavedModel, x: np.ndarray, y: np.ndarray, arch: str | None = None, metrics=()) -> dict:
    """The metrics (:func:`metrics_of`) of a saved model on standardized ``x: (n, d)`` and raw
    targets ``y``; an ensemble is evaluated on its averaged predictions."""
    outputs = combine(jnp.asarray(member_outputs(*bind_saved(saved, arch), x)), saved.meta["loss"])
    return metrics_of(outputs, targets_for(saved, y), saved.meta, _scaler(saved), metrics)


def member_metrics(meta: dict, bound: archlib.Bound, x, y, scaler=None, metrics=()) -> list[dict]:
    """The metrics (:func:`metrics_of`) of each of K members (``bound``'s params and state with a
    leading axis K) on prepared ``x: (n, d)`` (an array or lazy rows) and ``y``, in batches."""
    outputs = member_outputs(bound.model, bound.params, bound.state, x)
    y = np.asarray(y)
    return [metrics_of(outputs[i], y, meta, scaler, metrics) for i in range(len(outputs))]


class Tally:
    """The sums of :func:`metrics_of` over chunks, exact for the whole set: loss and accuracy
    sums, named metrics' states, and for regression the errors and the targets' moments (for R²)
    per target, in the target's units, in float64."""

    def __init__(self, meta: dict, scaler=None, metrics=()):
        named = get_metrics(list(metrics))
        check_metric_targets(named, get_loss(meta["loss"]).integer_labels, meta["loss"], meta["sizes"][-1])
        own = ("loss", "accuracy", "mse", "mae", "r2")  # figures of their own (MSE, MAE, R² in the target's units)
        self.meta, self.scaler, self.named = meta, scaler, tuple(m for m in named if m.name not in own)
        self.n, self.sums, self.states = 0, {}, None
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, outputs, y) -> None:
        m = len(y)
        if m == 0:
            return
        losses = jax.device_get(_jit_loss_and_accuracy(outputs, np.asarray(y), self.meta["loss"]))
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * m
        if self.named:
            if self.states is None:
                self.states = [metric.zeros(np.shape(outputs)[-1]) for metric in self.named]
            ones = jnp.ones(m, jnp.float32)
            self.states = [mt.update(st, jnp.asarray(outputs), jnp.asarray(y), ones)
                           for mt, st in zip(self.named, self.states)]  # fmt: skip
        if self.meta["task"] == "regression":
            out, target = to_units(outputs, self.scaler), to_units(y, self.scaler)
            error = np.asarray(out, np.float64) - np.asarray(target, np.float64)
            self.sums["se"] = self.sums.get("se", 0.0) + np.sum(error**2, axis=0)
            self.sums["ae"] = self.sums.get("ae", 0.0) + np.sum(np.abs(error), axis=0)
            block_mean = np.asarray(target, np.float64).mean(axis=0)
            delta, total = block_mean - self.mean, self.count + m
            self.m2 = self.m2 + ((target - block_mean) ** 2).sum(axis=0) + delta**2 * (self.count * m / total)
            self.mean, self.count = self.mean + delta * (m / total), total
        self.n += m

    def metrics(self) -> dict:
        out = {name: self.sums[name] / self.n for name in ("loss", "accuracy") if name in self.sums}
        if self.meta["task"] == "regression":
            mse, mae = self.sums["se"] / self.n, self.sums["ae"] / self.n
            with np.errstate(divide="ignore", invalid="ignore"):
                spread = np.asarray(self.m2)
                r2 = np.where(spread > 0, 1.0 - self.sums["se"] / spread, np.nan)
            out.update(mse=float(np.mean(mse)), mae=float(np.mean(mae)), r2=float(np.mean(r2)))
            if len(mse) > 1:  # targets in different units: each on its own
                out["per_target"] = {name: {"mse": float(mse[i]), "mae": float(mae[i]), "r2": float(r2[i])}
                                     for i, name in enumerate(report.target_names(self.meta))}  # fmt: skip
        for metric, state in zip(self.named, self.states or ()):
            out[metric.name] = float(metric.result(jax.device_get(state)))
        return out


def _standardized(saved: SavedModel, x: np.ndarray) -> np.ndarray:
    expected = len(saved.meta["feature_names"])
    if x.shape[1] != expected:
        raise ValueError(f"the data has {x.shape[1]} features but the model expects {expected}")
    return datalib.standardize(x, datalib.Standardizer(saved.mean, saved.std))


def predict_chunks(saved: SavedModel, chunks, arch: str | None = None):
    """:func:`predict_saved` chunk by chunk: ``chunks`` of raw inputs (:class:`jaxnet.app.data.InputRows`)
    in, ``(chunk, predictions)`` out; memory is bounded by the chunk."""
    bound = bind_saved(saved, arch)
    for chunk in chunks:
        yield chunk, _predictions(saved, member_outputs(*bound, _standardized(saved, chunk.x)))


def _predictions(saved: SavedModel, outputs) -> np.ndarray:
    loss = saved.meta["loss"]
    outputs = combine(jnp.asarray(outputs), loss)
    if saved.meta["task"] == "regression":
        return to_units(outputs, _scaler(saved)).astype(np.float32)
    return probabilities(outputs, loss)


def evaluate_chunks(saved: SavedModel, chunks, arch: str | None = None, metrics=()) -> tuple[dict, int]:
    """``(metrics, rows)``: :func:`evaluate_saved` over ``chunks`` of raw ``(x, y)``, summed chunk by
    chunk (memory bounded by the chunk); every chunk must hold targets. ``metrics``: named metrics
    (:mod:`jaxnet.metrics`) besides the loss."""
    bound, tally = bind_saved(saved, arch), Tally(saved.meta, _scaler(saved), metrics)
    for chunk in chunks:
        if chunk.y is None:
            raise ValueError("the data has no targets: name the target column")
        outputs = member_outputs(*bound, _standardized(saved, chunk.x))
        tally.add(combine(jnp.asarray(outputs), saved.meta["loss"]), targets_for(saved, chunk.y))
    return tally.metrics(), tally.n


def saved_summary(
    path, batch_size: int | None = None, arch: str | None = None
) -> tuple[summaries.Summary, int, dict | None]:
    """``(summary, tokens, trained)``: the :func:`jaxnet.summary` of a trained run's model (its first
    member), with the run's loss, optimizer and batch size (from its ``config.json``) unless
    ``batch_size`` is given; for a language model the tokens of the summary's batch (``b * T``),
    else 0; and what a fine-tuning run trained of them (:func:`trained_parameters`)."""
    model = files.load_model(path)
    bound = bind_saved(model, arch)
    params, state = jax.tree.map(lambda a: a[0], (bound.params, bound.state))
    stored = RunFolder(path).stored_config() if Path(path).is_dir() else None
    config = configlib.TrainConfig.from_dict(stored) if stored else None
    trained = trained_parameters(config, params)
    if config is not None and config.lora_rank is not None:  # the saved model is the base, adapters merged in
        config = dataclasses.replace(config, lora_rank=None, lora_alpha=None, lora_targets=lowrank.TARGETS)
    optimizer = configlib.make_optimizer(config) if config else None
    if batch_size is None:
        batch_size = config.batch_size if config else 32
    lm = model.meta.get("task") == "lm"
    if lm:  # one window of token ids
        example = jax.ShapeDtypeStruct((model.meta["gpt"]["context"],), jnp.int32)
    else:
        example = jax.ShapeDtypeStruct((len(model.meta["feature_names"]),), jnp.float32)
    loss = model.meta.get("loss")
    found = summaries.summary(
        bound.model, example, params=params, model_state=state, batch_size=batch_size, loss=loss, optimizer=optimizer
    )
    return found, found.batch_size * example.shape[0] if lm else 0, trained


def trained_parameters(config: configlib.TrainConfig | None, params) -> dict | None:
    """What a fine-tuning run trained of its saved ``params``: ``trainable_parameters`` (all
    but ``--freeze``'s; under LoRA its adapters, which the saved weights hold merged) and
    ``trained``, how, in words; None for a run that trained every parameter (or no config)."""
    if config is None:
        return None
    if config.lora_rank is not None:
        count = lowrank.adapter_count(params, config.lora_rank, config.lora_targets)
        targets = f"--lora-targets {config.lora_targets!r}"
        how = f"LoRA adapters of rank {config.lora_rank} ({targets}), merged into the saved weights"
        return {"trainable_parameters": count, "trained": how}
    if config.freeze is not None:
        count = groups.trainable_count(params, freeze=config.freeze)
        return {"trainable_parameters": count, "trained": f"all but --freeze {config.freeze!r}"}
    return None
