"""A training run of many members (seeds x hyperparameters) in one compiled program.

:func:`run_members` is what :func:`jaxnet.train.run` does for a config with ``seeds > 1``, a
learning-rate list ``lrs`` or a weight-decay list ``weight_decays``: one data split (from
``config.seed``), K members whose init and shuffling come from their own seed (``seed, seed + 1,
...``), trained together by :func:`jaxnet.fit`. The best member (validation accuracy for
classification, validation loss for regression, final training loss without validation) is saved
as the model; with ``ensemble`` all members are saved and predictions average them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import io
from jaxnet import members as mem
from jaxnet import train as trainlib
from jaxnet.loop import FitState, Record, fit
from jaxnet.losses import batch_mean, get_loss
from jaxnet.step import make_eval_fn

_FACTORIES = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}
_PER_MEMBER = ("train_loss", "val_loss", "val_accuracy", "best_epoch", "skipped")


def grid_of(config: trainlib.TrainConfig) -> dict[str, list[float]]:
    """The swept hyperparameters of ``config``: ``learning_rate`` (and ``weight_decay`` for adamw)."""
    grid = {"learning_rate": list(config.lrs) or [config.lr]}
    if config.optimizer == "adamw":
        grid["weight_decay"] = list(config.weight_decays) or [config.weight_decay]
    return grid


def num_members(config: trainlib.TrainConfig) -> int:
    """K = seeds x number of values of each swept hyperparameter."""
    k = config.seeds
    for values in grid_of(config).values():
        k *= len(values)
    return k


def member_optimizer(config: trainlib.TrainConfig) -> optax.GradientTransformation:
    """``config``'s optimizer with its swept hyperparameters injected (set per member by ``fit``)."""
    return optax.inject_hyperparams(_FACTORIES[config.optimizer])(**{n: v[0] for n, v in grid_of(config).items()})


def member_records(history: list, grid: list[dict]) -> list[dict]:
    """``metrics.jsonl`` of a member run: one record per member per epoch it trained, with
    ``member`` (index), its ``seed`` and hyperparameters, and its scalar metrics."""
    out = []
    for record in history:
        for i, member in enumerate(grid):
            if record["train_loss"][i] is None:
                continue
            row = {"epoch": record["epoch"], "member": i, **member}
            row.update({name: record[name][i] for name in _PER_MEMBER if name in record})
            row.update(seconds=record["seconds"], steps=record["steps"])
            out.append(row)
    return out


def member_history(history: list, i: int) -> list[dict]:
    """Member ``i``'s history in the single-run form (scalar metrics, epochs it trained)."""
    out = []
    for record in history:
        if record["train_loss"][i] is None:
            break
        out.append({k: (v[i] if k in _PER_MEMBER else v) for k, v in record.items() if k != "best_epoch"})
    return out


def _check_memory(config, problem, model, optimizer, k: int) -> None:
    params = jax.eval_shape(model.init, jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, params)
    data = sum(part.x.nbytes + part.y.nbytes for part in problem.splits if part is not None)
    mem.check_memory(mem.estimate_member_bytes(params, opt_state, config.batch_size, k) + data, k)


def run_members(
    config: trainlib.TrainConfig,
    callbacks: Sequence[Callable[[FitState, Record], bool | None]] = (),
) -> trainlib.RunResult:
    """Trains every member of ``config``'s grid in one program; see the module docstring.

    Returns:
      A :class:`jaxnet.train.RunResult`: the best member's model (or the ensemble), all members'
      records (:func:`member_records`), and the summary of the best member (the keys of a single
      run) plus ``best_member``, ``monitor`` and ``members`` (one dict per member: ``seed``,
      hyperparameters, ``epochs``, ``best_epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``
      (at the best epoch), ``test_accuracy``).

    Raises:
      ValueError: the memory estimate of K members exceeds the device's (before compiling).
    """
    start = time.perf_counter()
    problem = trainlib.load_problem(config)
    meta = trainlib.model_meta(config, problem)
    model = trainlib.build_model(meta)
    optimizer = member_optimizer(config)
    k = num_members(config)
    _check_memory(config, problem, model, optimizer, k)
    grid = mem.member_grid(config.seeds, first_seed=config.seed, **grid_of(config))
    keys = jax.jit(jax.vmap(jax.random.split))(mem.member_keys([m["seed"] for m in grid]))
    init_keys, shuffle_keys = keys[:, 0], keys[:, 1]
    train, val, test = problem.splits
    hyperparams = {name: jnp.asarray([m[name] for m in grid], jnp.float32) for name in grid_of(config)}
    state, history = fit(
        model, mem.init_members(model, init_keys), train.x, train.y,
        loss=problem.loss, optimizer=optimizer, epochs=config.epochs, batch_size=config.batch_size,
        key=shuffle_keys, validation=(val.x, val.y) if val is not None else None, patience=config.patience,
        callbacks=callbacks, hyperparams=hyperparams,
        compute_dtype=None if config.dtype == "float32" else jnp.dtype(config.dtype),
    )
    classify = get_loss(problem.loss).metric is not None
    monitor = ("val_accuracy" if classify else "val_loss") if val is not None else "train_loss"
    best = mem.best_member(history, monitor)
    evaluate = jax.jit(jax.vmap(make_eval_fn(model, problem.loss), in_axes=(0, None)))
    tests = evaluate(state.params, (test.x, test.y)) if test is not None else {}
    seconds = time.perf_counter() - start
    summaries = []
    scores = {name: mem.member_scores(history, name) for name in ("val_loss", "val_accuracy") if name in history[0]}
    for i, member in enumerate(grid):
        own = member_history(history, i)
        entry = {"member": i, **member, "epochs": len(own), "train_loss": own[-1]["train_loss"] if own else None}
        if val is not None:
            entry["best_epoch"] = history[-1]["best_epoch"][i]
            entry.update({name: (None if np.isnan(v[i]) else v[i]) for name, v in scores.items()})
        entry["test_accuracy"] = float(tests["accuracy"][i]) if "accuracy" in tests else None
        summaries.append(entry)
    best_test = {name: v[best] for name, v in tests.items()}
    summary = trainlib.summarize(config, member_history(history, best), best_test, seconds)
    if summary["steps_per_second"] is not None:
        summary["model_steps_per_second"] = summary["steps_per_second"] * k  # each step updates K models
    summary.update(best_member=best, monitor=monitor, members=summaries)
    params = jax.tree.map(np.asarray, state.params)
    if config.ensemble:
        meta = dict(meta, members=k, grid=grid)
    else:
        params = mem.take_member(params, best)
        meta = dict(meta, member=dict(grid[best], index=best))
    saved = io.SavedModel(meta, params, problem.standardizer.mean, problem.standardizer.std)
    return trainlib.RunResult(saved, member_records(history, grid), summary)


def write_member_outputs(out: str | Path, result: trainlib.RunResult) -> None:
    """``model.npz``, ``metrics.jsonl`` (one line per member per epoch) and ``curves.png`` (the best
    member's curves) of a member run."""
    out = Path(out)
    io.save_model(out, result.model)
    io.write_jsonl(out / "metrics.jsonl", result.history)
    from jaxnet import plot

    best = result.summary["best_member"]
    curves = [{k: v for k, v in r.items() if k not in ("member", "seed")}
              for r in result.history if r["member"] == best]
    plot.plot_curves(curves, out / "curves.png")


def ensemble_outputs(saved: io.SavedModel, x: np.ndarray) -> np.ndarray:
    """The outputs of a saved ensemble (params with a leading member axis) on standardized ``x``:
    class probabilities averaged over members (returned as logits: the log of the average, so the
    model's loss and metric apply) for classification losses, averaged outputs for regression."""
    model = trainlib.build_model(saved.meta)
    apply = jax.jit(jax.vmap(jax.vmap(model.apply, in_axes=(None, 0)), in_axes=(0, None)))
    outputs = apply(saved.params, jnp.asarray(x))  # (K, n, out)
    loss = saved.meta["loss"]
    eps = 1e-7
    if loss == "softmax_cross_entropy":
        return np.asarray(jnp.log(jnp.clip(jnp.mean(jax.nn.softmax(outputs, axis=-1), axis=0), eps, 1.0)))
    if loss == "sigmoid_binary_cross_entropy":
        p = jnp.clip(jnp.mean(jax.nn.sigmoid(outputs), axis=0), eps, 1 - eps)
        return np.asarray(jnp.log(p) - jnp.log1p(-p))
    return np.asarray(jnp.mean(outputs, axis=0))


def ensemble_predict(saved: io.SavedModel, x: np.ndarray) -> np.ndarray:
    """What :func:`jaxnet.train.predict` returns, for a saved ensemble: averaged probabilities
    (classification) or averaged outputs (regression)."""
    return trainlib.output_probabilities(jnp.asarray(ensemble_outputs(saved, x)), saved.meta["loss"])


def ensemble_evaluate(saved: io.SavedModel, x: np.ndarray, y: np.ndarray) -> dict:
    """``{"loss", "accuracy"}`` of the averaged ensemble on standardized ``x`` and raw targets ``y``."""
    meta = saved.meta
    y = trainlib.prepare_targets(np.asarray(y), meta["loss"], meta["sizes"][-1] if meta["num_classes"] else None)
    spec = get_loss(meta["loss"])
    outputs = jnp.asarray(ensemble_outputs(saved, x))
    loss = float(batch_mean(spec.fn)(outputs, jnp.asarray(y)))
    accuracy = float(batch_mean(spec.metric)(outputs, jnp.asarray(y))) if spec.metric else None
    return {"loss": loss, "accuracy": accuracy}


def is_member_run(config: trainlib.TrainConfig) -> bool:
    """True when ``config`` trains more than one member (or asks for an ensemble)."""
    return num_members(config) > 1 or config.ensemble


def config_of_member(config: trainlib.TrainConfig, member: dict) -> trainlib.TrainConfig:
    """The single-run config of one member (its seed and hyperparameters; data split from it too)."""
    values = {"seed": member["seed"], "lr": member["learning_rate"], "seeds": 1, "lrs": (), "weight_decays": (),
              "ensemble": False}
    if "weight_decay" in member:
        values["weight_decay"] = member["weight_decay"]
    return dataclasses.replace(config, **values)


def format_members(summary: dict) -> str:
    """The members of a run's summary as a text table, one row per member, the best marked ``*``."""
    rows = summary["members"]
    names = [n for n in ("seed", "learning_rate", "weight_decay", "epochs", "best_epoch", "train_loss", "val_loss",
                         "val_accuracy", "test_accuracy") if any(r.get(n) is not None for r in rows)]
    header = ["member"] + [{"learning_rate": "lr"}.get(n, n) for n in names]

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [header] + [
        [f"{r['member']}{'*' if r['member'] == summary['best_member'] else ''}"] + [cell(r.get(n)) for n in names]
        for r in rows
    ]
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines) + f"\nbest member {summary['best_member']} (by {summary['monitor']})"
