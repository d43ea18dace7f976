"""A plain LightningCLI training script on digits, with no lightning-tda code in it.

The recorders come in through config files only:

    python examples/cli_train.py fit --trainer.max_epochs=2 \
        --config callbacks/record_margins.yaml --config callbacks/record_checkpoints.yaml
"""

from lightning.pytorch.cli import LightningCLI

from lightning_tda.data import DigitsDataModule
from lightning_tda.models import ImageClassifier


def main() -> None:
    LightningCLI(ImageClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
