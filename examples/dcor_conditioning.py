"""Conditioning one model on another on digits (Zhen et al., ECCV 2022, their ViT given a ResNet).

For each seed: model A is trained normally; model B is trained to maximise the partial dCor of
its penultimate features with the labels given A's (``DistanceCorrelationPenalty.conditioned_on``:
semi-partial dCor, weight 0.1 as in the seed's code), and its twin B' from the same seed without
that term. Reported on the validation images: accuracy, what B (B') knows about the labels beyond
A and A beyond B (B'), dCor(A, B), and the accuracy of the ensembles A+B and A+B'.

Writes ``<out>/figures/conditioning.png``, ``<out>/tables/conditioning_*.csv``,
``<out>/metrics.csv`` and the result; with ``--wandb`` an offline W&B run under ``<out>`` too.

    python examples/dcor_conditioning.py            # 3 seeds, ~1 minute on 2 cores
    python examples/dcor_conditioning.py --fast     # seconds (what the test runs)
    python examples/dcor_conditioning.py --weight 1.0 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_tda.arguments import new_directory, non_negative_float, positive_int
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor.conditioning import ConditioningResult, condition_on_model
from lightning_tda.reporting import Reporter


def main(argv: list[str] | None = None) -> ConditioningResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weight", type=non_negative_float, default=0.1, help="weight of 1 - pdCor (seed's code: 0.1)")
    parser.add_argument("--statistic", choices=["semi_partial_distance_correlation", "partial_distance_correlation"],
                        default="semi_partial_distance_correlation")
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--n-train", type=positive_int, default=None, help="training images (default: all 1,438)")
    parser.add_argument("--fast", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--out", type=new_directory, default=Path("runs/dcor_conditioning"))
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.epochs = [0], 2
    torch.set_num_threads(min(2, torch.get_num_threads()))

    result = condition_on_model(datamodule=DigitsDataModule(batch_size=64, n_train=args.n_train), seeds=args.seeds,
                                weight=args.weight, statistic=args.statistic, epochs=args.epochs,
                                progress=not args.fast)
    logger = None
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(args.out), offline=True, project="lightning-tda-dcor")
    result.log(Reporter(args.out, logger), "conditioning")
    result.save(args.out / "result")
    if logger is not None:
        logger.experiment.finish()
    print(f"digits, seeds {list(result.seeds)}, weight {args.weight}, {args.epochs} epochs, {result.n_examples} "
          f"validation images; accuracy of A {result.accuracy_given.mean():.3f}; mean ± sd over seeds")
    print()
    print(result.to_markdown())
    print(f"\nfiles under {args.out}")
    return result


if __name__ == "__main__":
    main()
