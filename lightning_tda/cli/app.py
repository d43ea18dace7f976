"""The ``lightning-tda`` command: one jsonargparse parser with a subcommand per job.

Every subcommand is a typed function (its docstring is its ``--help``); ``record`` hands its
arguments to Lightning's own ``LightningCLI``. Bad input becomes one line on stderr and exit code
2, before anything is written: commands check their inputs (paths, stores, fingerprints) first
and create their output directory last. ``LIGHTNING_TDA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Any, Callable, Sequence

from jsonargparse import ArgumentParser

from lightning_tda.store import StoreError

# Errors that mean "the input was wrong": one line and exit code 2. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, StoreError)


class UsageError(ValueError):
    """A command's arguments do not make sense together."""


def _commands() -> dict[str, Callable[..., Any]]:
    from lightning_tda.cli import analyses, demo, scale

    return {
        "demo": demo.demo,
        "attribute": analyses.attribute,
        "lds": analyses.lds_command,
        "modeldiff": analyses.modeldiff_command,
        "diversity": analyses.diversity_command,
        "report": analyses.report,
        "sweep": scale.sweep,
    }


def _summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def build_parser() -> ArgumentParser:
    """The parser of every subcommand but ``record`` (which LightningCLI parses)."""
    parser = ArgumentParser(
        prog="lightning-tda",
        description="Training-data attribution and model comparison for PyTorch Lightning.",
        exit_on_error=False,
    )
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, fn in _commands().items():
        description = (inspect.getdoc(fn) or "").split("\nArgs:")[0].strip()
        sub = ArgumentParser(description=description, exit_on_error=False)
        positional = getattr(fn, "positional", None)
        if positional:
            sub.add_argument(positional, nargs="+", type=str, help=getattr(fn, "positional_help", ""))
        several = getattr(fn, "several", {})  # options that take several values: --a X Y Z
        for option, text in several.items():
            sub.add_argument(f"--{option}", nargs="+", type=str, required=True, help=text)
        skip = ({positional} if positional else set()) | set(several)
        sub.add_function_arguments(fn, skip=skip or None, as_group=False)
        subcommands.add_subcommand(name, sub, help=_summary(fn))
    subcommands.add_subcommand(
        "record", ArgumentParser(add_help=False), help="train with the recorders: Lightning's LightningCLI (fit, validate, ...)"
    )
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-tda`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "record":
        from lightning_tda.cli.record import record

        return record(args[1:])
    parser = build_parser()
    try:
        config = parser.parse_args(args)
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        command = args[0] if args and not args[0].startswith("-") else ""
        print(f"lightning-tda {command}: error: {_one_line(err)} (see lightning-tda {command} --help)".replace("  ", " "), file=sys.stderr)
        return 2
    name = config.command
    kwargs = dict(vars(config[name]))
    kwargs.pop("__path__", None)
    fn = _commands()[name]
    try:
        fn(**kwargs)
    except USER_ERRORS as err:
        if os.environ.get("LIGHTNING_TDA_DEBUG"):
            raise
        print(f"lightning-tda {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """``lightning-tda`` (the console script)."""
    sys.exit(main())
