"""Train a small CNN on the bundled digits with both recorders, then show what the store holds.

    python examples/record_digits.py               # 10 epochs, a minute or so on 2 CPU cores
    python examples/record_digits.py --fast        # 2 epochs on 300 examples, seconds

Each run is a new training run, so it needs a store of its own: the default paths are
``runs/record_digits`` (full) and ``runs/record_digits_fast`` (``--fast``); rerunning into an
existing store is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import numpy as np

from lightning_tda.arguments import new_directory, positive_int
from lightning_tda import schema
from lightning_tda.callbacks import CheckpointRecorder, MarginRecorder, read_margins
from lightning_tda.data import DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.store import RunStore


def main(argv: list[str] | None = None) -> RunStore:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=new_directory, default=None,
                        help="RunStore directory (default: runs/record_digits, or runs/record_digits_fast with --fast)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs (>= 1)")
    parser.add_argument("--fast", action="store_true", help="a seconds-long run for smoke tests")
    parser.add_argument("--overwrite", action="store_true", help="clear an existing store's records first")
    args = parser.parse_args(argv)
    epochs, n_train = (2, 300) if args.fast else (args.epochs, None)
    if args.store is None:
        args.store = Path("runs/record_digits_fast" if args.fast else "runs/record_digits")

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(args.store.parent),
        callbacks=[
            MarginRecorder(args.store, splits=("train", "val"), every_n_epochs=1, embeddings="model.fc1",
                           overwrite=args.overwrite),
            CheckpointRecorder(args.store, every_n_epochs=1, overwrite=args.overwrite),
        ],
    )
    trainer.fit(ImageClassifier(DigitsCNN()), DigitsDataModule(n_train=n_train))

    store = RunStore(args.store)
    print(store.summary())
    margins, records = read_margins(store, "val")
    preds = store.read(schema.record_array(schema.PREDS, "val"))[[r[schema.INDEX] for r in records]]
    dm = DigitsDataModule()
    labels = dm.recording_dataset("val").targets.numpy()
    for record, row, pred in zip(records, margins, preds):
        print(
            f"  {record[schema.TAG]:>9} step {record[schema.GLOBAL_STEP]:>4}: val margin median {np.median(row):6.2f}, "
            f"val accuracy {(pred == labels).mean():.3f}"
        )
    hardest = np.argsort(margins[-1])[:5]
    values = ", ".join(f"{v:.2f}" for v in margins[-1][hardest])
    print(f"  lowest final val margins: examples {hardest.tolist()} ({values})")
    return store


if __name__ == "__main__":
    main()
