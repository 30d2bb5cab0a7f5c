"""A whole training run as data in, results out: config -> data -> model -> ``fit`` -> files.

``TrainConfig`` is the run's complete, JSON-serializable description; :func:`run` executes it and
:func:`write_outputs` leaves the model, metrics and curves in an output folder. The CLI is a thin
layer over these functions, and they are usable from Python as they are.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import data as datalib
from jaxnet import io
from jaxnet.layers import ACTIVATIONS, mlp
from jaxnet.loop import FitState, Record, fit
from jaxnet.losses import LOSSES, get_loss
from jaxnet.step import make_eval_fn

OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Unset fields take the dataset's preset or defaults.

    Attributes:
      dataset: a built-in dataset name (``jaxnet.data.BUILTINS``), or None when ``data`` is given.
      data: path of a CSV (with ``target``) or ``.npz`` file (arrays ``x`` and ``y``).
      target: the CSV column to predict.
      hidden: hidden layer sizes.
      activation: hidden activation (a name in ``jaxnet.ACTIVATIONS``).
      output_activation: activation of the output layer (None: identity; logits for cross-entropy).
      loss: a name in ``jaxnet.LOSSES`` (or alias); None picks softmax cross-entropy for class
        labels and mean squared error for real-valued targets.
      optimizer: ``sgd``, ``adam`` or ``adamw``; lr: its learning rate; weight_decay: for adamw.
      epochs, batch_size, seed: the schedule and the seed every random draw derives from.
      val_split, test_split: held-out fractions, drawn deterministically from ``seed``.
      patience: early-stopping patience in epochs on validation loss (None: train all epochs).
      standardize: standardize features with the training split's mean and std.
      dtype: compute dtype of the forward and backward pass: ``float32``, or ``bfloat16`` for mixed
        precision (float32 master params, optimizer state and loss).
      seeds, lrs, weight_decays: train a grid of members in one program (``jaxnet.sweep``): seeds
        ``seed ... seed + seeds - 1`` times each learning rate in ``lrs`` (empty: ``lr``) times each
        weight decay in ``weight_decays`` (adamw; empty: ``weight_decay``).
      ensemble: with members, save them all (predictions average them) instead of the best one.
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of stopping
        (counted in the metrics as ``skipped``).
    """

    dataset: str | None = None
    data: str | None = None
    target: str | None = None
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    output_activation: str | None = None
    loss: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    val_split: float = 0.1
    test_split: float = 0.2
    patience: int | None = None
    standardize: bool = True
    dtype: str = "float32"
    seeds: int = 1
    lrs: tuple[float, ...] = ()
    weight_decays: tuple[float, ...] = ()
    ensemble: bool = False
    skip_nonfinite: bool = False

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}: this run was made by a different jaxnet version")
        values = dict(values)
        if values.get("hidden") is not None:
            values["hidden"] = tuple(values["hidden"])
        for name in ("lrs", "weight_decays"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # The worked example's network and its single sample: 3-2-2 sigmoid, half-SSE, online SGD 0.1.
    "seed": dict(
        hidden=(2,), activation="sigmoid", output_activation="sigmoid", loss="half_sse", optimizer="sgd",
        lr=0.1, batch_size=1, epochs=1000, val_split=0.0, test_split=0.0, standardize=False,
    ),
    "xor": dict(hidden=(8,), activation="tanh", lr=0.05, batch_size=4, epochs=300, val_split=0.0, test_split=0.0),
    "moons": dict(hidden=(32, 32), lr=0.01, epochs=60),
    "spirals": dict(hidden=(64, 64), lr=0.01, epochs=150),
    "digits": dict(hidden=(64, 64), lr=1e-3, epochs=30, batch_size=64),
}
"""Per-dataset defaults, applied to every field the user leaves unset."""


def make_config(**overrides) -> TrainConfig:
    """A :class:`TrainConfig` from defaults, the dataset's preset, then ``overrides`` (None = unset)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "data" not in overrides:
        overrides.setdefault("dataset", "digits")
    preset = PRESETS.get(overrides.get("dataset") or "", {})
    return TrainConfig(**{**preset, **overrides})


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate(config: TrainConfig) -> None:
    """Raises ValueError/TypeError naming the first bad field of ``config`` and how to fix it."""
    c = config
    if (c.dataset is None) == (c.data is None):
        raise ValueError("give either a built-in dataset (--dataset) or a data file (--data), not both")
    if c.dataset is not None and c.dataset not in datalib.BUILTINS:
        raise ValueError(f"unknown dataset {c.dataset!r}: use one of {', '.join(datalib.BUILTINS)}")
    if c.data is not None and str(c.data).lower().endswith(".csv") and not c.target:
        raise ValueError(f"{c.data} is a CSV file: name the column to predict with --target")
    for i, size in enumerate(c.hidden):
        if not _is_int(size) or size <= 0:
            raise ValueError(f"hidden layer sizes must be positive integers, got {size!r} at position {i + 1}")
    for what, name in (("activation", c.activation), ("output activation", c.output_activation)):
        if name is not None and name not in ACTIVATIONS:
            raise ValueError(f"unknown {what} {name!r}: use one of {', '.join(sorted(ACTIVATIONS))}")
    if c.loss is not None:
        get_loss(c.loss)
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {c.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    for name in ("lr", "weight_decay"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name.replace('_', ' ')} must be a finite number, got {value!r}")
    if c.lr <= 0:
        raise ValueError(f"learning rate must be greater than 0, got {c.lr!r}")
    if c.weight_decay < 0:
        raise ValueError(f"weight decay must be 0 or more, got {c.weight_decay!r}")
    for name in ("epochs", "batch_size"):
        value = getattr(c, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
    if not _is_int(c.seed) or c.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {c.seed!r}")
    if c.patience is not None and (not _is_int(c.patience) or c.patience <= 0):
        raise ValueError(f"patience must be a positive integer, got {c.patience!r}")
    for name in ("val_split", "test_split"):
        value = getattr(c, name)
        if not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"{name.replace('_', ' ')} must be a fraction in [0, 1), got {value!r}")
    if c.val_split + c.test_split >= 1:
        raise ValueError("validation and test splits together must leave some training data (sum < 1)")
    if c.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {c.dtype!r}: use one of {', '.join(DTYPES)}")
    if c.patience is not None and c.val_split == 0:
        raise ValueError("early stopping (--patience) needs a validation split (--val-split > 0)")
    _validate_members(c)


def _validate_members(c: TrainConfig) -> None:
    if not _is_int(c.seeds) or c.seeds <= 0:
        raise ValueError(f"seeds must be a positive integer, got {c.seeds!r}")
    for name, low in (("lrs", "greater than 0"), ("weight_decays", "0 or more")):
        values = getattr(c, name)
        if not isinstance(values, tuple):
            raise TypeError(f"{name} must be a tuple of numbers, got {values!r}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must hold finite numbers, got {value!r}")
            if value < 0 or (value == 0 and name == "lrs"):
                raise ValueError(f"{name} values must be {low}, got {value!r}")
    if c.weight_decays and c.optimizer != "adamw":
        raise ValueError(f"a weight decay sweep needs the adamw optimizer (--optimizer adamw), not {c.optimizer!r}")
    if not isinstance(c.ensemble, bool):
        raise TypeError(f"ensemble must be True or False, got {c.ensemble!r}")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer that ``config`` names."""
    if config.optimizer == "sgd":
        return optax.sgd(config.lr)
    if config.optimizer == "adam":
        return optax.adam(config.lr)
    return optax.adamw(config.lr, weight_decay=config.weight_decay)


class Problem(NamedTuple):
    """The data of a run, prepared for its loss: splits (standardized), the loss, the output size."""

    splits: datalib.Splits
    standardizer: datalib.Standardizer
    loss: str
    out_dim: int
    task: str
    num_classes: int | None
    feature_names: tuple


def _task_for_loss(loss: str | None) -> str | None:
    if loss is None:
        return None
    return "classification" if get_loss(loss).metric is not None else "regression"


def prepare_targets(y: np.ndarray, loss: str, num_classes: int | None) -> np.ndarray:
    """Targets in the form ``loss`` expects; raises ValueError for labels out of its range."""
    spec = get_loss(loss)
    if spec.name == "sigmoid_binary_cross_entropy":
        if y.ndim == 1:
            if y.size and (y.min() < 0 or y.max() > 1):
                raise ValueError(
                    f"labels out of range for {spec.name}: it needs labels 0 or 1, got {int(y.min())}..{int(y.max())}"
                )
            return y.astype(np.float32)[:, None]
        return y.astype(np.float32)
    if spec.integer_labels:
        if y.ndim != 1:
            raise ValueError(f"{spec.name} needs integer class labels, but the targets have shape {y.shape}")
        datalib.check_labels(y, num_classes)
        return y.astype(np.int32)
    if y.ndim == 1:
        return y.astype(np.float32)[:, None]
    return y.astype(np.float32)


def load_problem(config: TrainConfig) -> Problem:
    """Loads and splits the data of ``config``, fits standardization on the training split."""
    ds = datalib.load(
        dataset=config.dataset, data=config.data, target=config.target, seed=config.seed,
        task=_task_for_loss(config.loss),
    )
    loss = config.loss or ("softmax_cross_entropy" if ds.task == "classification" else "mse")
    loss = get_loss(loss).name
    splits = datalib.split(ds, config.val_split, config.test_split, config.seed)
    if config.standardize:
        standardizer = datalib.fit_standardizer(splits.train.x)
    else:
        d = ds.x.shape[1]
        standardizer = datalib.Standardizer(np.zeros(d, np.float32), np.ones(d, np.float32))

    def prepared(part):
        if part is None or len(part.x) == 0:
            return None
        return part._replace(x=datalib.standardize(part.x, standardizer), y=prepare_targets(part.y, loss, ds.num_classes))

    splits = datalib.Splits(prepared(splits.train), prepared(splits.val), prepared(splits.test))
    if LOSSES[loss].integer_labels:
        out_dim = ds.num_classes
    else:
        out_dim = splits.train.y.shape[1]
    return Problem(splits, standardizer, loss, out_dim, ds.task, ds.num_classes, tuple(ds.feature_names))


class RunResult(NamedTuple):
    """What :func:`run` returns: the trained model as it is saved, the history and the summary."""

    model: io.SavedModel
    history: list
    summary: dict


def model_meta(config: TrainConfig, problem: Problem) -> dict:
    """The JSON description saved with the params: enough to rebuild and use the model."""
    return {
        "sizes": [len(problem.feature_names), *config.hidden, problem.out_dim],
        "activation": config.activation,
        "output_activation": config.output_activation,
        "loss": problem.loss,
        "task": problem.task,
        "num_classes": problem.num_classes,
        "feature_names": list(problem.feature_names),
        "target": config.target,
        "config": config.to_dict(),
    }


def build_model(meta: dict):
    """The :class:`jaxnet.Model` a saved ``meta`` describes."""
    return mlp(meta["sizes"], activation=meta["activation"], output_activation=meta["output_activation"])


def run(
    config: TrainConfig,
    callbacks: Sequence[Callable[[FitState, Record], bool | None]] = (),
    resume: FitState | None = None,
    mesh=None,
    *,
    out: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep: int | None = 3,
) -> RunResult:
    """Runs ``config``: loads data, builds the MLP, trains with :func:`jaxnet.fit`, tests once.

    With a ``mesh`` (:func:`jaxnet.make_data_mesh`) training is data parallel over its devices; in
    a multi-process run each process trains on its own share of the training rows.
    With ``out``, checkpoints go to ``out/checkpoints`` (see :mod:`jaxnet.checkpoint`): every
    ``checkpoint_every`` epochs (if given) and after the last epoch, keeping the newest ``keep``;
    in a multi-process run every process passes the same (shared) ``out`` and orbax coordinates.
    ``resume`` continues a restored :class:`FitState` (:func:`jaxnet.checkpoint.restore`).

    Returns:
      A :class:`RunResult`; ``summary`` has the keys of ``jaxnet train --json``: dataset, epochs,
      train_loss, val_accuracy, test_accuracy (None for regression), seconds, steps_per_second.
    """
    from jaxnet import sweep

    if sweep.is_member_run(config):
        if resume is not None:
            raise ValueError("resuming is not supported for runs of several members (seeds, lrs)")
        return sweep.run_members(config, callbacks)
    start = time.perf_counter()
    problem = load_problem(config)
    meta = model_meta(config, problem)
    model = build_model(meta)
    optimizer = make_optimizer(config)
    init_key, shuffle_key = jax.random.split(jax.random.key(config.seed))
    train, val, test = problem.splits
    x, y = train.x, train.y
    if mesh is not None and jax.process_count() > 1:
        from jaxnet.parallel import global_rows, process_rows

        rows = process_rows(len(x))
        x, y = global_rows(x[rows], mesh), global_rows(y[rows], mesh)
    saver = None
    if out is not None:
        from jaxnet import checkpoint

        saver = checkpoint.Saver(out, config, meta, problem.standardizer, every=checkpoint_every, keep=keep,
                                 start_epoch=resume.epoch if resume is not None else 0)
        callbacks = [*callbacks, saver]
    state, history = fit(
        model, jax.jit(model.init)(init_key) if resume is None else resume.train.params, x, y,
        loss=problem.loss, optimizer=optimizer, epochs=config.epochs, batch_size=config.batch_size,
        key=shuffle_key, validation=(val.x, val.y) if val is not None else None, patience=config.patience,
        callbacks=callbacks, resume=resume, mesh=mesh, skip_nonfinite=config.skip_nonfinite,
        compute_dtype=None if config.dtype == "float32" else jnp.dtype(config.dtype),
    )
    if saver is not None:
        saver.finish()
    params = jax.tree.map(np.asarray, state.params)
    saved = io.SavedModel(meta, params, problem.standardizer.mean, problem.standardizer.std)
    # jit: one compiled program instead of compiling each operation eagerly (seconds on a CPU)
    evaluate_test = jax.jit(make_eval_fn(model, problem.loss))
    test_metrics = evaluate_test(params, (test.x, test.y)) if test is not None else {}
    summary = summarize(config, history, test_metrics, time.perf_counter() - start)
    return RunResult(saved, history, summary)


def summarize(config: TrainConfig, history: list, test_metrics: dict, seconds: float) -> dict:
    """The final figures of a run (the ``--json`` object)."""
    last = history[-1] if history else {}
    # Steps per second over the epochs after the first, which also pays for compilation.
    timed = history[1:] if len(history) > 1 else history
    steps = sum(r["steps"] for r in timed)
    busy = sum(r["seconds"] for r in timed)
    return {
        "dataset": config.dataset or Path(config.data).name,
        "epochs": len(history),
        "train_loss": last.get("train_loss"),
        "val_accuracy": last.get("val_accuracy"),
        "test_accuracy": float(test_metrics["accuracy"]) if "accuracy" in test_metrics else None,
        "seconds": seconds,
        "steps_per_second": steps / busy if busy > 0 else None,
    }


def load_features(saved: io.SavedModel, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads inputs for a saved model from CSV (columns by feature name) or ``.npz`` (``x``).

    Returns ``(x, y)`` with ``x`` standardized as in training; ``y`` is the target column or the
    npz's ``y`` when present, else None.
    """
    x, y = datalib.load_features(path, saved.meta["feature_names"], target=saved.meta.get("target"))
    expected = len(saved.meta["feature_names"])
    if x.shape[1] != expected:
        raise ValueError(f"{path} has {x.shape[1]} features but the model expects {expected}")
    return datalib.standardize(x, datalib.Standardizer(saved.mean, saved.std)), y


def predict(saved: io.SavedModel, x: np.ndarray) -> np.ndarray:
    """Model outputs for standardized inputs ``x: (n, d)``: class probabilities for classification
    losses (softmax, or sigmoid for binary cross-entropy), raw outputs for regression. A saved
    ensemble (meta ``members``) averages its members' probabilities (outputs for regression)."""
    if saved.meta.get("members"):
        from jaxnet import sweep

        return sweep.ensemble_predict(saved, x)
    model = build_model(saved.meta)
    outputs = jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(saved.params, jnp.asarray(x))
    return output_probabilities(outputs, saved.meta["loss"])


def output_probabilities(outputs, loss: str) -> np.ndarray:
    """Raw model outputs ``(n, out)`` as predictions: softmax or sigmoid probabilities for the
    classification losses, unchanged for regression."""
    if loss == "softmax_cross_entropy":
        outputs = jax.nn.softmax(outputs, axis=-1)
    elif loss == "sigmoid_binary_cross_entropy":
        outputs = jax.nn.sigmoid(outputs)
    return np.asarray(outputs)


def evaluate(saved: io.SavedModel, x: np.ndarray, y: np.ndarray) -> dict:
    """``{"loss", "accuracy"}`` of a saved model on standardized ``x`` and raw targets ``y``
    (accuracy None for regression). A saved ensemble is evaluated on its averaged predictions."""
    if saved.meta.get("members"):
        from jaxnet import sweep

        return sweep.ensemble_evaluate(saved, x, y)
    meta = saved.meta
    y = prepare_targets(np.asarray(y), meta["loss"], meta["sizes"][-1] if meta["num_classes"] else None)
    metrics = jax.jit(make_eval_fn(build_model(meta), meta["loss"]))(saved.params, (jnp.asarray(x), jnp.asarray(y)))
    return {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]) if "accuracy" in metrics else None}


def write_outputs(out: str | Path, result: RunResult) -> None:
    """Writes ``model.npz``, ``metrics.jsonl`` and ``curves.png`` (when matplotlib is installed)."""
    if "members" in result.summary:
        from jaxnet import sweep

        return sweep.write_member_outputs(out, result)
    out = Path(out)
    io.save_model(out, result.model)
    io.write_jsonl(out / "metrics.jsonl", result.history)
    from jaxnet import plot

    summary = result.summary
    title = summary["dataset"]
    if summary.get("test_accuracy") is not None:
        title += f": test accuracy {summary['test_accuracy']:.4f}"
    plot.plot_curves(result.history, out / "curves.png", title=title)


def write_metrics(out: str | Path, history: list) -> None:
    """Writes ``metrics.jsonl`` (one JSON line per epoch so far) into ``out``, atomically."""
    io.write_jsonl(Path(out) / "metrics.jsonl", history)
