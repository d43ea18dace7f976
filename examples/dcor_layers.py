"""Layer-by-layer comparison of two networks on digits with distance correlation (Zhen et al., ECCV 2022).

Two DigitsCNN classifiers are trained from different seeds (or a model is compared with itself
with ``--same``). Every layer of A is compared with every layer of B over the validation images:
a dCor heatmap and a linear-CKA heatmap, and with the labels as the third signal the partial dCor
of each layer of A with the labels given each layer of B (what A knows beyond B) and the other
way round. The dCor values come from one blockwise pass over all layers' distance tiles.

Writes ``<out>/figures/layers.png`` (the four heatmaps), ``<out>/tables/layers_table.csv``,
``<out>/metrics.csv`` and the result; with ``--wandb`` an offline W&B run under ``<out>`` too.

    python examples/dcor_layers.py             # ~20 s on 2 cores
    python examples/dcor_layers.py --fast      # seconds (what the test runs)
    python examples/dcor_layers.py --same      # a model against itself: 1 on the diagonal
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_tda.arguments import new_directory, positive_int
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor.layers import LayerComparison, compare_layers
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.reporting import Reporter


def train(seed: int, datamodule: DigitsDataModule, epochs: int) -> ImageClassifier:
    L.seed_everything(seed, verbose=False)
    model = ImageClassifier(DigitsCNN())
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    return model


def main(argv: list[str] | None = None) -> LayerComparison:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="A from this seed, B from seed + 1")
    parser.add_argument("--same", action="store_true", help="compare model A with itself")
    parser.add_argument("--partial", choices=["partial_distance_correlation", "semi_partial_distance_correlation"],
                        default="partial_distance_correlation")
    parser.add_argument("--n-train", type=positive_int, default=None, help="training images (default: all 1,438)")
    parser.add_argument("--fast", action="store_true", help="2 epochs")
    parser.add_argument("--out", type=new_directory, default=Path("runs/dcor_layers"))
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs = 2
    torch.set_num_threads(min(2, torch.get_num_threads()))

    datamodule = DigitsDataModule(batch_size=64, n_train=args.n_train)
    datamodule.setup()
    model_a = train(args.seed, datamodule, args.epochs)
    model_b = model_a if args.same else train(args.seed + 1, datamodule, args.epochs)
    result = compare_layers(model_a, model_b, datamodule.recording_dataset("val"), signal="labels",
                            partial=args.partial, model_names=("A", "A" if args.same else "B"))
    logger = None
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(args.out), offline=True, project="lightning-tda-dcor")
    result.log(Reporter(args.out, logger), "layers")
    result.save(args.out / "result")
    if logger is not None:
        logger.experiment.finish()

    print(f"digits, {args.epochs} epochs, {result.n_examples} validation images, layers: {', '.join(result.layers_a)}")
    print()
    print("| figure | value |")
    print("| --- | --- |")
    for key, value in result.summary().items():
        print(f"| {key} | {value:.4f} |")
    print(f"\nfiles under {args.out}")
    return result


if __name__ == "__main__":
    main()
