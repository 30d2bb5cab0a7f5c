"""The ``jaxnet`` command line: parses arguments, calls the library, maps errors to exit codes.

This is the only module that prints or exits. Every error is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import math
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


_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except CliError as e:
        print(f"jaxnet: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxnet: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jaxnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
