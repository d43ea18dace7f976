"""``lightning-tda record``: train any LightningModule with the recorders, through Lightning's
own ``LightningCLI`` (its ``fit``/``validate``/... subcommands, ``--config`` files, ``--help``).

The model defaults to :class:`~lightning_tda.models.ImageClassifier` and the data to
:class:`~lightning_tda.data.DigitsDataModule`; any other class is given by its import path::

    lightning-tda record fit --trainer.max_epochs 5 \\
        --config callbacks/record_margins.yaml --config callbacks/record_gradients.yaml
    lightning-tda record fit --model my_package.MyModule --data my_package.MyData ...
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class RecordCLI(LightningCLI):
    """LightningCLI with the digits classifier and data as defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({
            "model": {"class_path": "lightning_tda.models.ImageClassifier"},
            "data": {"class_path": "lightning_tda.data.DigitsDataModule"},
        })


def record(args: Sequence[str]) -> int:
    """Run LightningCLI on ``args``; returns the exit code."""
    import sys

    sys.argv = [sys.argv[0], *args]  # LightningCLI parses sys.argv (given args beside it, it warns)
    try:
        RecordCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "lightning-tda record"},
        )
    except SystemExit as exit_:  # argument errors and --help: LightningCLI's own exit code
        return int(exit_.code or 0)
    return 0
