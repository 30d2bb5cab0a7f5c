"""The ``jaxnet`` command line: argv -> a config and callbacks -> the library -> a report.

This module parses and reports; every value is checked once, by the library, whose messages name
the Python argument, and :data:`FLAGS` spells those names as flags. Errors are one line on
stderr: exit code 2 for usage errors (bad options, bad input files), 1 for runtime failures (a
non-finite loss, I/O errors, a busy run folder), 130/143 after Ctrl-C/SIGTERM. Progress goes to
stderr, data (predictions, ``--json``) to stdout. jax is imported only when a command runs.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from jaxnet.app import cliflags

EXIT_USAGE, EXIT_FAILURE = 2, 1
PEER_TIMEOUT_HELP = 30
"""``--peer-timeout``'s default as its help shows it without importing jax: the library's
:data:`jaxnet.parallel.PEER_TIMEOUT` (a test keeps the two equal), which an unset flag leaves in force."""
DEBUG_ENV = "JAXNET_DEBUG"

FLAGS = {
    "lrs": "--lr",
    "weight_decays": "--weight-decay",
    "every": "--checkpoint-every",
    "every_steps": "--checkpoint-steps",
    "chunk_steps": "--checkpoint-steps",
    "log": "--log",
    "log_steps": "--log-every-steps",
    "timeout": "--peer-timeout",
    "max_new_tokens": "--tokens",
    "sharding": "--shard",
    "field": "--text-field",  # (of jaxnet.text)
    "ByteTokenizer()": "--tokenizer byte",  # (jaxnet.text.BYTE_TOKENIZER)
    "rename": "--init-rename",  # (jaxnet.load_params)
    "partial": "--init-partial",
    "rank": "--lora-rank",  # (jaxnet.lora)
    "alpha": "--lora-alpha",
    "targets": "--lora-targets",
}
"""Python argument names whose flag is not ``--`` + the name with dashes."""


def flag(name: str) -> str:
    """The command-line spelling of the Python argument ``name``."""
    return FLAGS.get(name) or ("--" + name.replace("_", "-"))


class CliError(Exception):
    """A usage error to report as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise CliError(f"{message} (see '{self.prog} --help')")


def number_arg(text: str) -> float:
    """argparse type: a finite number (its range is the library's to check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def integer_arg(text: str) -> int:
    """argparse type: an integer (its range is the library's to check)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers, e.g. ``64,64`` (empty: no hidden layer)."""
    try:
        return tuple(int(part) for part in text.split(",")) if text.strip() else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def name_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated names, e.g. ``f1,recall`` (checked by the library)."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names (e.g. a,b): a name is empty")
    return names


def number_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers, e.g. ``0.001,0.01``."""
    parts = text.split(",")
    where = f" in {text!r} (give e.g. 0.001,0.01)" if len(parts) > 1 else ""
    values = []
    for part in parts:
        try:
            values.append(number_arg(part.strip()))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}{where}") from None
    return tuple(values)


def bytes_arg(text: str) -> int:
    """argparse type: a number of bytes, with an optional K, M, G or T (powers of 1024)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    scale = units.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of bytes such as 512M or 8G, got {text!r}")
    return int(value)


def rule_arg(text: str) -> str:
    """argparse type: a rule ``REGEX=VALUE`` of ``--shard``, ``--lr-mult`` or ``--init-rename``
    (the value is checked by the flag's own use)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected a rule REGEX=VALUE, got {text!r}")
    return text


def mesh_arg(text: str) -> dict:
    """argparse type: ``data=2,fsdp=4`` (see :func:`jaxnet.sharding.parse_mesh`)."""
    from jaxnet.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def integer_or(word: str, what: str):
    """An argparse type: an integer (``what`` it counts), or ``word``."""

    def parse(text: str):
        if text.strip().lower() == word:
            return word
        try:
            return integer_arg(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {what} nor {word}") from None

    return parse


batch_arg = integer_or("auto", "a number of examples")  # --batch-size
count_arg = integer_or("all", "a number")  # --devices, --eval-batches


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (an MLP, a CNN or your own) on a built-in dataset or a CSV/.npz file",
        description="Train a model. Unset options take the defaults and the dataset's preset: --print-config "
        "shows every resolved value.",
    )
    _add_config_options(p.add_argument_group("config file"))
    names = (cliflags.DATA, cliflags.MODEL, cliflags.RECIPE, cliflags.LM, cliflags.TUNE, cliflags.DEVICES)
    groups = {name: p.add_argument_group(name) for name in names}
    parsers = {"str": str, "int": integer_arg, "number": number_arg, "ints": int_list, "names": name_list}
    more = {"numbers": number_list, "rules": rule_arg, "bytes": bytes_arg, "batch": batch_arg, "count": count_arg}
    cliflags.add_flags(groups, {**parsers, **more})
    _add_device_options(groups[cliflags.DEVICES])
    _add_output_options(p.add_argument_group("output"))
    p.set_defaults(run=_cmd_train)


def _add_config_options(c) -> None:
    c.add_argument(
        "--config",
        metavar="FILE.toml",
        help="the run's config as TOML (field = value, e.g. a run folder's config.toml) or a run folder's "
        "config.json; flags given override it",
    )
    c.add_argument(
        "--print-config",
        action="store_true",
        help="print the complete resolved config as TOML (the --config format) and exit without training",
    )


def _add_device_options(d) -> None:
    d.add_argument("--devices", type=count_arg, metavar="N|all", help="data parallel over N devices or all")
    d.add_argument(
        "--mesh",
        type=mesh_arg,
        metavar="AXIS=N,...",
        help="a device mesh of the axes data, fsdp (params sharded) and model (tensor parallel), e.g. fsdp=8 or "
        "data=2,fsdp=4; their product is the device count, one may be -1 (fills)",
    )
    d.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: process 0's address")
    d.add_argument("--num-processes", type=integer_arg, metavar="N", help="multi-process run: process count")
    d.add_argument("--process-id", type=integer_arg, metavar="I", help="multi-process run: this process")
    d.add_argument(
        "--peer-timeout",
        type=integer_arg,
        metavar="SECONDS",
        help="multi-process run: how long to wait for a peer to join or answer before every process stops "
        f"(default {PEER_TIMEOUT_HELP})",
    )


_OUTPUT_OPTIONS = (
    ("--out", "DIR", "the run folder: model.npz, metrics.jsonl, curves.png, checkpoints; running the same command "
     "again continues the run"),
    ("--overwrite", None, "replace the different run that --out DIR holds"),
    ("--checkpoint-every", "N", "checkpoint every N epochs into DIR/checkpoints"),
    ("--checkpoint-steps", "N", "also checkpoint every N steps, inside epochs, with the position in the data (a "
     "resume continues that epoch exactly)"),
    ("--keep", "K", "keep the newest K checkpoints (default 3)"),
    ("--resume", "DIR", "continue the run in DIR (an earlier --out) from its newest checkpoint"),
    ("--log", "NAMES", "also log to tensorboard, mlflow and/or csv (comma-separated), under --out DIR (MLflow: "
     "into MLFLOW_TRACKING_URI, else DIR/mlflow.db)"),
    ("--log-every-steps", "N", "with --log: also log every N-th step of each epoch (loss, gradient norm, learning "
     "rate)"),
    ("--profile", None, "first write a profiler trace of a few training steps into DIR/profile (tensorboard "
     "--logdir DIR/profile, with tensorboard-plugin-profile)"),
)  # fmt: skip
"""``jaxnet train``'s output options: flag, metavar (N and K: an integer; None: a switch), help."""


def _add_output_options(o) -> None:
    for flag, metavar, text in _OUTPUT_OPTIONS:
        if metavar is None:
            o.add_argument(flag, action="store_true", help=text)
        else:
            o.add_argument(flag, metavar=metavar, help=text, type=integer_arg if metavar in ("N", "K") else str)
    o.add_argument("--quiet", action="store_true", help="no progress (errors and continuation notices still show)")
    o.add_argument("--json", action="store_true", help="print one JSON object with the final figures on stdout")


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """Sends file descriptor 1 to stderr while active, so that native libraries' chatter (the
    collectives' connection lines) cannot spoil a ``--json`` stdout."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _json(value) -> str:
    """Strict JSON (non-finite numbers as null) for stdout."""
    from jaxnet._atomic import json_safe

    return json.dumps(json_safe(value), allow_nan=False)


def _closing(thing):
    """``contextlib.closing(thing)``, or nothing for None."""
    return contextlib.closing(thing) if thing is not None else contextlib.nullcontext()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_train_args(args) -> None:
    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise CliError("--resume DIR writes on into DIR: drop --out")
    if args.resume and args.config:
        raise CliError("--resume continues the run with its own config: drop --config")
    if args.resume and args.overwrite:
        raise CliError("--resume continues the run in DIR; --overwrite would replace it: drop one")
    for name, value in (
        ("--checkpoint-every N", args.checkpoint_every),
        ("--checkpoint-steps N", args.checkpoint_steps),
        ("--log NAMES", args.log),
        ("--log-every-steps N", args.log_every_steps),
        ("--profile", args.profile or None),
        ("--keep K", args.keep),
        ("--overwrite", args.overwrite or None),
    ):
        if value is not None and not (args.out or args.resume):
            raise CliError(f"{name} needs --out DIR")
    if args.log_every_steps is not None and not args.log and not args.resume:
        raise CliError(
            "--log-every-steps N logs steps to the loggers of --log NAMES (csv, tensorboard, mlflow): give it"
        )


def _train_config(args) -> tuple[dict, object]:
    """``(given, config)``: the config fields given (``--config`` file, then flags over it) and the
    resolved config (None with ``--resume``, which keeps the run's own)."""
    from jaxnet.app import config as configlib
    from jaxnet.app import configfile

    flags = cliflags.given(args)
    given = flags
    if args.config:
        given = {**configfile.load_config_file(args.config), **{k: v for k, v in given.items() if v is not None}}
    given = configlib.inherited(given)  # --init-from RUN: its architecture and tokenizer
    if args.resume:
        return given, None
    config = configlib.make_config(**given)
    configlib.check_lm_fields(config, [name for name, value in flags.items() if value is not None])
    return given, config


def _print_config(config, resume) -> int:
    from jaxnet.app import configfile
    from jaxnet.app.rundir import RunFolder

    stored = config.to_dict() if config is not None else RunFolder(resume).stored_config()
    if stored is None:
        raise CliError(f"{resume} holds no run config (give the out folder of an earlier run)")
    print(configfile.dumps(stored), end="")
    return 0


def _rounds(config, args) -> int | None:
    """How many records a run makes: its epochs, or a run by steps' evaluations."""
    steps = config.steps if config else args.steps
    if steps is None:
        return config.epochs if config else args.epochs
    every = (config.eval_every if config else args.eval_every) or steps
    return -(-steps // every)


def _mesh(args, distributed: bool):
    """The device mesh that ``--devices`` or ``--mesh`` ask for (a multi-process run: all devices)."""
    from jaxnet import parallel, sharding

    if args.mesh is not None:
        if args.devices is not None:
            raise CliError("--devices and --mesh both say which devices train: give one (--mesh data=N is --devices N)")
        return sharding.make_mesh(**args.mesh)
    return parallel.make_data_mesh(args.devices) if args.devices or distributed else None


def _cmd_train(args) -> int:
    _check_train_args(args)
    if args.print_config:
        return _print_config(_train_config(args)[1], args.resume)
    sys.stderr = _OutputMayClose(sys.stderr)  # `jaxnet train ... 2>&1 | head`: the run goes on
    try:
        return _train(args)
    finally:
        sys.stderr = sys.stderr.stream


class _OutputMayClose:
    """A text stream whose reader may go away (a pipe into ``head``): from then on what is
    written goes to the null device, and the writer carries on (a training run keeps training
    and saves its model: its messages are not its product)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _train(args) -> int:
    from jaxnet import callbacks, parallel
    from jaxnet.app import run as runlib
    from jaxnet.app import supervisor

    timeout = parallel.PEER_TIMEOUT if args.peer_timeout is None else args.peer_timeout
    if parallel.distributed_request(args.coordinator, args.num_processes, args.process_id) is not None:
        if not supervisor.is_supervised():  # the runtime's fatal errors become one line, in bounded time
            return supervisor.supervise(args.argv, timeout, _debugging(args))
        supervisor.bind_to_supervisor()
    given, config = _train_config(args)  # (no device touched yet)
    _same_cpu_threads(given, args.resume)
    # Before any other JAX use: joining a multi-process run must precede backend start-up.
    where = (args.coordinator, args.num_processes, args.process_id)
    distributed = parallel.initialize_distributed(*where, timeout=timeout)
    mesh = _mesh(args, distributed)
    primary = parallel.is_primary()
    interrupt = callbacks.Interrupt(_say if primary else None)
    progress = callbacks.Progress(_rounds(config, args)) if primary and not args.quiet else None
    cbs = [interrupt] + ([progress] if progress else [])

    def notify(message: str, always: bool = False) -> None:
        if primary and (always or not args.quiet):
            _say(message)

    options = dict(
        callbacks=cbs,
        mesh=mesh,
        checkpoint_every=args.checkpoint_every,
        checkpoint_steps=args.checkpoint_steps,
        log=args.log,
        log_steps=args.log_every_steps,
        trace=args.profile,
        keep=args.keep,
        notify=notify,
    )
    _quiet_orbax(_debugging(args))
    if args.log:  # MLflow and its database migrations announce themselves at INFO on stderr
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    args.signals.check()  # one that arrived while starting up and was swallowed on its way
    with interrupt, _stdout_to_stderr(args.json), _closing(progress):
        if args.resume:
            overrides = {k: v for k, v in given.items() if k not in ("epochs", "steps")}
            result = runlib.resume(args.resume, epochs=args.epochs, steps=args.steps, overrides=overrides, **options)
        else:
            result = runlib.run(config, out=args.out, overwrite=args.overwrite, **options)
    out = args.out or args.resume
    if interrupt.signum is not None and not result.finished:
        if primary:
            _say(_interrupted_at(result.state, out))
        return interrupt.exit_code
    if primary:
        _report(result, args, out)
    return 0


def _same_cpu_threads(given: dict, resume) -> None:
    """A ``--device-invariant K`` run (given, or the resumed run's) starts XLA's CPU runtime with
    the same threads in every process, whatever its devices (:func:`jaxnet.parts.same_cpu_threads`)."""
    from jaxnet import parts
    from jaxnet.app.rundir import RunFolder

    k = given.get("device_invariant")
    if k is None and resume:
        with contextlib.suppress(OSError, ValueError):
            k = (RunFolder(resume).stored_config() or {}).get("device_invariant")
    if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
        parts.same_cpu_threads(k)


def _interrupted_at(state, out) -> str:
    """Where an interrupted run stopped and what was kept of it."""
    where = (
        f"checkpoint in {out}/checkpoints/{state.steps}; resume with: jaxnet train --resume {out}"
        if out
        else "nothing was saved (train with --out DIR to keep checkpoints)"
    )
    at = f"epoch {state.epoch}"
    if state.position is not None:
        at = f"step {state.steps}, inside epoch {state.epoch + 1}"
    return f"interrupted at {at}; {where}"


def _report(result, args, out) -> None:
    from jaxnet.app import report

    summary = result.summary
    if args.json:
        print(_json(summary))
        return
    if args.quiet:
        return
    if "members" in summary:
        _say(report.format_members(summary))
    print(report.format_result(summary, out), file=sys.stderr, flush=True)


def _model_args(p, data: str | None = None) -> None:
    """The trained run a subcommand reads: ``--model DIR``, ``--arch`` for a user's own factory, and
    the ``--data`` it reads (its help ``data``) when it reads any."""
    p.add_argument("--model", required=True, metavar="DIR", help="the --out folder of 'jaxnet train'")
    p.add_argument("--arch", metavar="FILE.py:FACTORY", help="a model built by your own factory: name it again")
    if data is not None:
        p.add_argument("--data", required=True, metavar="FILE", help=f"{data}; read in chunks")
        p.add_argument("--delimiter", metavar="C", help="a CSV's field separator (default: the training run's "
                       "--delimiter, else sniffed from the header: , ; tab |)")  # fmt: skip


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="write a trained model's predictions as CSV to stdout")
    _model_args(
        p,
        data="CSV or Parquet with the model's columns, by name ('-': CSV on standard input), .npz with x, or a "
        "folder with x.npy",
    )
    p.add_argument("--probabilities", action="store_true", help="classification: also write each class's probability")
    p.add_argument(
        "--output",
        metavar="FILE.csv",
        help="write the predictions to FILE (atomically: all of them, or on an error nothing) instead of stdout",
    )
    p.add_argument("--id-column", metavar="COLUMN", help="a column of the data to write first in each row, e.g. id")
    p.set_defaults(run=_cmd_predict)


def _cmd_predict(args) -> int:
    import csv

    from jaxnet._atomic import atomic_path
    from jaxnet.app import files, report
    from jaxnet.app import saved as savedlib

    delimiter = _checked_delimiter(args)
    model = files.load_model(args.model)
    if model.meta.get("task") == "lm":
        raise CliError(f"{args.model} holds a language model: sample text from it with 'jaxnet generate', or score it "
                       "on a text with 'jaxnet evaluate'")  # fmt: skip
    chunks = savedlib.input_chunks(model, args.data, targets=False, id_column=args.id_column, delimiter=delimiter)
    chunks = _reported(chunks, model, args.data)

    def write(stream) -> None:
        writer = csv.writer(stream, lineterminator="\n")
        for i, (chunk, predictions) in enumerate(savedlib.predict_chunks(model, chunks, args.arch)):
            header, rows = report.prediction_rows(model.meta, predictions, args.probabilities)
            if chunk.ids is not None:
                header, rows = [args.id_column, *header], [[k, *row] for k, row in zip(chunk.ids, rows)]
            if i == 0:
                writer.writerow(header)
            writer.writerows(rows)

    if args.output is None:
        write(sys.stdout)
    else:
        with atomic_path(args.output) as tmp, open(tmp, "w", newline="") as stream:
            write(stream)
    return 0


def _checked_delimiter(args) -> str | None:
    """predict's or evaluate's ``--delimiter``: one character, given for a CSV only."""
    from jaxnet.app import config as configlib
    from jaxnet.app import tables

    configlib.check_delimiter(args.delimiter)
    if args.delimiter is not None and not tables.is_csv(args.data):
        raise CliError(f"--delimiter separates a CSV's fields; {os.path.basename(args.data)} is not a CSV: drop it")
    return args.delimiter


def _reported(chunks, model, data: str):
    """The input chunks of predict or evaluate, passed on; once all are read, on stderr: the gaps
    filled and the categories the model had not seen (:func:`jaxnet.app.tables.report_lines`)."""
    from jaxnet.app import saved, tables

    done = tables.Report()
    for chunk in chunks:
        done = done if chunk.report is None else tables.merged(done, chunk.report)
        yield chunk
    name = "standard input" if data == "-" else os.path.basename(data)
    for line in tables.report_lines(done, saved.encoder_of(model), name):
        _say(line)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="print a trained model's metrics on labelled data")
    _model_args(
        p,
        data="CSV ('-': standard input), .npz, .parquet or a folder of x.npy and y.npy, with features and targets",
    )
    p.add_argument("--target", metavar="COLUMN", help="the CSV target column (default: the one trained on)")
    p.add_argument(
        "--text-field",
        metavar="NAME",
        help="a language model scored on a JSONL or Parquet corpus: its text field (default: the run's)",
    )
    p.add_argument(
        "--metrics",
        type=name_list,
        metavar="M1,M2",
        help="named metrics besides the loss, e.g. f1,precision,recall (default: the run's --metrics)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from jaxnet.app import config as configlib
    from jaxnet.app import files, language
    from jaxnet.app import saved as savedlib

    model = files.load_model(args.model)
    if language.is_language_model(model):
        figures = _evaluate_text(args, model)
        shown = (f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(_json(figures) if args.json else "  ".join(shown))
        return 0
    if args.text_field is not None:
        raise CliError("--text-field is for a language model's text; this model reads tables: drop it")
    delimiter = _checked_delimiter(args)
    named = args.metrics if args.metrics is not None else model.meta.get("config", {}).get("metrics", [])
    configlib.checked_metrics(named)  # (before any data is read)
    chunks = _reported(savedlib.input_chunks(model, args.data, args.target, delimiter=delimiter), model, args.data)

    def labelled(chunks):
        for chunk in chunks:
            if chunk.y is None:
                raise CliError(_no_targets(args.data, args.target, model.meta.get("target")))
            yield chunk

    metrics, rows = savedlib.evaluate_chunks(model, labelled(chunks), args.arch, named)
    if args.json:
        print(_json(metrics))
        return 0
    per_target = metrics.pop("per_target", None)
    print("  ".join(f"{name} {value:.6g}" for name, value in metrics.items()) + f"  ({rows} examples)")
    if per_target:
        from jaxnet.app import report

        print(report.per_target_line(per_target, "per target").removeprefix("per target, "))
    return 0


def _evaluate_text(args, model) -> dict:
    """A language model's figures on the text ``--data`` names (``-``: standard input)."""
    import shutil
    import tempfile

    from jaxnet.app import config as configlib
    from jaxnet.app import language

    for name in ("target", "delimiter", "arch"):
        if getattr(args, name) is not None:
            raise CliError(f"{flag(name)} is for tables; a language model is scored on a text: drop it")
    named = args.metrics if args.metrics is not None else model.meta.get("config", {}).get("metrics", [])
    configlib.checked_metrics(named)
    records = args.data != "-" and args.data.lower().endswith((".jsonl", ".parquet"))
    if args.text_field is not None and not records:
        shown = "standard input" if args.data == "-" else args.data
        raise CliError(f"--text-field names a field of a JSONL or Parquet corpus; {shown} is read as plain text")
    field = args.text_field or model.meta.get("config", {}).get("text_field") or "text"
    if args.data != "-":
        return language.evaluate_text(model, args.data, field, named)
    with tempfile.TemporaryDirectory(prefix="jaxnet-stdin-") as folder:
        path = Path(folder) / "standard input.txt"
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        try:
            return language.evaluate_text(model, str(path), field, named)
        except ValueError as e:  # named as the user knows it
            raise type(e)(str(e).replace(str(path), "standard input")) from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="write text from a trained language model (jaxnet train --task lm)")
    p.add_argument("--model", required=True, metavar="DIR", help="the --out folder of 'jaxnet train --task lm'")
    p.add_argument("--prompt", default="", help="the text to continue (default: from a document's start)")
    p.add_argument("--tokens", type=integer_arg, default=200, metavar="N", help="new tokens to write (default 200)")
    p.add_argument("--temperature", type=number_arg, default=1.0, metavar="T", help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=integer_arg, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=number_arg, metavar="P", help="sample among the likeliest tokens of probability P")
    p.add_argument("--seed", type=integer_arg, default=0, metavar="S", help="the sampling's seed (default 0)")
    p.set_defaults(run=_cmd_generate)


def _cmd_generate(args) -> int:
    from jaxnet.app import files, language

    model = files.load_model(args.model)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    language.generate_text(
        model, args.prompt, args.tokens, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, write=write, note=_say,
    )  # fmt: skip
    sys.stdout.write("\n")
    return 0


def _no_targets(data: str, target: str | None, trained: str | None = None) -> str:
    """What to do about evaluation data without targets, by the kind of data (``trained``: the
    target column the model was trained on)."""
    shown = "standard input" if data == "-" else data
    if os.path.isdir(data):
        return f"{shown} has no y.npy: put the targets beside x.npy, as y.npy"
    if data.lower().endswith(".npz"):
        return f"{shown} has no array 'y': save the targets in it as y"
    if target:
        return f"{shown} has no column {target!r}: name its target column with --target"
    if trained:
        return (f"{shown} lacks the target column {trained!r} that the model was trained on: give data with it, "
                "or name the column that holds the targets with --target")  # fmt: skip
    return f"{shown} has no targets: name its target column with --target"


def _add_seed(sub) -> None:
    p = sub.add_parser(
        "seed",
        help="the hand-worked example: one SGD step of a 3-2-2 sigmoid network, by autodiff",
        description="Forward pass, gradients and one SGD step of the notes' 3-2-2 sigmoid network "
        "(half sum of squares loss), in the notes' notation. w_jk is the weight from input k to neuron j.",
    )
    p.add_argument("--x", nargs="+", type=number_arg, metavar="X", help="3 inputs (default 0.5 0.5 0.1)")
    p.add_argument("--target", nargs="+", type=number_arg, metavar="T", help="2 targets (default 0.9 0.1)")
    p.add_argument("--lr", type=number_arg, help="learning rate (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--figure", metavar="FILE.png", help="also draw the annotated network to this file")
    p.set_defaults(run=_cmd_seed)


def _cmd_seed(args) -> int:
    from jaxnet.app.worked_example import format_worked_example, worked_example

    if args.figure:
        from jaxnet.app.plot import check_figure_path

        check_figure_path(args.figure)  # fail before computing
    result = worked_example(x=args.x, target=args.target, lr=args.lr)
    if args.figure:
        from jaxnet.app.plot import draw_network

        draw_network(result, args.figure)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_worked_example(result))
    if args.figure:
        _say(f"figure written to {args.figure}")
    return 0


def _add_summary(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="a trained model's layers, output shapes, parameter counts and a step's FLOPs and memory",
    )
    _model_args(p)
    p.add_argument("--batch-size", type=integer_arg, help="the batch whose costs are measured (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_summary)


def _cmd_summary(args) -> int:
    from jaxnet import summaries as summarylib
    from jaxnet.app import saved

    found, tokens, trained = saved.saved_summary(args.model, args.batch_size, args.arch)
    figures = summarylib.as_dict(found)
    if tokens:  # a language model's costs per token of a batch of windows
        figures["flops_per_token"] = {k: c["flops"] / tokens for k in ("forward", "train_step") if (c := figures[k])}
    figures.update(trained or {})
    print(_json(figures) if args.json else str(found) + _per_token(figures) + _trained(trained))
    return 0


def _trained(trained: dict | None) -> str:
    if trained is None:
        return ""
    return f"\nthe run trained {trained['trainable_parameters']:,} parameters: {trained['trained']}"


def _per_token(figures: dict) -> str:
    per = figures.get("flops_per_token")
    if not per:
        return ""
    return "\nper token: " + ", ".join(f"{name.replace('_', ' ')} {value:,.0f} FLOP" for name, value in per.items())


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="serialize a trained model's prediction (standardization included) with jax.export",
        description="Writes one portable program: raw features (n, d) in, predict's outputs out; running it "
        "needs jax alone (see docs/models.md, 'Export').",
    )
    _model_args(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the program file, e.g. model.jaxexport; a name ending in .safetensors gets the weights instead",
    )
    p.add_argument("--platforms", metavar="P1,P2", help="platforms to export for, e.g. cpu,cuda (default: this one)")
    p.set_defaults(run=_cmd_export)


def _cmd_export(args) -> int:
    from jaxnet.app import exporting

    platforms = tuple(p.strip() for p in args.platforms.split(",")) if args.platforms else None
    out = exporting.export(args.model, args.out, arch=args.arch, platforms=platforms)
    if str(out).endswith(".safetensors"):
        _say(f"exported the weights to {out}")
    elif json.loads(Path(f"{out}.json").read_text())["task"] == "lm":
        _say(f"exported to {out}: next-token probabilities of (n, context) int32 windows of token ids, padded on the "
             f"right; the context and the tokenizer are in {out}.json")  # fmt: skip
    else:
        _say(f"exported to {out}; what it takes (one column per input column, categories as indices, NaN for a "
             f"gap) is in {out}.json")  # fmt: skip
    return 0


_SUBCOMMANDS = [_add_seed, _add_train, _add_predict, _add_evaluate, _add_generate, _add_summary, _add_export]


def build_parser() -> argparse.ArgumentParser:
    from jaxnet import __version__

    parser = _Parser(prog="jaxnet", description="Train neural networks in JAX's functional, compiled style.")
    parser.add_argument("--version", action="version", version=f"jaxnet {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on failure, also print the full traceback (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM before training took over the signals: the command ends at once."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


class _StartSignals:
    """From the first moment until training installs its own handlers (which stop at a boundary
    and save), SIGINT and SIGTERM end the command at once with 130 or 143; nothing is written
    yet. Inside :meth:`held` (importing jax, whose native modules abort the process when an
    exception crosses them) a signal is kept and acted on when the block ends; one that lands in a
    callback that swallows exceptions (jax's garbage-collection callback) is kept too, and
    :meth:`check` acts on it. Signals that the parent process ignores (``nohup``) stay ignored."""

    def __init__(self):
        self.received: list[int] = []
        self.holding = False

    def handler(self, signum, frame) -> None:
        self.received.append(signum)
        if not self.holding:
            raise Signalled(signum)

    def check(self) -> None:
        if self.received:
            raise Signalled(self.received[0])

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        self.check()

    @contextlib.contextmanager
    def installed(self):
        """Installs the handlers (on the main thread only, where Python allows them), restoring
        the previous ones and ``sys.unraisablehook`` on exit (``main`` may run in-process)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        previous_hook = sys.unraisablehook

        def hook(unraisable):
            if not isinstance(unraisable.exc_value, Signalled):  # (kept in `received`)
                previous_hook(unraisable)

        for s, h in previous.items():
            if h is not signal.SIG_IGN:
                signal.signal(s, self.handler)
        sys.unraisablehook = hook
        try:
            yield self
        finally:
            if sys.unraisablehook is hook:  # (a hook chained onto ours since, e.g. for orbax's threads, stays)
                sys.unraisablehook = previous_hook
            for s, h in previous.items():
                signal.signal(s, h)


def _quiet_orbax(debug: bool) -> None:
    """Keeps orbax's background noise out of the terminal: the "Event loop is closed" tracebacks
    its I/O threads print when a read of a damaged checkpoint fails and, unless ``debug``, the
    errors its threads log or raise when a save fails (a full disk, a second Ctrl-C): the main
    thread reports each failure in one line."""
    if getattr(threading.excepthook, "quiets_orbax", False):  # installed by an earlier in-process call
        threading.excepthook.debug = debug
        return
    previous, previous_thread = sys.unraisablehook, threading.excepthook

    def hook(unraisable):
        error = unraisable.exc_value
        for e in (error, getattr(error, "__cause__", None)):
            if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
                return
        previous(unraisable)

    def thread_hook(info):
        frames = traceback.extract_tb(info.exc_traceback)
        if thread_hook.debug or not any("orbax" in frame.filename for frame in frames):
            previous_thread(info)

    thread_hook.quiets_orbax, thread_hook.debug = True, debug
    sys.unraisablehook, threading.excepthook = hook, thread_hook
    logging.getLogger("absl").setLevel(logging.NOTSET if debug else logging.CRITICAL)


def _use_compilation_cache() -> None:
    """Keeps XLA's compiled programs across runs (JAX's persistent cache, also for programs that
    compile fast), in ``$JAXNET_CACHE_DIR`` or the user's cache folder; ``JAXNET_CACHE_DIR=`` (empty)
    turns it off. Settings the user made for JAX itself win."""
    folder = os.environ.get("JAXNET_CACHE_DIR")
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "jaxnet", "xla")
    if folder and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _debugging(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _message(error: BaseException) -> str:
    render = getattr(error, "render", None)
    text = render(flag) if render is not None else str(error)
    return " ".join(text.split()) or type(error).__name__


def _exit_code(error: BaseException) -> int:
    from jaxnet._checks import ArgumentError

    if isinstance(error, (CliError, ArgumentError, TypeError, FileNotFoundError, IsADirectoryError, ImportError)):
        return EXIT_USAGE
    if isinstance(error, ValueError):
        return EXIT_USAGE  # bad values and bad input files
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` console script; returns the exit code."""
    with _StartSignals().installed() as signals:
        return _main(argv, signals)


def _main(argv: list[str] | None, signals: _StartSignals) -> int:
    args = None
    try:
        args, extra = build_parser().parse_known_args(argv)
        args.signals, args.argv = signals, list(sys.argv[1:] if argv is None else argv)
        if extra:  # named by the subcommand whose options were meant
            raise CliError(f"unrecognized arguments: {' '.join(extra)} (see 'jaxnet {args.command} --help')")
        _use_compilation_cache()
        with signals.held():
            import jax  # noqa: F401  (every command needs it; imported where a signal cannot abort it)
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `jaxnet predict ... | head`: the reader is done, so are we
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        _say("jaxnet: interrupted")
        return getattr(e, "exit_code", 130)
    except (CliError, ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        if _debugging(args):
            traceback.print_exc()  # the detail, before the one line that sums it up
        _say(f"jaxnet: error: {_message(e)}")
        return _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
