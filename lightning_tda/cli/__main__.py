"""``python -m lightning_tda.cli``: the ``lightning-tda`` command (what launchers re-run)."""

from lightning_tda.cli.app import console

if __name__ == "__main__":
    console()
