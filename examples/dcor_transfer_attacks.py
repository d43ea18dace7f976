"""Diverse models against transfer attacks on digits (the recipe of Zhen et al., ECCV 2022).

For each seed: a source model M0 is trained normally; M1, M2, ... are each trained with the dCor
penalty to the frozen earlier models (weight 0.05 on L2-normalised penultimate features), and
their twins M1', M2', ... from the same seeds without it. FGSM and PGD examples (L-inf, several
eps) are crafted on M0 and every model is evaluated on them. The table gives clean and attacked
accuracy with and without the penalty (mean ± sd over seeds) and the paired gain.

Writes ``<out>/figures/transfer_attacks.png``, ``<out>/tables/transfer_attacks_*.csv``,
``<out>/metrics.csv`` and the result (``<out>/result``); with ``--wandb`` the same goes to an
offline W&B run under ``<out>`` (``wandb sync`` uploads it).

    python examples/dcor_transfer_attacks.py                      # 3 seeds, ~3 minutes on 2 cores
    python examples/dcor_transfer_attacks.py --fast               # seconds (what the test runs)
    python examples/dcor_transfer_attacks.py --weight 0.5 --seeds 0 1 2 3 4 --wandb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_tda.arguments import new_directory, non_negative_float, positive_int
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor.attacks import DEFAULT_EPS
from lightning_tda.dcor.transfer_attacks import TransferAttackResult, diverse_models_against_transfer_attacks
from lightning_tda.reporting import Reporter


def main(argv: list[str] | None = None) -> TransferAttackResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=positive_int, default=3, help="models per family (>= 2): M0 and M1..")
    parser.add_argument("--weight", type=non_negative_float, default=0.05, help="dCor penalty weight (seed: 0.05)")
    parser.add_argument("--epochs", type=positive_int, default=8)
    parser.add_argument("--eps", type=non_negative_float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument("--pgd-steps", type=positive_int, default=40)
    parser.add_argument("--n-train", type=positive_int, default=None, help="training images (default: all 1,438)")
    parser.add_argument("--fast", action="store_true", help="1 seed, 2 models, 2 epochs, 2 radii, 10 PGD steps")
    parser.add_argument("--out", type=new_directory, default=Path("runs/dcor_transfer_attacks"))
    parser.add_argument("--wandb", action="store_true", help="also log to an offline W&B run")
    args = parser.parse_args(argv)
    if args.size < 2:
        parser.error("--size must be >= 2 (a source and at least one model decorrelated from it)")
    if args.fast:
        args.seeds, args.size, args.epochs, args.pgd_steps = [0], 2, 2, 10
        args.eps = [0.1, 0.3]
    torch.set_num_threads(min(2, torch.get_num_threads()))

    result = diverse_models_against_transfer_attacks(
        datamodule=DigitsDataModule(batch_size=64, n_train=args.n_train), seeds=args.seeds, size=args.size,
        weight=args.weight, epochs=args.epochs, eps=args.eps, pgd_steps=args.pgd_steps, progress=not args.fast,
    )
    logger = None
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(args.out), offline=True, project="lightning-tda-dcor")
    result.log(Reporter(args.out, logger), "transfer_attacks")
    result.save(args.out / "result")
    if logger is not None:
        logger.experiment.finish()
    print(f"digits, seeds {list(result.seeds)}, family of {args.size}, penalty weight {args.weight}, "
          f"{args.epochs} epochs, {result.n_examples} validation images; accuracy (%), mean ± sd over seeds")
    print()
    print(result.to_markdown())
    dcor = result.dcor_to_source.mean(0)
    print()
    print("dCor to the source (penultimate features, mean over seeds): "
          + ", ".join(f"{m} {d:.3f}" for m, d in zip(result.models, dcor)))
    print(f"files under {args.out}")
    return result


if __name__ == "__main__":
    main()
