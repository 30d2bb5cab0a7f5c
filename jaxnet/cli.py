"""The ``jaxnet`` command line: parses arguments, calls the library, maps errors to exit codes.

This is the only module that prints or exits. Every error is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

EXIT_USAGE = 2


class CliError(Exception):
    """An error to report as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise CliError(f"{message} (see '{self.prog} --help')")


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxnet", description="Train neural networks in JAX's functional, compiled style.")
    from jaxnet import __version__

    parser.add_argument("--version", action="version", version=f"jaxnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers, e.g. ``64,64`` (empty: no hidden layer)."""
    if text.strip() == "":
        return ()
    sizes = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"layer sizes must be positive integers, got {value} in {text!r}")
        sizes.append(value)
    return tuple(sizes)


def _float_list(text: str, minimum: float, strict: bool) -> tuple[float, ...]:
    parts = text.split(",")
    where = f" in {text!r} (give e.g. 0.001,0.01)" if len(parts) > 1 else ""
    values = []
    for part in parts:
        part = part.strip()
        try:
            value = finite_float(part)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}{where}") from None
        if value < minimum or (strict and value == minimum):
            bound = f"greater than {minimum:g}" if strict else f"{minimum:g} or more"
            raise argparse.ArgumentTypeError(f"{part!r} must be {bound}{where}")
        values.append(value)
    return tuple(values)


def positive_float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated positive finite numbers, e.g. ``0.001,0.01,0.1``."""
    return _float_list(text, 0.0, strict=True)


def nonnegative_float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite numbers >= 0, e.g. ``0,1e-4``."""
    return _float_list(text, 0.0, strict=False)


def _grid(values):
    """``(single value, None)`` for one value, ``(None, values)`` for a list to sweep."""
    if values is None:
        return None, None
    return (values[0], None) if len(values) == 1 else (None, values)


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in [0, 1)")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, total: int, stream, quiet: bool):
        self.stream, self.quiet, self.bar = stream, quiet, None
        if not quiet and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="epoch", file=stream, dynamic_ncols=True)

    def __call__(self, fit_state, record) -> None:
        if self.quiet:
            return
        speed = record["steps"] / record["seconds"] if record["seconds"] > 0 else float("inf")
        fields = {"loss": f"{record['train_loss']:.4g}"}
        if "val_loss" in record:
            fields["val_loss"] = f"{record['val_loss']:.4g}"
        if record.get("val_accuracy") is not None:
            fields["val_acc"] = f"{record['val_accuracy']:.4f}"
        fields["steps/s"] = f"{speed:,.0f}"
        if self.bar is not None:
            self.bar.update(record["epoch"] - self.bar.n)
            self.bar.set_postfix(fields, refresh=True)
        else:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"epoch {record['epoch']}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an MLP on a built-in dataset or a CSV/.npz file",
                       description="Train an MLP. Unset options take the dataset's preset (see docs).")
    src = p.add_argument_group("data")
    src.add_argument("--dataset", help="built-in dataset: seed, xor, moons, spirals, digits (default: digits)")
    src.add_argument("--data", metavar="FILE", help="a CSV file (with --target) or .npz file (arrays x, y)")
    src.add_argument("--target", metavar="COLUMN", help="the CSV column to predict")
    src.add_argument("--val-split", type=fraction, metavar="F", help="validation fraction (default 0.1)")
    src.add_argument("--test-split", type=fraction, metavar="F", help="test fraction (default 0.2)")
    m = p.add_argument_group("model and training")
    m.add_argument("--hidden", type=int_list, metavar="SIZES", help="hidden layer sizes, e.g. 64,64")
    m.add_argument("--activation", help="hidden activation, e.g. relu, tanh, sigmoid")
    m.add_argument("--loss", help="mse, half_sse, softmax_cross_entropy (cross_entropy), sigmoid_binary_cross_entropy (bce)")
    m.add_argument("--optimizer", help="sgd, adam or adamw")
    m.add_argument("--lr", type=positive_float_list, metavar="LR[,LR...]",
                   help="learning rate; a comma-separated list trains one member per value")
    m.add_argument("--weight-decay", type=nonnegative_float_list, metavar="WD[,WD...]",
                   help="adamw weight decay; a comma-separated list trains one member per value")
    m.add_argument("--seeds", type=positive_int, metavar="N",
                   help="train N members from seeds seed..seed+N-1 in one program (times each lr)")
    m.add_argument("--ensemble", action="store_true",
                   help="with several members, save them all; predict and evaluate average them")
    m.add_argument("--epochs", type=positive_int)
    m.add_argument("--batch-size", type=positive_int)
    m.add_argument("--seed", type=nonnegative_int, help="seed of every random draw (default 0)")
    m.add_argument("--patience", type=positive_int, help="early stopping after N epochs without improvement")
    m.add_argument("--skip-nonfinite", action="store_true",
                   help="skip updates with non-finite gradients instead of stopping")
    m.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype; bfloat16: mixed precision, float32 master params (default float32)")
    d = p.add_argument_group("devices and processes (see docs/distributed.md)")
    d.add_argument("--devices", type=devices_arg, metavar="N|all", help="data parallel over N devices or all")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: process 0's address")
    d.add_argument("--num-processes", type=positive_int, metavar="N", help="multi-process run: process count")
    d.add_argument("--process-id", type=nonnegative_int, metavar="I", help="multi-process run: this process")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write model.npz, metrics.jsonl and curves.png here")
    o.add_argument("--checkpoint-every", type=positive_int, metavar="N", help="checkpoint every N epochs into DIR/checkpoints")
    o.add_argument("--keep", type=positive_int, metavar="K", help="keep the newest K checkpoints (default 3)")
    o.add_argument("--resume", metavar="DIR", help="continue the run in DIR (an earlier --out) from its newest checkpoint")
    o.add_argument("--quiet", action="store_true", help="print nothing but errors (and --json)")
    o.add_argument("--json", action="store_true", help="print one JSON object with the final figures")
    p.set_defaults(run=_cmd_train)


def devices_arg(text: str):
    """argparse type: ``all`` or a positive number of devices."""
    return "all" if text == "all" else positive_int(text)


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


def _cmd_train(args) -> int:
    import json

    from jaxnet import checkpoint, parallel, sweep, train
    from jaxnet.loop import NonFiniteLossError

    # Before any other JAX use: joining a multi-process run must precede backend start-up.
    distributed = parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = parallel.make_data_mesh(args.devices) if args.devices or distributed else None
    json_stdout = args.json
    primary = parallel.is_primary()
    if not primary:  # only process 0 prints progress and writes files; all take part in checkpoints
        args.quiet, args.json = True, False
    (lr, lrs), (weight_decay, weight_decays) = _grid(args.lr), _grid(args.weight_decay)
    given = dict(
        dataset=args.dataset, data=args.data, target=args.target, hidden=args.hidden,
        activation=args.activation, loss=args.loss, optimizer=args.optimizer, lr=lr,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, val_split=args.val_split,
        test_split=args.test_split, patience=args.patience, dtype=args.dtype, weight_decay=weight_decay,
        seeds=args.seeds, lrs=lrs, weight_decays=weight_decays, ensemble=args.ensemble or None,
        skip_nonfinite=args.skip_nonfinite or None,
    )
    restored = None
    if args.resume:
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise CliError("--resume DIR writes on into DIR: drop --out")
        args.out = args.resume
        checkpoint.quiet_failed_reads()
        with _stdout_to_stderr(json_stdout):  # orbax may sync the processes here
            restored = checkpoint.restore(args.resume)
        for path, reason in restored.damaged:
            if primary:
                print(f"checkpoint {path.name} is damaged ({reason}); resuming from {restored.path.name}",
                      file=sys.stderr)
        checkpoint.check_overrides(restored.config, **given)
        config = restored.config
    else:
        for flag, value in (("--checkpoint-every N", args.checkpoint_every), ("--keep K", args.keep)):
            if value is not None and not args.out:
                raise CliError(f"{flag} needs --out DIR")
        config = train.make_config(**given)
    if sweep.is_member_run(config):
        if mesh is not None:
            raise CliError("member runs (--seeds, lists of --lr or --weight-decay) train on one device: "
                           "drop --devices and the multi-process options")
        if args.checkpoint_every or args.keep:
            raise CliError("member runs (--seeds, lists of --lr or --weight-decay) are not checkpointed: "
                           "drop --checkpoint-every and --keep")
        return _cmd_train_members(args, config)
    writes = args.out if primary else None  # metrics, plots and the model: process 0 only
    stream = sys.stderr if args.json else sys.stdout
    progress = Progress(config.epochs, stream, args.quiet)
    interrupt = checkpoint.Interrupt()
    callbacks = [progress, interrupt]
    if writes:
        callbacks.append(lambda fit_state, record: train.write_metrics(writes, fit_state.history))
    if restored is not None and writes:
        train.write_metrics(writes, restored.fit_state.history)  # epochs after the checkpoint are redone
        if restored.meta.get("finished") and not args.quiet:
            print(f"{args.out} already finished at epoch {restored.meta['epoch']}; not training further", file=stream)
    try:
        with interrupt, _stdout_to_stderr(json_stdout):
            if restored is not None:
                result = checkpoint.resume(args.out, callbacks, restored=restored,
                                           checkpoint_every=args.checkpoint_every, keep=args.keep, mesh=mesh)
            else:
                result = train.run(config, callbacks=callbacks, mesh=mesh, out=args.out,
                                   checkpoint_every=args.checkpoint_every, keep=args.keep or 3)
    except NonFiniteLossError as e:
        last = checkpoint.latest(args.out) if args.out else None
        hint = "--checkpoint-every N" if args.out else "--out DIR --checkpoint-every N"
        where = f"last good checkpoint: {last}" if last else f"no checkpoint was saved (use {hint})"
        raise CliError(f"{str(e).replace('(skip_nonfinite)', '(--skip-nonfinite)')}; {where}") from None
    finally:
        progress.close()
    if interrupt.signum is not None and not checkpoint.history_finished(config, result.history):
        epoch = result.history[-1]["epoch"] if result.history else 0
        if primary and args.out:
            print(f"interrupted at epoch {epoch}; checkpoint in {checkpoint.latest(args.out)}; "
                  f"resume with: jaxnet train --resume {args.out}", file=sys.stderr)
        elif primary:
            print(f"interrupted at epoch {epoch}; nothing was saved (train with --out DIR to keep checkpoints)",
                  file=sys.stderr)
        return interrupt.exit_code
    if writes:
        train.write_outputs(writes, result)
    summary = result.summary
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        parts = [f"{summary['epochs']} epochs in {summary['seconds']:.1f}s", f"train loss {summary['train_loss']:.4g}"]
        if summary["val_accuracy"] is not None:
            parts.append(f"validation accuracy {summary['val_accuracy']:.4f}")
        if summary["test_accuracy"] is not None:
            parts.append(f"test accuracy {summary['test_accuracy']:.4f}")
        print("; ".join(parts))
        if args.out:
            print(f"wrote {args.out}/model.npz, metrics.jsonl, curves.png")
    return 0


def _cmd_train_members(args, config) -> int:
    """``jaxnet train`` of several members (--seeds, lists of --lr/--weight-decay): one program."""
    import json
    from pathlib import Path

    from jaxnet import io, members, sweep, train

    stream = sys.stderr if args.json else sys.stdout
    k = sweep.num_members(config)
    grid = []  # built after the memory check, at the first epoch

    def progress(fit_state, record) -> None:
        if args.quiet:
            return
        active = sum(v is not None for v in record["train_loss"])
        line = f"epoch {record['epoch']}: {active}/{k} members training"
        for name in ("val_accuracy", "val_loss", "train_loss"):
            values = [v for v in record.get(name, []) if v is not None]
            if values:
                best = max(values) if name.endswith("accuracy") else min(values)
                line += f", best {name} {best:.4g}"
                break
        print(line, file=stream, flush=True)

    def write_metrics(fit_state, record) -> None:
        if not grid:
            grid.extend(members.member_grid(config.seeds, first_seed=config.seed, **sweep.grid_of(config)))
        io.write_jsonl(Path(args.out) / "metrics.jsonl", sweep.member_records(fit_state.history, grid))

    result = train.run(config, callbacks=[progress] + ([write_metrics] if args.out else []))
    if args.out:
        train.write_outputs(args.out, result)
    summary = result.summary
    if not args.quiet:
        print(sweep.format_members(summary), file=stream, flush=True)
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet and args.out:
        what = f"all {k} members" if config.ensemble else f"member {summary['best_member']}"
        print(f"wrote {args.out}/model.npz ({what}), metrics.jsonl (a line per member and epoch), curves.png")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="write a trained model's predictions as CSV to stdout")
    p.add_argument("--model", required=True, metavar="DIR", help="the --out folder of 'jaxnet train'")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV with the model's feature columns, or .npz with x")
    p.set_defaults(run=_cmd_predict)


def _cmd_predict(args) -> int:
    import csv

    import numpy as np

    from jaxnet import io, train

    saved = io.load_model(args.model)
    x, _ = train.load_features(saved, args.data)
    outputs = train.predict(saved, x)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    if saved.meta["task"] == "classification":
        if saved.meta["loss"] == "sigmoid_binary_cross_entropy":
            writer.writerow(["prediction", "probability"])
            writer.writerows([[int(p[0] > 0.5), f"{p[0]:.6g}"] for p in outputs])
        else:
            writer.writerow(["prediction"] + [f"prob_{k}" for k in range(outputs.shape[1])])
            writer.writerows([[int(np.argmax(p))] + [f"{v:.6g}" for v in p] for p in outputs])
    else:
        names = ["prediction"] if outputs.shape[1] == 1 else [f"prediction_{k}" for k in range(outputs.shape[1])]
        writer.writerow(names)
        writer.writerows([[f"{v:.8g}" for v in p] for p in outputs])
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="print a trained model's loss and accuracy on labelled data")
    p.add_argument("--model", required=True, metavar="DIR", help="the --out folder of 'jaxnet train'")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV or .npz file with features and targets")
    p.add_argument("--target", metavar="COLUMN", help="the CSV target column (default: the one trained on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import json

    from jaxnet import io, train

    saved = io.load_model(args.model)
    if args.target:
        saved = saved._replace(meta=dict(saved.meta, target=args.target))
    x, y = train.load_features(saved, args.data)
    if y is None and args.target:
        raise CliError(f"{args.data} has no column {args.target!r}: name its target column with --target")
    if y is None:
        raise CliError(f"{args.data} has no targets: name the target column with --target")
    metrics = train.evaluate(saved, x, y)
    if args.json:
        print(json.dumps(metrics))
    else:
        line = f"loss {metrics['loss']:.6g}"
        if metrics["accuracy"] is not None:
            line += f"  accuracy {metrics['accuracy']:.4f}"
        print(f"{line}  ({len(x)} examples)")
    return 0


def _add_seed(sub) -> None:
    p = sub.add_parser(
        "seed",
        help="the hand-worked example: one SGD step of a 3-2-2 sigmoid network, by autodiff",
        description="Forward pass, gradients and one SGD step of the notes' 3-2-2 sigmoid network "
        "(half sum of squares loss), in the notes' notation. w_jk is the weight from input k to neuron j.",
    )
    p.add_argument("--x", nargs="+", type=finite_float, metavar="X", help="3 inputs (default 0.5 0.5 0.1)")
    p.add_argument("--target", nargs="+", type=finite_float, metavar="T", help="2 targets (default 0.9 0.1)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--figure", metavar="FILE.png", help="also draw the annotated network to this file")
    p.set_defaults(run=_run_seed)


def _run_seed(args) -> int:
    import json

    from jaxnet.seed import format_worked_example, worked_example

    if args.figure:
        from jaxnet.plot import check_figure_path

        check_figure_path(args.figure)  # fail before computing
    result = worked_example(x=args.x, target=args.target, lr=args.lr)
    if args.figure:
        from jaxnet.plot import draw_network

        draw_network(result, args.figure)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_worked_example(result))
        if args.figure:
            print(f"figure written to {args.figure}")
    return 0


_SUBCOMMANDS = [_add_seed, _add_train, _add_predict, _add_evaluate]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except CliError as e:
        print(f"jaxnet: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxnet: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jaxnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
