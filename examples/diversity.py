"""Ensemble diversity on digits: which models make different mistakes, and what combining them gains.

After Gontijo-Lopes, Dauphin and Cubuk (ICLR 2022). A family of digits classifiers, ``--seeds``
models per configuration, each group trained at once by the ensemble engine:

- base CNN (seed only differs within the group),
- CNNs with other learning rates and weight decays (hyper-parameters),
- MLPs (architecture),
- CNNs trained with random 1-pixel shifts (augmentation),
- CNNs on two disjoint halves of the training split (data).

Every model is temperature-scaled on a held-out split, then every pair is compared on the test
split: error inconsistency, error consistency (kappa), disagreement, the pair's ensemble
(probability averaging) and its gain, grouped by what the pair differs in, over all pairs and over
the pairs with a base CNN (one factor at a time). Then a greedy ensemble selection on the held-out
split, and the representation overlap of a base CNN with one model of each other group (linear
probes on mixed and concatenated penultimate features, dCor / partial dCor, linear CKA).

    python examples/diversity.py              # the full family: minutes on a 2-core CPU
    python examples/diversity.py --fast       # seconds (what the test runs)
    python examples/diversity.py --n-train 300 --out runs/diversity_hard   # a harder split
    python examples/diversity.py --wandb      # also to an (offline) W&B run

Tables and figures go to ``<out>/figures`` and ``<out>/tables`` (and W&B with ``--wandb``).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pandas as pd
import torch

from lightning_tda.diversity import DiversityReport, DiversitySettings, diversity_report, representation_overlap
from lightning_tda.diversity.family import FamilySettings, train_digits_family
from lightning_tda.diversity.overlap import layer_embeddings
from lightning_tda.reporting import Reporter

PENULTIMATE = {"cnn": "relu", "mlp": "net.2"}  # DigitsCNN: ReLU after fc1 (64); MLP: ReLU of its hidden layer


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a small family, 2 epochs (seconds)")
    parser.add_argument("--seeds", type=positive(int), default=None, help="models per configuration (>= 2; default 4, fast 2)")
    parser.add_argument("--epochs", type=positive(int), default=None, help="training epochs (default 30, fast 2)")
    parser.add_argument("--n-train", type=positive(int), default=None, help="cap the training examples (a harder task)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the digits split and the data halves")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/diversity[_fast])")
    parser.add_argument("--wandb", action="store_true", help="also log to a W&B run (offline unless logged in)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 2:
        parser.error(f"--seeds must be >= 2 (pairs within a configuration), got {args.seeds}")
    if args.n_train is not None and args.n_train < 4:
        parser.error(f"--n-train must be >= 4, got {args.n_train}")
    if args.out is None:
        args.out = Path("runs/diversity_fast" if args.fast else "runs/diversity")
    return args


def family_settings(args: argparse.Namespace) -> FamilySettings:
    if args.fast:
        return FamilySettings(seeds=args.seeds or 2, epochs=args.epochs or 2, cnn_width=8, mlp_hidden=64,
                              hyperparameters=((0.02, 0.0),), n_train=args.n_train, split_seed=args.split_seed)
    return FamilySettings(seeds=args.seeds or 4, epochs=args.epochs or 30, n_train=args.n_train, split_seed=args.split_seed)


def overlaps(family, repeats: int) -> list:
    """A base CNN against the first model of every other configuration."""
    first = {}
    for name, desc in zip(family.names, family.descriptions):
        first.setdefault(name.rsplit("-s", 1)[0], (name, desc))
    base_name, base_desc = first.pop("cnn")
    base = family.models[family.names.index(base_name)]
    results = []
    for name, desc in first.values():
        other = family.models[family.names.index(name)]
        emb = [
            [layer_embeddings(model, PENULTIMATE[d["architecture"]], split) for split in (family.train, family.test)]
            for model, d in ((base, base_desc), (other, desc))
        ]
        results.append(representation_overlap(
            emb[0][0], emb[1][0], family.train.targets, emb[0][1], emb[1][1], family.test.targets,
            names=(base_name, name), repeats=repeats,
        ))
    return results


def main(argv: list[str] | None = None) -> DiversityReport:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", ".*(LeafSpec|does not have many workers|GPU available).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)

    family = train_digits_family(family_settings(args), progress=True)
    base = tuple(n for n in family.names if n.rsplit("-s", 1)[0] == "cnn")
    settings = DiversitySettings(anchors=base)
    report = diversity_report(family.models, family.test, held_out=family.held_out, names=family.names,
                              descriptions=family.descriptions, settings=settings)
    report = DiversityReport(report.diversity, report.selection, tuple(overlaps(family, repeats=1 if args.fast else 3)))

    result = report.diversity
    cols = ["category", "pairs", "member_accuracy_mean", "error_inconsistency_mean", "error_inconsistency_low",
            "error_inconsistency_high", "ensemble_gain_mean_mean", "ensemble_gain_mean_low", "ensemble_gain_mean_high",
            "error_consistency_mean"]
    print(f"\n{len(family.models)} models; train {len(family.train)}, held-out {len(family.held_out)}, test {len(family.test)}")
    print("\nMembers (test split; temperature fitted on the held-out split):")
    print(result.members_frame()[["model", "accuracy", "temperature", "nll_before", "nll_after"]].round(4).to_string(index=False))
    print("\nPairs by what they differ in (all pairs; mean and 95% interval over pairs):")
    print(result.category_frame()[cols].round(4).to_string(index=False))
    print("\nPairs with a base CNN (one factor at a time):")
    print(result.category_frame(anchors=base)[cols].round(4).to_string(index=False))
    print("\nGreedy selection on the held-out split:")
    print(report.selection.to_frame().round(4).to_string(index=False))
    print(f"low-accuracy picks (below the pool's median): {report.selection.low_accuracy_picks() or 'none'}")
    print("\nRepresentation overlap (penultimate features; probes fitted on train, scored on test):")
    rows = [{"pair": f"{o.names[0]} vs {o.names[1]}", **{k: round(v, 4) for k, v in o.summary().items()}} for o in report.overlaps]
    print(pd.DataFrame(rows).to_string(index=False))

    logger = None
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="lightning-tda", name="diversity", save_dir=str(args.out))
    reporter = Reporter(args.out, logger)
    report.log(reporter, "diversity")
    report.save(args.out / "result")
    if logger is not None:
        logger.experiment.finish()
    print(f"\nfigures: {args.out / 'figures'}  tables: {args.out / 'tables'}  result: {args.out / 'result'}")
    return report


if __name__ == "__main__":
    main()
