"""The ``lightning-tda`` command line: ``demo``, ``record``, ``attribute``, ``lds``, ``modeldiff``,
``diversity``, ``report`` and ``sweep`` (``lightning-tda <command> --help`` for each)."""

from lightning_tda.cli.app import build_parser, console, main

__all__ = ["build_parser", "console", "main"]
