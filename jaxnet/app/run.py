"""One run layer: a :class:`~jaxnet.app.config.TrainConfig` in, a trained model, history and summary out.

:func:`run` executes a config (a single run, a sweep or an ensemble: a member axis everywhere,
K = 1 for a single run) and, with ``out``, owns the run folder: one writer at a time, checkpoints,
``metrics.jsonl``, ``model.npz`` and ``curves.png``; running the same config into the same folder
again continues it from its newest checkpoint. :func:`resume` continues (or extends to more
epochs) the run in a folder from its own config.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import _atomic as atomic
from jaxnet import _checks as checks
from jaxnet import _weights as weights
from jaxnet import checkpoint, groups, loggers, lowrank, parallel, parts, sources, transfer
from jaxnet import members as memberlib
from jaxnet import sharding as shardinglib
from jaxnet._checks import ArgumentError
from jaxnet._checks import escape as checks_escape
from jaxnet.app import arch as archlib
from jaxnet.app import config as configlib
from jaxnet.app import files, plot, profiling, saved, tables
from jaxnet.app.config import MEMBER_FLAGS, MEMBER_RUNS, TrainConfig
from jaxnet.app.rundir import CONFIG_TOML, RunFolder
from jaxnet.app.task import Problem, describe_problem, load_problem, model_meta, with_batch_size
from jaxnet.callbacks import Checkpointer
from jaxnet.epoch import num_batches
from jaxnet.forward import AnyModel, init_model
from jaxnet.loop import (
    FitState,
    MemoryBudgetError,
    NonFiniteLossError,
    check_fit_memory,
    counts_padding,
    fit,
    fitting_batch_size,
    init_fit_state,
    is_finished,
)
from jaxnet.losses import with_label_smoothing
from jaxnet.step import init_state, make_train_step

Notify = Callable[..., None]
"""``notify(message, always=False)``: a one-line message for the user; ``always`` for the ones
that must show even when progress is off (a run continued, a checkpoint skipped as damaged)."""


class RunResult(NamedTuple):
    """What a run returns.

    Attributes:
      model: the trained model as saved (the best member, or every member of an ensemble).
      history: the ``metrics.jsonl`` rows: one per epoch (a line per member and epoch in a member run).
      summary: the final figures (the ``jaxnet train --json`` object).
      state: the final :class:`~jaxnet.loop.FitState` (resumable).
      finished: False when the run stopped before its end (a callback's stop, e.g. a signal).
    """

    model: files.SavedModel
    history: list
    summary: dict
    state: FitState
    finished: bool


ADAPTERS_FILE = "adapters.npz"
"""A LoRA run's adapters alone (``params/lora/<path>/a`` and ``/b``), beside its merged ``model.npz``."""
DATA_FILE = "data.json"
"""What reading a table did: rows left out, gaps filled, unseen categories (:func:`jaxnet.app.tables.report_json`)."""


class Job(NamedTuple):
    """A config made concrete: its data, model, optimizer and members."""

    config: TrainConfig
    problem: Problem
    meta: dict
    grid: list[dict]
    member_run: bool
    model: AnyModel
    start_weights: Any = None  # a transfer.Loaded from --init-from: the weights the run starts from

    @property
    def monitor(self) -> str:
        classify = self.problem.task == "classification"
        return ("val_accuracy" if classify else "val_loss") if self.problem.splits.val is not None else "train_loss"


def prepare(config: TrainConfig, cache: Path | None = None, mesh=None, resuming: bool = False) -> Job:
    """Loads the data of ``config`` and describes its model and members; refuses a run whose
    estimated memory exceeds the device's before anything is allocated. A text's tokens are cached
    in ``cache`` (the run folder; ``resuming`` its run: with its own tokenizer). A batch size
    ``auto`` is resolved for ``mesh`` (the job's config holds the number)."""
    problem = load_problem(config, cache, resuming)
    class_weight_of(config, problem)
    meta = model_meta(config, problem)
    model = archlib.build_model(meta, config.arch)
    if config.lora_rank is not None:  # the base's weights get adapters; only they train
        model = lowrank.lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    one, one_state = jax.eval_shape(lambda: init_model(model, jax.random.key(0)))
    if config.batch_size == "auto":
        config = _fitting_batch(config, problem, model, (one, one_state), mesh)
        problem = with_batch_size(problem, config)
    _check_source_inputs(config, meta)
    if config.no_decay is not None:
        groups.check_matches("no_decay", config.no_decay, one)
    start = _start_weights(config, one)
    # what fit places on the device (lazy rows, read in chunks, are not placed)
    parts = [part for part in problem.splits if part is not None and sources.is_resident(part.x)]
    data = sum(part.x.nbytes + part.y.nbytes for part in parts)
    batch = min(config.batch_size, len(problem.splits.train.x))  # fit clamps a batch to the rows
    check_fit_memory(one, configlib.make_optimizer(config), batch, configlib.grid_size(config), data)
    members, member_run = configlib.members(config), configlib.is_member_run(config)
    return Job(config, problem, meta, members, member_run, model, start)


def _fitting_batch(config: TrainConfig, problem: Problem, model, variables, mesh) -> TrainConfig:
    """``config`` with its batch size ``auto`` resolved (:func:`jaxnet.fitting_batch_size`)."""
    train, c = problem.splits.train, config
    found = fitting_batch_size(
        model, variables[0], train.x, train.y, loss=with_label_smoothing(problem.loss, c.label_smoothing),
        optimizer=configlib.make_optimizer(dataclasses.replace(c, batch_size=1)), memory_budget=c.memory_budget,
        mesh=mesh, sharding=sharding_rules(c, mesh), accumulate=c.accumulate, device_invariant=c.device_invariant,
        model_state=variables[1],
        compute_dtype=compute_dtype(c),
    )  # fmt: skip
    return dataclasses.replace(config, batch_size=found)


def compute_dtype(config: TrainConfig):
    """The dtype steps compute in (None: float32 throughout)."""
    return None if config.dtype == "float32" else jnp.dtype(config.dtype)


def sharding_rules(config: TrainConfig, mesh) -> list | None:
    """``--shard``'s ``REGEX=SPEC`` rules as ``fit(sharding=)`` takes them on ``mesh``; None
    without a mesh: a run resumed on one device holds its params whole (a new run is refused)."""
    if mesh is None:
        return None
    return [tuple(rule.rsplit("=", 1)) for rule in config.shard] or None


def _check_source_inputs(config: TrainConfig, meta: dict) -> None:
    """``--init-from`` a jaxnet model: it must read the features this data gives (by name, in
    order: a table's columns, their categories) and predict the same classes, since its weights are
    matched by position; else they would meet other features, silently."""
    source = files.saved_meta(config.init_from) if config.init_from is not None else None
    for field, what, many in (("feature_names", "feature", "features"), ("classes", "class", "classes")):
        theirs, ours = (source or {}).get(field), meta.get(field)
        if theirs is None or ours is None or list(theirs) == list(ours):
            continue
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ArgumentError(
            f"{{0}} {checks.escape(config.init_from)}: its model reads {len(theirs)} {many} and this data gives "
            f"{len(ours)}; {what} {at + 1} is {_nth(theirs, at)} there and {_nth(ours, at)} here. Its weights meet "
            f"them by position: give data with its columns, in its order, and its categories (or train from scratch)",
            "init_from",
        )


def _nth(names: Sequence, at: int) -> str:
    return checks.literal(names[at]) if at < len(names) else "none"


def _start_weights(config: TrainConfig, shapes) -> transfer.Loaded | None:
    """The weights of ``--init-from``, matched to the params' ``shapes`` (the base's, under LoRA);
    their leaves the source lacks stay shapes (``--init-partial``: the fresh values fill them)."""
    if config.init_from is None:
        return None
    rename = dict(rule.rsplit("=", 1) for rule in config.init_rename)
    template = shapes["base"] if config.lora_rank is not None else shapes
    return transfer.load_params(config.init_from, template, rename=rename, partial=config.init_partial)


class _Start(NamedTuple):
    params: Any
    model_state: Any
    key: Any
    hyperparams: dict | None


def _fresh(job: Job) -> _Start:
    """The params, model state, key and hyperparameters of a new run, made in one compiled call.
    Each member's init and shuffling keys come from its own seed, as in a run of that seed alone."""

    def init(key):
        return init_model(job.model, key)

    def make(seeds):
        split = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(seeds)  # (K, 2) keys
        init_keys, keys = split[:, 0], split[:, 1]
        if not job.member_run:
            return init(init_keys[0]), keys[0]
        return jax.vmap(init)(init_keys), keys

    seeds = np.asarray([m["seed"] for m in job.grid], np.uint32)
    (params, model_state), key = jax.jit(make)(seeds)
    if job.start_weights is not None:
        params = _started(params, job.start_weights.params, job.config.lora_rank is not None)
    if not job.member_run:
        return _Start(params, model_state, key, None)
    names = configlib.hyperparameter_grid(job.config)
    return _Start(
        params, model_state, key, {name: np.asarray([m[name] for m in job.grid], np.float32) for name in names}
    )


def _started(fresh, loaded, adapted: bool):
    """``fresh`` params with the loaded weights in place (where a leaf was loaded; in each member
    of a member run)."""

    def take(new, old):  # a member run: every member starts from the same weights
        return new if isinstance(old, jax.ShapeDtypeStruct) else jnp.broadcast_to(jnp.asarray(old), new.shape)

    if adapted:
        return dict(fresh, base=jax.tree.map(take, fresh["base"], loaded))
    return jax.tree.map(take, fresh, loaded)


def class_weight_of(config: TrainConfig, problem: Problem):
    """``config.class_weight`` for ``problem``: class names turned into labels (checked when the
    job is prepared, before anything is said or run)."""
    given = weights.parse_class_weight(config.class_weight, problem.classes)
    named = [k for k in given if isinstance(k, str)] if isinstance(given, dict) else []
    if named:
        raise ArgumentError(f"{{0}} names the class {checks.escape(repr(named[0]))}, but the labels are numbers: "
                            "give them as label:weight, such as 0:1,1:5", "class_weight")  # fmt: skip
    return given


def template(job: Job) -> FitState:
    """The abstract :class:`FitState` of ``job`` (shapes and dtypes), for restoring checkpoints."""
    optimizer = configlib.make_optimizer(job.config)

    def build():
        start = _fresh(job)
        return init_fit_state(
            start.params,
            optimizer,
            start.key,
            skip_nonfinite=job.config.skip_nonfinite,
            hyperparams=start.hyperparams,
            model_state=start.model_state,
        )

    return jax.eval_shape(build)


def _local_rows(job: Job, mesh):
    """The training rows this process holds: all of them, or its share as one global array."""
    train = job.problem.splits.train
    if mesh is None or jax.process_count() == 1 or not sources.is_resident(train.x):
        return train.x, train.y  # lazy rows: fit reads each process's share of every batch
    rows = parallel.process_rows(len(train.x))
    return parallel.global_rows(train.x[rows], mesh), parallel.global_rows(train.y[rows], mesh)


def optimizer_of(job: Job):
    """The run's optimizer, its schedule spanning the run's batches."""
    c = job.config
    return configlib.make_optimizer(c, num_batches(len(job.problem.splits.train.x), c.batch_size))


def loss_of(job: Job):
    """The loss training minimizes: the task's, its labels smoothed when the config asks."""
    return with_label_smoothing(job.problem.loss, job.config.label_smoothing)


def profile(job: Job, logdir: Path) -> Path:
    """A profiler trace of a few training steps of ``job`` (its first member) on its first
    training batches, into ``logdir`` (:func:`jaxnet.app.profiling.trace_steps`)."""
    start, c = _fresh(job), job.config
    params, model_state, key = start.params, start.model_state, start.key
    if job.member_run:
        params, model_state, key = jax.tree.map(lambda a: a[0], (params, model_state, key))
    optimizer = optimizer_of(job)
    step = make_train_step(job.model, loss_of(job), optimizer, compute_dtype=compute_dtype(c))
    train_rows = job.problem.splits.train
    n, b = len(train_rows.x), min(c.batch_size, len(train_rows.x))
    starts = [(i * b) % max(n - b + 1, 1) for i in range(profiling.STEPS + 1)]
    batches = [(np.asarray(train_rows.x[s : s + b]), np.asarray(train_rows.y[s : s + b])) for s in starts]
    return profiling.trace_steps(step, init_state(params, optimizer, key, model_state), batches, logdir)


def train(
    job: Job,
    resume: FitState | None = None,
    callbacks: Sequence = (),
    mesh=None,
    chunk_steps: int | None = None,
    log_steps: int | None = None,
) -> FitState:
    """Trains ``job`` with :func:`jaxnet.fit` (from scratch, or on from ``resume``), epochs in
    chunks of at most ``chunk_steps`` steps when given, every ``log_steps``-th step logged."""
    c, val = job.config, job.problem.splits.val
    if job.member_run and mesh is not None:
        raise ArgumentError(MEMBER_RUNS + " train on one device: drop {4}", *MEMBER_FLAGS, "devices")
    start = _fresh(job) if resume is None else _Start(None, None, None, None)
    x, y = _local_rows(job, mesh)
    # A library's batch norm would count the padding of a partial batch: each epoch leaves its last
    # partial batch out instead (shuffled, its rows train in other epochs).
    drop = counts_padding(job.model, start.model_state if resume is None else resume.train.model_state)
    return fit(
        job.model,
        start.params,
        x,
        y,
        loss=loss_of(job),
        optimizer=optimizer_of(job),
        epochs=c.epochs,
        steps=c.steps,
        eval_every=c.eval_every,
        batch_size=c.batch_size,
        key=start.key,
        validation=(val.x, val.y) if val is not None else None,
        patience=c.patience,
        callbacks=callbacks,
        resume=resume,
        mesh=mesh,
        skip_nonfinite=c.skip_nonfinite,
        hyperparams=start.hyperparams,
        model_state=start.model_state,
        compute_dtype=compute_dtype(c),
        chunk_steps=chunk_steps,
        metrics=list(c.metrics) or None,
        class_weight=class_weight_of(c, job.problem),
        sharding=sharding_rules(c, mesh),
        accumulate=c.accumulate,
        device_invariant=c.device_invariant,
        memory_budget=c.memory_budget,
        peak_tflops=c.peak_tflops,
        log_every_steps=log_steps,
        drop_remainder=drop,
    )


def member_history(history: list, i: int) -> list[dict]:
    """Member ``i``'s records in the single-run form (scalars), for the epochs it trained; a
    single run's history is its own."""
    out = []
    for record in history:
        if isinstance(record["train_loss"], list):
            if record["train_loss"][i] is None:
                break
            record = {k: (v[i] if isinstance(v, list) else v) for k, v in record.items()}
        out.append(record)
    return out


def metrics_rows(job: Job, history: list) -> list[dict]:
    """The rows of ``metrics.jsonl``: a single run's records, or one row per member and epoch
    (``member``, its ``seed`` and hyperparameters, then its scalar metrics)."""
    if not job.member_run:
        return list(history)
    rows = []
    for i, member in enumerate(job.grid):
        for record in member_history(history, i):
            rows.append({"member": i, **member, **record})
    return sorted(rows, key=lambda r: (r["epoch"], r["member"]))


_PLAIN_VAL = ("val_loss", "val_accuracy", "val_seconds")
"""Validation fields every run reports on their own; the others are named metrics (``--metrics``)."""


def _in_steps(entry: dict, last: dict, best: dict) -> dict:
    """A run by steps' entry: its rounds (of ``eval_every`` steps), its steps and the step of its
    best validation, instead of epochs and a best epoch."""
    out = {k: v for k, v in entry.items() if k not in ("epochs", "best_epoch")}
    out.update(rounds=entry["epochs"], steps=last.get("step"))
    if "best_epoch" in entry:
        out["best_step"] = best.get("step") if entry["best_epoch"] else None
    return out


def _member_entries(job: Job, history: list, tests: list[dict]) -> list[dict]:
    """One summary entry per member: its seed and hyperparameters, epochs, best figures, test metrics."""
    entries = []
    for i, member in enumerate(job.grid):
        own = member_history(history, i)
        last = own[-1] if own else {}
        best = own[last["best_epoch"] - 1] if last.get("best_epoch") else last
        entry = {"member": i, **member, "epochs": len(own), "train_loss": last.get("train_loss")}
        if job.problem.splits.val is not None:
            entry.update(
                best_epoch=last.get("best_epoch"),
                val_loss=best.get("val_loss"),
                val_accuracy=best.get("val_accuracy"),
            )
            entry.update({k: v for k, v in best.items() if k.startswith("val_") and k not in _PLAIN_VAL})
        for name in ("skipped", "spikes"):  # updates skipped as non-finite, loss spikes skipped
            if any(name in r for r in own):
                entry[name] = sum(r[name] for r in own)
        entry.update({f"test_{name}": value for name, value in tests[i].items()} if tests else {})
        entries.append(_in_steps(entry, last, best) if job.config.steps is not None else entry)
    return entries


def _utilization(history: list) -> dict:
    """``flops_per_second`` and ``mfu``, medians over the records after the first (which also pays
    for compilation), when the run measured them."""
    timed = [r for r in (history[1:] if len(history) > 1 else history) if r.get("mfu") is not None]
    if not timed:
        return {}
    return {name: statistics.median(r[name] for r in timed) for name in ("flops_per_second", "mfu")}


def _speed(history: list) -> float | None:
    """Training steps per second (validation left out) over the epochs after the first, which
    also pays for compilation."""
    timed = history[1:] if len(history) > 1 else history
    busy = sum(r["seconds"] - r.get("val_seconds", 0.0) for r in timed)
    return sum(r["steps"] for r in timed) / busy if busy > 0 else None


def summarize(job: Job, state: FitState, seconds: float) -> tuple[dict, int]:
    """``(summary, best)``: the run's final figures and the index of its best member."""
    test, k, c = job.problem.splits.test, len(job.grid), job.config
    variables = (state.params, state.model_state)
    if not job.member_run:
        variables = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
    bound = archlib.Bound(job.model, *variables)
    scaler = job.problem.target_scaler
    tests = saved.member_metrics(job.meta, bound, test.x, test.y, scaler, c.metrics) if test is not None else []
    best = memberlib.best_member(state.history, job.monitor, c.metrics or ()) if job.member_run else 0
    entries = _member_entries(job, state.history, tests)
    summary = {
        "dataset": c.dataset or Path(c.data).name,
        "task": job.problem.task,
        "epochs": entries[best].get("epochs"),  # (None in a run by steps)
        "train_loss": entries[best]["train_loss"],
        "val_loss": entries[best].get("val_loss"),
        "val_accuracy": entries[best].get("val_accuracy"),
        "best_epoch": entries[best].get("best_epoch"),  # the epoch of val_* (and of the saved params)
        "batch_size": c.batch_size,  # (a batch size 'auto' as the number it became)
        "test_accuracy": None,
    }
    counts = ("skipped", "spikes")
    summary.update({name: v for name, v in entries[best].items() if name.startswith("test_") or name in counts})
    summary.update({k: v for k, v in entries[best].items() if k.startswith("val_") and k not in _PLAIN_VAL})
    if c.steps is not None:  # a run by steps records rounds of eval_every steps, not epochs
        del summary["best_epoch"]
        summary.update({k: entries[best].get(k) for k in ("rounds", "steps", "best_step")})
    summary.update(seconds=seconds, train_seconds=sum(r["seconds"] for r in state.history))
    summary.update(steps_per_second=_speed(state.history), **_utilization(state.history))
    if job.problem.report is not None:  # what reading the table did (also the run folder's data.json)
        summary["data"] = tables.report_json(job.problem.report, job.problem.encoder)
    summary.update(_parameter_counts(job))
    if job.problem.task == "lm":
        summary.update(_language_model_figures(job, state, best, summary["steps_per_second"]))
    if job.member_run:
        if summary["steps_per_second"] is not None:
            summary["model_steps_per_second"] = summary["steps_per_second"] * k  # each step updates K models
        summary.update(best_member=best, monitor=job.monitor, members=entries)
    return summary, best


def _language_model_figures(job: Job, state: FitState, best: int, steps_per_second: float | None) -> dict:
    """A language model's final figures: the steps, the last evaluation's validation loss and
    perplexity (at the final step), the best one and its step, tokens per second and parameters."""
    history = member_history(state.history, best)
    last = history[-1] if history else {}
    c = job.config
    out = {"steps": last.get("step"), "val_loss": last.get("val_loss")}
    if last.get("val_loss") is not None:
        top = history[last["best_epoch"] - 1]
        out.update(val_perplexity=math.exp(last["val_loss"]), best_val_loss=top["val_loss"], best_step=top["step"])
    out["tokens_per_second"] = None if steps_per_second is None else steps_per_second * c.batch_size * c.context
    return out


def _parameter_counts(job: Job) -> dict:
    """``parameters`` of the model (of one member; under LoRA the base's and the adapters') and how
    many of them train, ``trainable_parameters`` (all but the frozen ones: LoRA's adapters alone)."""
    c = job.config
    params = jax.eval_shape(lambda: init_model(job.model, jax.random.key(0))[0])
    trainable = groups.trainable_count(params, freeze=c.freeze, trainable="^lora/" if c.lora_rank is not None else None)
    return {"parameters": groups.trainable_count(params), "trainable_parameters": trainable}


def _merged(job: Job, params):
    """The params of the saved architecture: LoRA's adapters folded into the base."""
    c = job.config
    if c.lora_rank is None:
        return params
    return lowrank.merge(params, (c.lora_alpha or c.lora_rank) / c.lora_rank)


def saved_model(job: Job, state: FitState, best: int) -> files.SavedModel:
    """The model to save: the run's params, the best member of a sweep, or every member of an ensemble."""
    variables, meta = (_merged(job, state.params), state.model_state), job.meta
    if job.config.ensemble:
        meta = dict(meta, members=len(job.grid), grid=job.grid)
    elif job.member_run:
        variables, meta = (
            memberlib.take_member(variables, best),
            dict(meta, member=dict(job.grid[best], index=best)),
        )
    mean, std = job.problem.standardizer
    target = job.problem.target_scaler or (None, None)
    params, model_state = (archlib.flat_arrays(tree) for tree in variables)
    return files.SavedModel(meta, params, mean, std, *target, state=model_state)


def write_outputs(folder: RunFolder, job: Job, result: RunResult) -> None:
    """Writes ``model.npz``, ``metrics.jsonl`` and ``curves.png`` (the best member's curves); a
    language model's tokenizer is in its ``model.npz`` and in ``tokenizer.json`` beside it."""
    files.save_model(folder.path, result.model)
    if job.config.lora_rank is not None:  # the adapters alone, beside the merged model
        adapters = archlib.flat_arrays({"lora": result.state.params["lora"]})
        with atomic.atomic_path(folder.path / ADAPTERS_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{f"params/{k}": v for k, v in adapters.items()})
    atomic.write_jsonl(folder.path / "metrics.jsonl", result.history)
    if "data" in result.summary:
        atomic.write_text(folder.path / DATA_FILE, json.dumps(result.summary["data"], indent=1) + "\n")
    best = result.summary.get("best_member", 0)
    title = result.summary["dataset"]
    if result.summary.get("test_accuracy") is not None:
        title += f": test accuracy {result.summary['test_accuracy']:.4f}"
    plot.plot_curves(member_history(result.state.history, best), folder.path / "curves.png", title=title)


def _norms(job: Job) -> dict:
    """The data's standardization, as JSON: a resume checks that the data is still the same."""
    p = job.problem
    pairs = {"mean": p.standardizer.mean, "std": p.standardizer.std}
    if p.target_scaler is not None:
        pairs.update(target_mean=p.target_scaler.mean, target_std=p.target_scaler.std)
    return {name: np.asarray(v, np.float32).tolist() for name, v in pairs.items()}


def _loggers(job: Job, folder: RunFolder, names) -> list:
    """The run's loggers (``--log``), made in the process that writes (process 0)."""
    if not names or not parallel.is_primary():
        return []
    return loggers.make_loggers(names, folder.path, job.config.to_dict())


def _close_loggers(made: list, folder: RunFolder | None, status: str) -> None:
    for logger in made:
        if hasattr(logger, "log_artifacts") and folder is not None and status == "FINISHED":
            names = (files.MODEL_FILE, "curves.png", "metrics.jsonl", "config.json")
            logger.log_artifacts([folder.path / name for name in names])
        if hasattr(logger, "close"):
            logger.close(status)


class Cadence(NamedTuple):
    """When a run checkpoints: every ``every`` epochs, every ``steps`` steps (inside epochs, which
    then run in chunks of that many steps), keeping the newest ``keep``; every how many steps of
    an epoch it logs (``log_steps``), and to which loggers (``log``, their names); None: not
    given. A resume keeps what it is not given anew (a run that logged to TensorBoard goes on
    logging there)."""

    every: int | None = None
    keep: int | None = None
    steps: int | None = None
    log_steps: int | None = None
    log: str | None = None

    def given_over(self, stored: dict) -> Cadence:
        """This schedule, with what was not given taken from a checkpoint's stored one."""
        return Cadence(*(v if v is not None else stored.get(name) for name, v in self._asdict().items()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How :func:`run` and :func:`resume` train and what they write, besides the config.

    Attributes:
      callbacks: :func:`jaxnet.fit` callbacks.
      mesh: a device mesh (:func:`jaxnet.make_data_mesh`) for data-parallel training; in a
        multi-process run each process trains on its own share of the training rows.
      checkpoint_every: with ``out``, checkpoint every N epochs (always after the last one).
      checkpoint_steps: with ``out``, also checkpoint every N optimizer steps, inside epochs (each
        epoch then runs in chunks of at most N steps); a resume continues from that step exactly.
      keep: keep the newest ``keep`` checkpoints (default 3).
      log: loggers by name (:func:`jaxnet.loggers.parse`), writing under ``out``.
      log_steps: log every ``log_steps``-th step of each epoch (loss, gradient norm, learning
        rate) to the loggers and callbacks (:func:`jaxnet.fit`'s ``log_every_steps``).
      trace: with ``out``, first write a profiler trace of a few training steps into
        ``out/profile`` (:func:`profile`; TensorBoard's profile plugin opens it).
      notify: called with one-line messages (continuing, damaged checkpoints).
    """

    callbacks: Sequence = ()
    mesh: Any = None
    checkpoint_every: int | None = None
    keep: int | None = None
    checkpoint_steps: int | None = None
    log: Any = None
    log_steps: int | None = None
    trace: bool = False
    notify: Notify | None = None

    @property
    def cadence(self) -> Cadence:
        """When the run checkpoints and logs (None: not given)."""
        log = self.log  # names, checked where the loggers are made
        names = ",".join(map(str, log)) if isinstance(log, (tuple, list)) else log
        names = names or None
        return Cadence(self.checkpoint_every, self.keep, self.checkpoint_steps, self.log_steps, names)


def _metadata(job: Job, schedule: Cadence) -> dict:
    return {
        "config": job.config.to_dict(),
        "model": job.meta,
        "schedule": schedule._asdict(),
        "norm": _norms(job),
    }


class _MetricsWriter:
    """Rewrites ``metrics.jsonl`` after every epoch (atomically), so a crash keeps the epochs done."""

    def __init__(self, folder: RunFolder, job: Job):
        self.folder, self.job = folder, job

    def __call__(self, state: FitState, record) -> None:
        atomic.write_jsonl(self.folder.path / "metrics.jsonl", metrics_rows(self.job, state.history))


def _execute(
    job: Job,
    folder: RunFolder | None,
    state: FitState | None,
    callbacks: Sequence,
    mesh,
    schedule: Cadence,
    log=None,
    trace: bool = False,
) -> RunResult:
    """Trains ``job`` (on from ``state``), writing into ``folder`` when given (first a profiler
    trace of a few steps into ``folder/profile`` with ``trace``); returns the result."""
    start = time.perf_counter()
    callbacks = list(callbacks)
    if trace and folder is not None and parallel.is_primary():
        profile(job, folder.path / "profile")
    made = _loggers(job, folder, log) if folder is not None else []
    try:
        result = _train_and_write(job, folder, state, callbacks + made, mesh, schedule, start)
    except BaseException:
        _close_loggers(made, folder, "FAILED")
        raise
    _close_loggers(made, folder, "FINISHED")
    return result


def _train_and_write(job, folder, state, callbacks, mesh, schedule, start) -> RunResult:
    primary = parallel.is_primary()
    if folder is not None:
        if primary:
            callbacks.append(_MetricsWriter(folder, job))
        saver = Checkpointer(
            folder.checkpoints,
            every=schedule.every,
            keep=schedule.keep,
            every_steps=schedule.steps,
            metadata=_metadata(job, schedule),
        )
        callbacks.append(saver)
    try:
        state = train(job, state, callbacks, mesh, schedule.steps, schedule.log_steps)
    except NonFiniteLossError as e:
        raise _nonfinite(e, folder, job.config.steps is not None) from None
    summary, best = summarize(job, state, time.perf_counter() - start)
    finished = _finished(state, job.config)
    result = RunResult(saved_model(job, state, best), metrics_rows(job, state.history), summary, state, finished)
    if folder is not None and primary:
        write_outputs(folder, job, result)
    return result


def _nonfinite(error: NonFiniteLossError, folder: RunFolder | None, by_steps: bool) -> NonFiniteLossError:
    """``error`` with the run's last good checkpoint, or how to have one next time."""
    last = checkpoint.latest(folder.checkpoints) if folder is not None else None
    if last is not None:
        where, names = checks_escape(f"; last good checkpoint: {last}"), ()
    elif folder is None:
        where, names = "; no checkpoint was saved (use {1} DIR)", ("out",)
    else:
        where, names = "; no checkpoint was saved before it (save every N steps: {1} N)", ("checkpoint_steps",)
    return NonFiniteLossError(error.epoch, error.step, where, names, by_steps)


def _owned(folder: RunFolder):
    """The folder's lock in the process that writes (process 0), nothing in the others."""
    return folder.lock() if parallel.is_primary() else contextlib.nullcontext()


def _say(notify: Notify | None, message: str, always: bool = True) -> None:
    if notify is not None and parallel.is_primary():
        notify(message, always)


def _announce(notify: Notify | None, job: Job, asked: TrainConfig) -> None:
    """The run's first lines: its task and data, what reading a table did to it, the batch size
    that ``auto`` (in the config ``asked``) became, and what ``--init-partial`` left fresh."""
    problem = job.problem
    _say(notify, describe_problem(problem), always=False)
    if asked.batch_size == "auto":
        budget = "--memory-budget" if asked.memory_budget is not None else "the device's memory"
        _say(notify, f"batch size auto: {job.config.batch_size}, the largest power of two whose training step fits "
                     f"{budget} (XLA's memory analysis)", always=False)  # fmt: skip
    if problem.report is not None:
        for line in tables.report_lines(problem.report, problem.encoder, Path(job.config.data).name):
            _say(notify, line, always=False)
    loaded = job.start_weights
    if loaded is not None and (loaded.fresh or loaded.unused):  # (--init-partial: else both are refused)
        fresh, unused = (shardinglib.listed(names) or "none" for names in (loaded.fresh, loaded.unused))
        _say(notify, f"--init-from {job.config.init_from}: {len(loaded.loaded)} params loaded; {len(loaded.fresh)} "
                     f"kept their fresh initialization ({fresh}); {len(loaded.unused)} arrays of the source unused "
                     f"({unused})")  # fmt: skip


def _check_same_data(job: Job, metadata: dict, folder: RunFolder) -> None:
    now, then = _norms(job), metadata["norm"]
    for name in sorted(set(now) | set(then)):
        if now.get(name) != then.get(name):
            raise ValueError(
                f"cannot resume: the data of {folder.path} changed since the checkpoint (its standardization "
                f"{name.replace('_', ' ')} differs): restore the data, or train into another folder"
            )


def _continue(
    folder: RunFolder, config: TrainConfig, callbacks, mesh, schedule, notify, log=None, trace=False
) -> RunResult:
    """Continues the run in ``folder`` from its newest usable checkpoint (everything is checked
    before anything in the folder changes)."""
    job = prepare(config, folder.path, mesh, resuming=True)
    restored = checkpoint.restore(folder.checkpoints, template(job), mesh=mesh, sharding=sharding_rules(config, mesh))
    _check_same_data(job, restored.metadata, folder)
    _announce(notify, job, config)
    for path, reason in restored.damaged:
        _say(notify, f"checkpoint {path.name} is damaged ({reason}); resuming from {restored.path.name}")
    schedule = schedule.given_over(restored.metadata.get("schedule", {}))
    log = log if log is not None else schedule.log
    epoch, inside = restored.state.epoch, restored.state.position is not None
    if config.steps is not None and config.steps < restored.state.steps:
        raise ArgumentError(
            f"the run in {checks_escape(folder.path)} has trained {restored.state.steps} steps, more than {{0}} "
            f"{config.steps}: give {{0}} above it to extend it (or train into another folder)",
            "steps",
        )
    if config.steps is None and config.epochs < epoch + inside:
        raise ArgumentError(
            f"the run in {checks_escape(folder.path)} has trained {epoch + inside} epochs"
            f"{' (the last in part)' if inside else ''}, more than {{0}} {config.epochs}: give {{0}} above "
            f"{epoch} to extend it (or train into another folder)",
            "epochs",
        )
    _check_not_stopped_early(folder, restored.state, config)
    if _finished(restored.state, config):
        at = f"step {restored.state.steps}" if config.steps is not None else f"epoch {epoch}"
        _say(notify, f"{folder.path} already finished at {at}; not training further")
    else:
        where = _where(restored.state, config.steps is not None)
        _say(notify, f"continuing the run in {folder.path} from its checkpoint {where}")
    if parallel.is_primary():
        checkpoint.set_aside(folder.checkpoints, restored.state.steps)
        folder.write_config(config.to_dict())
    try:
        return _execute(job, folder, restored.state, callbacks, mesh, schedule, log, trace)
    except MemoryBudgetError as e:  # the run keeps its batch, remat and microbatches: what is left
        if e.figures is None:
            raise
        raise ArgumentError(
            checks_escape(e.figures) + ": resume it on more devices ({0} with a larger fsdp axis), or give {1} anew "
            "where the machine has more",
            "mesh", "memory_budget",
        ) from None  # fmt: skip


def _check_not_stopped_early(folder: RunFolder, state: FitState, config: TrainConfig) -> None:
    """Refuses to extend a run that early stopping ended: more epochs would train it no further
    (and its config would claim them)."""
    asked = config.steps is None and config.epochs != (folder.stored_config() or {}).get("epochs")
    if asked and state.epoch < config.epochs and _finished(state, config):
        raise ArgumentError(
            f"the run in {checks_escape(folder.path)} stopped early at epoch {state.epoch}: its validation figure "
            f"had not improved for {config.patience} epochs ({{1}} {config.patience}), so more {{0}} would not train "
            f"it: start a new run from its weights (--init-from {checks_escape(folder.path)})",
            "epochs",
            "patience",
        )


def _finished(state: FitState, config: TrainConfig) -> bool:
    """Whether the run of ``config`` at ``state`` would train no further."""
    return is_finished(state, epochs=config.epochs, patience=config.patience, steps=config.steps)


def _where(state: FitState, by_steps: bool = False) -> str:
    """Where a checkpoint stands, for a message: ``of epoch 3``, ``inside epoch 4 (step 120 of it)``,
    ``at step 500`` (a run by steps)."""
    if by_steps:
        return f"at step {state.steps}"
    if state.position is None:
        return f"of epoch {state.epoch}"
    return f"inside epoch {state.epoch + 1} (after its step {state.position.steps})"


def run(config: TrainConfig, *, out: str | Path | None = None, overwrite: bool = False, **options) -> RunResult:
    """Runs ``config``: loads data, builds the model, trains every member with :func:`jaxnet.fit`, tests.

    Args:
      config: the run (single, sweep or ensemble).
      out: the run folder. It is locked while the run writes it (a second writer is refused);
        if it already holds this config's run, that run continues from its newest checkpoint
        (a requeued job picks up where it stopped); another run's folder is refused unless
        ``overwrite``.
      overwrite: replace the run that ``out`` holds.
      options: the fields of :class:`RunOptions` (callbacks, mesh, checkpoints, loggers, trace, notify).

    Returns:
      A :class:`RunResult`.
    """
    o = RunOptions(**options)
    _check_layout(config, o.mesh, resuming=False)
    callbacks, mesh, notify, log, trace = o.callbacks, o.mesh, o.notify, o.log, o.trace
    if o.log_steps is not None and configlib.is_member_run(config):
        raise ArgumentError(MEMBER_RUNS + " do not log steps: drop {4}", *MEMBER_FLAGS, "log_steps")
    if out is None:
        job = prepare(config, mesh=mesh)
        _announce(notify, job, config)
        return _execute(job, None, None, callbacks, mesh, Cadence(steps=o.checkpoint_steps, log_steps=o.log_steps))
    folder = _checked_folder(out, o)
    schedule = o.cadence
    _check_log(log)
    with _owned(folder):
        stored = folder.stored_config()
        if stored is not None and config.batch_size == "auto" and not overwrite:  # the number auto chose then
            config = dataclasses.replace(config, batch_size=stored.get("batch_size", "auto"))
        if stored is not None and folder.holds_training() and not overwrite:
            _check_same_run(folder, TrainConfig.from_dict(stored), config)
            if checkpoint.steps(folder.checkpoints):
                return _continue(folder, config, callbacks, mesh, schedule, notify, log, trace)
        elif stored is None and folder.holds_outputs() and not overwrite:
            raise ArgumentError(
                f"{checks_escape(folder.path)} holds files of a run without its config.json: "
                "train into another folder, or replace them ({0})",
                "overwrite",
            )
        job = prepare(config, folder.path, mesh)
        if stored is not None and not folder.holds_training() and not overwrite:
            same = _same_config(stored, config)
            whose = "this run's config" if same else "the config of another run"
            _say(notify, f"{folder.path} holds {whose} but no checkpoint (it stopped before its first save): "
                         "training starts over")  # fmt: skip
        _announce(notify, job, config)
        if parallel.is_primary():
            folder.clear()
            folder.write_config(job.config.to_dict())  # a batch size 'auto' as the number it became
        schedule = schedule._replace(keep=3 if o.keep is None else o.keep)
        try:
            return _execute(job, folder, None, callbacks, mesh, schedule, log, trace)
        except Exception:  # (not a Ctrl-C: a run interrupted keeps its config)
            if parallel.is_primary() and not folder.started():  # refused before its first round: no run here
                folder.clear()
            raise


def _same_config(stored: dict, config: TrainConfig) -> bool:
    """Whether a folder's stored config is ``config`` (one of another jaxnet version's is not)."""
    try:
        return not configlib.differences(TrainConfig.from_dict(stored), config)
    except (TypeError, ValueError):
        return False


def _check_log(log) -> None:
    try:
        loggers.parse(log)
    except ValueError as e:
        raise ArgumentError(checks.escape(str(e)).replace("unknown logger", "{0}: unknown logger"), "log") from None


def _check_layout(config: TrainConfig, mesh, resuming: bool) -> None:
    """Refuses, before the data is read, ``--shard`` rules without a mesh (a new run; a resumed
    one holds its params whole on one device) and a ``--device-invariant`` that ``mesh`` cannot
    split (:func:`jaxnet.parts.check_parts`)."""
    if config.shard and mesh is None and not resuming:
        raise ArgumentError("{0} lays params out on a device mesh: give {1} too", "shard", "mesh")
    if config.device_invariant is not None and mesh is not None:
        parts.check_parts(config.device_invariant, shardinglib.batch_devices(mesh), mesh)


def _checked_folder(out, options: RunOptions, what: str = "out") -> RunFolder:
    """The run folder ``out`` (the argument ``what``), refused early when it cannot be one; the
    checkpoint schedule checked."""
    for name in ("checkpoint_every", "checkpoint_steps", "log_steps", "keep"):
        checks.optional_integer(name, getattr(options, name))
    folder = RunFolder(out)
    if str(out) == "":
        raise ArgumentError("{0} is empty: name a folder for the run", what)
    problem = folder.unusable()
    if problem is not None:
        hint = "the out folder of an earlier run" if what == "resume" else "a folder that can be written"
        raise ArgumentError(f"{checks.escape(problem)}: give {{0}} {hint}", what)
    return folder


def _check_same_run(folder: RunFolder, stored: TrainConfig, config: TrainConfig) -> None:
    differ = configlib.differences(stored, config)
    if differ in (["epochs"], ["steps"]):
        length = differ[0]
        raise ArgumentError(
            f"{checks.escape(folder.path)} holds this run with {{0}} {getattr(stored, length)}: to extend it, resume "
            "it ({1} DIR {0} N); or train into another folder, or replace it ({2})",
            length,
            "resume",
            "overwrite",
        )
    if differ:
        names = ", ".join(f"{{{i}}}" for i in range(len(differ)))
        raise ArgumentError(
            f"{checks_escape(folder.path)} holds another run (it differs in {names}): train into another folder, "
            f"continue that run as it is, or replace it ({{{len(differ)}}})",
            *differ,
            "overwrite",
        )


def resume(
    out: str | Path,
    *,
    epochs: int | None = None,
    overrides: dict | None = None,
    steps: int | None = None,
    **options,
) -> RunResult:
    """Continues the run in folder ``out`` from its newest usable checkpoint, with its own config.

    Args:
      out: the run folder of an earlier :func:`run`.
      epochs: extend (or shorten) the run to this many epochs; the result equals a run of that
        many epochs never interrupted.
      steps: likewise for a run by steps: extend it to this many steps.
      overrides: config fields given again (None: not given); each must equal the run's own, but
        for those of the machine (``memory_budget``, ``peak_tflops``), which the resumed run takes.
      options: the fields of :class:`RunOptions`; the checkpoint and logging schedule left unset
        is the run's own.
    """
    o = RunOptions(**options)
    folder = _checked_folder(out, o, "resume")
    if not folder.path.is_dir():
        raise ValueError(f"cannot resume: {out} does not exist (give the out folder of an earlier run)")
    with _owned(folder):
        stored = folder.stored_config()
        if stored is None and checkpoint.steps(folder.checkpoints):
            raise ValueError(
                f"cannot resume: {out} has checkpoints but no config.json, the run's config: put it back (or train "
                "into another folder)"
            )
        if stored is None:
            raise ValueError(f"cannot resume: {out} has no checkpoints (give the out folder of an earlier run)")
        if not checkpoint.steps(folder.checkpoints):
            if folder.holds_training():  # its model
                raise ValueError(f"cannot resume: {out} holds a model but no checkpoints: train a new run to go on")
            raise ValueError(
                f"cannot resume: the run in {out} stopped before its first checkpoint: train it again "
                f"(jaxnet train --config {Path(out) / CONFIG_TOML} --out {out})"
            )
        config = TrainConfig.from_dict(stored)
        configlib.check_overrides(config, overrides or {})
        machine = {k: v for k, v in (overrides or {}).items() if k in configlib.MACHINE_FIELDS and v is not None}
        config = _extended(dataclasses.replace(config, **machine), epochs, steps)
        _check_layout(config, o.mesh, resuming=True)
        _check_log(o.log)
        return _continue(folder, config, o.callbacks, o.mesh, o.cadence, o.notify, o.log, o.trace)


def _extended(config: TrainConfig, epochs: int | None, steps: int | None) -> TrainConfig:
    """``config`` with the run's length given again: its ``epochs``, or its ``steps`` for a run by steps."""
    length, value = ("steps", steps) if config.steps is not None else ("epochs", epochs)
    other = "epochs" if length == "steps" else "steps"
    if (epochs if length == "steps" else steps) is not None:
        raise ArgumentError(f"this run's length is in {length}: give {{0}} N to extend it, not {{1}}", length, other)
    if value is None or value == getattr(config, length):
        return config
    if config.lr_schedule != "constant" or config.warmup:
        raise ArgumentError(
            f"this run's {config.lr_schedule} learning-rate schedule spans its {getattr(config, length)} {length}: "
            "resume it with its own {0}, or train a new run",
            length,
        )
    return dataclasses.replace(config, **{length: value})


def restore_run(out: str | Path) -> tuple[TrainConfig, checkpoint.Restored]:
    """``(config, restored)``: the config of the run in folder ``out`` and its newest usable
    checkpoint (:func:`jaxnet.checkpoint.restore` against the run's own template)."""
    folder = RunFolder(out)
    stored = folder.stored_config()
    if stored is None:
        raise ValueError(f"cannot resume: {out} holds no run (give the out folder of an earlier run)")
    config = TrainConfig.from_dict(stored)
    return config, checkpoint.restore(folder.checkpoints, template(prepare(config, folder.path, resuming=True)))
