"""From a config to the learning problem: data splits prepared for the loss, the model's description.

:func:`load_problem` loads and splits the data of a :class:`~jaxnet.app.config.TrainConfig`, fits the
standardization on the training split, decides the loss and the output size; :func:`model_meta`
describes the model as JSON (saved with it; :func:`jaxnet.app.arch.build_model` rebuilds it from that).

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxnet import _atomic as atomic
from jaxnet import text
from jaxnet._checks import ArgumentError
from jaxnet._checks import escape as text_escape
from jaxnet.app import arch, corpora, tables
from jaxnet.app import data as datalib
from jaxnet.app.config import TrainConfig
from jaxnet.losses import get_loss


class Problem(NamedTuple):
    """The data of a run, prepared for its loss.

    Attributes:
      splits: train / val / test parts: ``x`` ``(n, d)`` standardized float32, ``y`` as the loss
        expects (``(n,)`` int32 labels, ``(n, k)`` float32 targets); val and test may be None.
      standardizer: the training split's ``(mean, std)``, each ``(d,)``.
      target_scaler: for regression with standardization, the training split's ``(mean, std)``
        of the targets, each ``(k,)``, by which ``y`` is standardized (else None).
      loss: the loss name; out_dim: the model's output size; task: classification or regression.
      num_classes: for classification; feature_names: ``d`` names.
      encoder: how a table's columns became the features (:class:`jaxnet.app.tables.Encoder`),
        fitted on the training split; for other data, its ``d`` numeric columns.
      classes: the class names of labels that were names, else None.
      tokenizer: a language model's (task ``lm``): its splits are windows of the text's tokens.
      report: a table's :class:`jaxnet.app.tables.Report` (rows left out, gaps filled), else None.
    """

    splits: datalib.Splits
    standardizer: datalib.Standardizer
    target_scaler: datalib.Standardizer | None
    loss: str
    out_dim: int
    task: str
    num_classes: int | None
    feature_names: tuple
    encoder: tables.Encoder
    classes: tuple[str, ...] | None = None
    tokenizer: text.Tokenizer | None = None
    report: tables.Report | None = None


def _task_of(config: TrainConfig) -> str | None:
    """The task that ``config`` asks for, through ``task`` or its loss."""
    if config.loss is None:
        return config.task
    implied = "classification" if get_loss(config.loss).metric is not None else "regression"
    if config.task is not None and config.task != implied:
        raise ArgumentError(
            f"{{0}} {config.task!r} does not fit {{1}} {config.loss!r}, a {implied} loss", "task", "loss"
        )
    return implied


def prepare_targets(y: np.ndarray, loss: str, num_classes: int | None) -> np.ndarray:
    """Targets ``(n,)`` or ``(n, k)`` in the form ``loss`` expects; raises ValueError for labels
    out of its range."""
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
    return (y[:, None] if y.ndim == 1 else y).astype(np.float32)


def _check_classes(ds: datalib.Dataset) -> None:
    """A classifier needs two classes: a target of one class would train a model that always says it."""
    if ds.task != "classification":
        return
    present = np.unique(np.asarray(ds.y))
    if present.size < 2:
        label = present[0].item()  # (an empty dataset was refused when it was read)
        label = ds.classes[label] if ds.classes else label
        raise ArgumentError(
            f"{ds.name}: every target is the class {label!r}: a classifier needs at least two classes "
            "(for a numeric target set {0} to 'regression')",
            "task",
        )


def load_problem(config: TrainConfig, cache: Path | None = None, resuming: bool = False) -> Problem:
    """Loads and splits the data of ``config`` and fits the standardization on the training split;
    a text (task ``lm``) is tokenized into ``cache`` (a folder; a temporary one when None), or,
    ``resuming`` the run in ``cache``, read with that run's own tokenizer (:func:`_run_tokens`)."""
    if config.task == "lm":
        return _text_problem(config, cache, resuming)
    options = {}
    if config.data is not None and tables.is_table_file(config.data):
        options = dict(
            categorical=config.categorical,
            encoding=config.encoding,
            ignore=config.ignore,
            delimiter=config.delimiter,
            fit_rows=lambda n: datalib.split_indices(n, config.val_split, config.test_split, config.seed).train,
        )
    try:
        ds = datalib.load_data(
            dataset=config.dataset,
            data=config.data,
            target=config.target,
            seed=config.seed,
            task=_task_of(config),
            **options,
        )
    except ArgumentError as e:  # the task came from the loss: name the flag the user gave
        if e.names != ("task",) or config.task is not None or config.loss is None:
            raise
        where = f"{Path(config.data).name}: the target {config.target!r}"
        raise ArgumentError(text_escape(f"{where} holds class names, not numbers: ") + "{0} "
                            + text_escape(f"{config.loss!r} is a regression loss; give a classification loss "
                                          "(softmax_cross_entropy) or a numeric target"), "loss") from None  # fmt: skip
    _check_classes(ds)
    encoder = ds.encoder or tables.numeric(ds.feature_names)
    loss = get_loss(config.loss or ("softmax_cross_entropy" if ds.task == "classification" else "mse")).name
    splits = datalib.split(ds, config.val_split, config.test_split, config.seed)
    if config.standardize:
        channels = config.input_shape[-1] if config.arch == "cnn" else None  # images: per channel
        if channels is not None:
            arch.check_input_shape(config.input_shape, ds.x.shape[1])
        splits, standardizer = datalib.standardize_splits(splits, channels, scaled=encoder.scaled)
    else:
        d = ds.x.shape[1]
        standardizer = datalib.Standardizer(np.zeros(d, np.float32), np.ones(d, np.float32))

    def prepared(part):
        return None if part is None else part._replace(y=prepare_targets(part.y, loss, ds.num_classes))

    splits = datalib.Splits(*(prepared(part) for part in splits))
    target_scaler = None
    if config.standardize and ds.task == "regression" and get_loss(loss).metric is None:
        splits, target_scaler = _standardize_targets(splits)
    out_dim = ds.num_classes if get_loss(loss).integer_labels else splits.train.y.shape[1]
    return Problem(
        splits, standardizer, target_scaler, loss, out_dim, ds.task, ds.num_classes, tuple(ds.feature_names), encoder,
        ds.classes, report=ds.report,
    )  # fmt: skip


TOKENIZER_FILE, TOKENS_FILE, SOURCE_FILE = "tokenizer.json", "tokens.bin", "tokens.source.json"
"""A language model's cache in its run folder: its tokenizer, the text's tokens, what they were made from."""


def _new_tokenizer(config: TrainConfig, files: list[Path]) -> text.Tokenizer:
    """The tokenizer ``config`` asks for: made for the text (``char``: its characters; ``bpe``:
    trained on it), ``byte``, or a given ``tokenizer.json``."""
    if config.tokenizer == "byte":
        return text.ByteTokenizer()
    if config.tokenizer == "char":
        return text.CharTokenizer.fit(chunk for f in files for chunk in text.text_chunks(f, config.text_field))
    if config.tokenizer == "bpe":
        chunks = (chunk for f in files for chunk in text.text_chunks(f, config.text_field))
        return text.BPETokenizer.train(chunks, config.vocab_size)
    path = Path(config.tokenizer)
    if not path.is_file():
        raise ArgumentError(f"{{0}} {text_escape(path)}: no such file", "tokenizer")
    return text.tokenizer_from_json(path.read_text(), str(path))


def _source(config: TrainConfig, files: list[Path]) -> dict:
    """What a cached tokenizer and token file are made from: the text's files (size, modification
    time) and the tokenizer asked for."""
    stamps = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    given = Path(config.tokenizer)  # a tokenizer.json: its contents may change under the same name
    stamp = [given.stat().st_size, given.stat().st_mtime_ns] if given.suffix == ".json" and given.is_file() else []
    return {"files": stamps, "field": config.text_field, "tokenizer": [config.tokenizer, config.vocab_size, *stamp]}


def _cached_tokens(config: TrainConfig, files: list[Path], cache: Path, resuming: bool = False):
    """``(tokenizer, tokens)`` of the text: those ``cache`` holds when it made them from these files
    for this tokenizer, else made anew (and cached); ``resuming``: the run's own (:func:`_run_tokens`)."""
    cache.mkdir(parents=True, exist_ok=True)
    source, stamp = _source(config, files), cache / SOURCE_FILE
    with contextlib.suppress(OSError, ValueError, text.TextError):
        if json.loads(stamp.read_text()) == source:
            tokenizer = text.tokenizer_from_json((cache / TOKENIZER_FILE).read_text())
            return tokenizer, text.open_tokens(cache / TOKENS_FILE)
    if resuming and (cache / TOKENIZER_FILE).is_file():
        return _run_tokens(config, files, cache, source)
    tokenizer = _new_tokenizer(config, files)
    tokens = text.tokenize_files(files, tokenizer, cache / TOKENS_FILE, config.text_field)
    atomic.write_text(cache / TOKENIZER_FILE, text.tokenizer_to_json(tokenizer))
    atomic.write_text(stamp, json.dumps(source) + "\n")
    return tokenizer, tokens


def _run_tokens(config: TrainConfig, files: list[Path], cache: Path, source: dict):
    """``(tokenizer, tokens)`` of a run being resumed whose text's files changed size or time since
    it started: its own tokenizer, and its tokens when the text still makes them (the stamp is
    renewed). A text that no longer does is refused, and nothing in ``cache`` changes: a new
    tokenizer would no longer fit the run's embedding, and the run's would be lost for
    ``generate`` and ``--init-from``."""
    tokenizer = text.tokenizer_from_json((cache / TOKENIZER_FILE).read_text(), str(cache / TOKENIZER_FILE))
    refused = (
        f"cannot resume: the text the run in {text_escape(cache)} trained on changed since it started "
        "({}): restore it, or train a new run on it (another --out, or --overwrite)"
    )
    try:
        then = text.open_tokens(cache / TOKENS_FILE)
    except (OSError, ValueError, text.TextError):  # the token file is gone: the run's tokenizer makes it again
        then = None
    with tempfile.TemporaryDirectory(prefix="jaxnet-tokens-") as folder:
        try:
            out = Path(folder) / TOKENS_FILE if then is not None else cache / TOKENS_FILE
            now = text.tokenize_files(files, tokenizer, out, config.text_field)
        except text.TextError as e:
            raise ValueError(refused.format(e)) from None
        then = now if then is None else then
        first = text.first_difference(now, then)
        if first is not None:
            tokens = f"{len(now):,} tokens now, {len(then):,} then; the first differs at {first:,}"
            raise ValueError(refused.format(tokens))
    atomic.write_text(cache / SOURCE_FILE, json.dumps(source) + "\n")
    return tokenizer, then


def _text_problem(config: TrainConfig, cache: Path | None, resuming: bool = False) -> Problem:
    """A language model's problem: the text tokenized (cached in ``cache``), its last ``val_split``
    held out; training windows at every offset, validation at most ``eval_batches`` batches of
    disjoint windows spread over the held-out part."""
    source = config.data if config.data is not None else corpora.fetch(config.dataset)
    files = text.text_files(source)
    if cache is None:  # a run without a folder: its tokens go when the process does
        cache = Path(tempfile.mkdtemp(prefix="jaxnet-tokens-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    tokenizer, tokens = _cached_tokens(config, files, cache, resuming)
    train, val = text.split_tokens(tokens, config.val_split)
    name = Path(source).name
    parts = [text.windows(train, config.context, name=f"{name} (training part)")]
    if val is not None:
        if len(val) < config.context + 1:
            raise ArgumentError(
                f"the validation part of {text_escape(name)} ({{0}} {config.val_split}) holds {len(val)} tokens, "
                f"fewer than a window of {{1}} {config.context} + 1: raise {{0}} or lower {{1}}",
                "val_split",
                "context",
            )
        parts.append(_validation_windows(val, config, f"{name} (validation)"))
    splits = [datalib.Dataset(p.x, p.y, "lm", None, (), name) for p in parts]
    empty = datalib.Standardizer(np.zeros(0, np.float32), np.ones(0, np.float32))
    return Problem(
        datalib.Splits(splits[0], splits[1] if len(splits) > 1 else None, None), empty, None, "softmax_cross_entropy",
        tokenizer.vocab_size, "lm", None, (), tables.numeric(()), None, tokenizer,
    )  # fmt: skip


def _validation_windows(tokens, config: TrainConfig, name: str):
    """The fixed validation windows of a text's last part: ``eval_batches`` batches of disjoint
    windows, spread over it (all of them with ``eval_batches="all"``, or while a batch size
    ``auto`` is not yet resolved)."""
    every = config.batch_size == "auto" or config.eval_batches == "all"
    limit = None if every else config.eval_batches * config.batch_size
    return text.windows(tokens, config.context, stride=config.context, limit=limit, name=name)


def with_batch_size(problem: Problem, config: TrainConfig) -> Problem:
    """``problem`` for ``config``'s batch size once ``auto`` became a number: a language model's
    validation windows are then ``eval_batches`` of its batches."""
    val = problem.splits.val
    if problem.tokenizer is None or val is None:
        return problem
    windows = _validation_windows(val.x.tokens, config, f"{val.name} (validation)")
    return problem._replace(splits=problem.splits._replace(val=val._replace(x=windows.x, y=windows.y)))


def _standardize_targets(splits: datalib.Splits) -> tuple[datalib.Splits, datalib.Standardizer]:
    """Regression targets ``(n, k)`` standardized by the training split's mean and std, so that
    the default learning rates suit targets of any scale (a price in dollars, a count)."""
    scaler = datalib.fit_standardizer(splits.train.y)

    def apply(part):
        return None if part is None else part._replace(y=datalib.standardize(part.y, scaler))

    return datalib.Splits(*(apply(part) for part in splits)), scaler


def model_meta(config: TrainConfig, problem: Problem) -> dict:
    """The JSON description saved with the params: enough to rebuild and use the model."""
    if problem.tokenizer is not None:
        c = config
        description = arch.describe_gpt(
            problem.out_dim, context=c.context, layers=c.layers, heads=c.heads, dim=c.dim, dropout=c.dropout,
            positions=c.positions, eot=problem.tokenizer.eot, remat=c.remat,
        )  # fmt: skip
        common = dict(loss=problem.loss, task="lm", num_classes=None, feature_names=[], columns=None, target=None)
        return {**description, **common, "tokenizer": text.tokenizer_to_json(problem.tokenizer), "config": c.to_dict()}
    features = len(problem.feature_names)
    if config.arch == "cnn":
        arch.check_input_shape(config.input_shape, features)
    embed = problem.encoder.embedded
    if embed:
        features += len(embed) * (config.embedding_dim - 1)
    description = arch.describe_model(
        config.arch,
        sizes=[features, *config.hidden, problem.out_dim],
        activation=config.activation,
        output_activation=config.output_activation,
        dropout=config.dropout,
        input_shape=config.input_shape,
        channels=config.channels,
    )
    return {
        **description,
        "loss": problem.loss,
        "task": problem.task,
        "num_classes": problem.num_classes,
        "feature_names": list(problem.feature_names),
        "columns": problem.encoder.to_json(),
        "classes": None if problem.classes is None else list(problem.classes),
        "embed": {"features": [j for j, _ in embed], "rows": [v for _, v in embed], "dim": config.embedding_dim}
        if embed
        else None,
        "target": config.target,
        "config": config.to_dict(),
    }


def describe_problem(problem: Problem) -> str:
    """One line on the task, for the first line of a run's output."""
    train, val, test = problem.splits
    if problem.task == "lm":
        kind = type(problem.tokenizer).__name__.removesuffix("Tokenizer").lower()
        held = f", {len(val.x)} validation windows" if val is not None else ""
        return (f"task: language model, {kind} tokenizer of {problem.out_dim} ids; {len(train.x.tokens)} training "
                f"tokens{held}")  # fmt: skip
    sizes = f"{len(train.x)} train / {len(val.x) if val else 0} val / {len(test.x) if test else 0} test rows"
    if problem.task == "classification":
        named = ""
        if problem.classes:  # their order: the labels 0, 1, ... and the columns of --probabilities
            shown = ", ".join(problem.classes[:20]) + (" ..." if len(problem.classes) > 20 else "")
            named = f" ({shown})"
        return f"task: classification, {problem.num_classes} classes{named}, loss {problem.loss}; {sizes}"
    return f"task: regression, {problem.out_dim} output(s), loss {problem.loss}; {sizes}"
