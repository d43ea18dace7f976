"""Final-model-only attribution by further training: the seed paper's experiment on a small MLP.

Trains a final model with Lightning (a CheckpointRecorder keeps its weights in a RunStore), then,
from that checkpoint alone:

1. the gold standard: further training on the full training set and without each of
   ``--instances`` training examples, same batch order, ``--seeds`` seeds, evaluated after every
   epoch up to ``--epochs`` (``further_training_scores``);
2. gradient methods on the final model (Grad-Dot, Grad-Cos, influence functions: exact, CG,
   LiSSA and projected Gauss-Newton with a damping sweep, TRAK, DataInf, kronfluence's EK-FAC);
3. their cosine / Spearman agreement with the gold standard against the amount of further
   training, centred (the seed's default) and not, over 1, 5 and all seeds.

Figures, tables and saved results go to ``--out`` (and to W&B with ``--wandb``, offline unless
you log in). Datasets: scikit-learn's digits (``--dataset digits``, 8x8 images, an MLP) or
breast-cancer (``--dataset breast_cancer``, 30 standardised features, an MLP), both bundled.

    python examples/further_training.py                           # digits: ~45 min on a shared 2-core CPU
    python examples/further_training.py --dataset breast_cancer   # ~25 min
    python examples/further_training.py --methods grad_dot datainf influence_projected   # minutes
    python examples/further_training.py --fast                    # seconds (a smoke test)

Most of the full runs' time is LiSSA (1000 Hessian products per damping); the gold standard
itself takes about 6 min (digits: 20 seeds x 575 steps x 101 copies).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from lightning_tda.arguments import new_directory, non_negative_float, positive_float, positive_int
from lightning_tda.callbacks import CheckpointRecorder
from lightning_tda.data import DigitsDataModule, TensorImageDataset
from lightning_tda.further_training import (
    compare,
    epoch_steps,
    final_model_scores,
    further_training_scores,
    method_label,
)
from lightning_tda.models import MLP, ImageClassifier
from lightning_tda.reporting import Reporter
from lightning_tda.store import RunStore

FULL_METHODS = ("grad_dot", "grad_cos", "influence_exact", "influence_cg", "influence_lissa", "influence_projected",
                "trak", "datainf", "ekfac", "ekfac:heuristic")
FAST_METHODS = ("grad_dot", "grad_cos", "influence_projected:1", "trak", "datainf:0.1")
DAMPING_FACTORS = (0.1, 1.0, 10.0, 100.0)  # the seed paper's sweep (multiples of mean |g|^2 / p)
# one line per family in the main figure, each at a damping fixed in advance: the seed paper's
# choice for the full-parameter solvers (100x), DataInf's own default (0.1x), and the mean
# eigenvalue (1x, TRAK's default ridge) for the projected Gauss-Newton influence
PLOTTED = ("grad_dot", "grad_cos", "influence_exact:100", "influence_cg:100", "influence_lissa:100",
           "influence_projected:1", "trak", "datainf:0.1", "ekfac")


def breast_cancer(seed: int = 0) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's breast-cancer set: 455 training and 114 test examples, features
    standardised with the training split's mean and deviation."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:114], order[114:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return TensorImageDataset(x[train], y[train]), TensorImageDataset(x[test], y[test])


def datasets(name: str) -> tuple[TensorImageDataset, TensorImageDataset, int, int]:
    """``(train, test, in_features, classes)``."""
    if name == "digits":
        dm = DigitsDataModule()
        dm.setup()
        return dm.recording_dataset("train"), dm.recording_dataset("val"), 64, 10  # type: ignore[return-value]
    return (*breast_cancer(), 30, 2)


def train_final_model(args: argparse.Namespace, train, in_features: int, classes: int, store_dir: Path) -> RunStore:
    """Train the MLP with Lightning; a CheckpointRecorder keeps the final weights in a RunStore."""
    L.seed_everything(args.seed, verbose=False)
    module = ImageClassifier(MLP(in_features, args.hidden, classes, depth=3), num_classes=classes,
                             lr=args.train_lr, momentum=0.9, weight_decay=args.weight_decay)
    trainer = L.Trainer(
        max_epochs=args.train_epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, default_root_dir=str(store_dir.parent),
        callbacks=[CheckpointRecorder(store_dir, every_n_epochs=None, on_fit_end=True, overwrite=True)],
    )
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=args.batch_size, shuffle=True))
    return RunStore(store_dir)


def accuracy(model: torch.nn.Module, data) -> float:
    with torch.no_grad():
        return float((model(data.images).argmax(1) == data.targets).float().mean())


def markdown(frame, value: str) -> str:
    """A methods x epochs table of ``value`` (mean +- SEM)."""
    table = frame.pivot(index="label", columns="epoch", values=value)
    sem = frame.pivot(index="label", columns="epoch", values=value + "_sem")
    order = list(dict.fromkeys(frame["label"]))
    lines = ["| method | " + " | ".join(f"{e:g}" for e in table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for label in order:
        cells = [f"{table.loc[label, e]:.3f} ± {sem.loc[label, e]:.3f}" for e in table.columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("digits", "breast_cancer"), default="digits")
    parser.add_argument("--fast", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--epochs", type=positive_int, default=25, help="further-training epochs (evaluated after each)")
    parser.add_argument("--seeds", type=positive_int, default=20, help="seeds (batch orders) averaged over")
    parser.add_argument("--instances", type=positive_int, default=100, help="left-out training instances")
    parser.add_argument("--test", type=positive_int, default=100, help="test examples")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="further-training learning rate (SGD)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 64 (digits), 32 (breast_cancer)")
    parser.add_argument("--train-epochs", type=positive_int, default=None, help="final model: default 30 (digits), 100 (bc)")
    parser.add_argument("--train-lr", type=positive_float, default=0.05)
    parser.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="in training and further training")
    parser.add_argument("--hidden", type=positive_int, default=32, help="MLP width (two hidden layers)")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=new_directory, default=None, help="default runs/further_training/<dataset>")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline unless logged in)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    digits = args.dataset == "digits"
    args.batch_size = args.batch_size or (64 if digits else 32)
    args.train_epochs = args.train_epochs or (30 if digits else 100)
    if args.fast:
        args.epochs, args.seeds, args.instances, args.test, args.train_epochs = 2, 2, 8, 16, 3
    methods = tuple(args.methods or (FAST_METHODS if args.fast else FULL_METHODS))
    out = args.out or Path("runs/further_training") / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    train, test_all, in_features, classes = datasets(args.dataset)
    store = train_final_model(args, train, in_features, classes, out / "store")
    architecture = MLP(in_features, args.hidden, classes, depth=3)
    n_train = len(train)
    g = torch.Generator().manual_seed(args.seed + 1)
    instances = torch.randperm(n_train, generator=g)[: min(args.instances, n_train)].sort().values
    test = Subset(test_all, list(range(min(args.test, len(test_all)))))
    steps = epoch_steps(range(1, args.epochs + 1), n_train, args.batch_size)
    timings = {}

    start = time.perf_counter()
    gold = further_training_scores(
        architecture, train, test, instances, steps, args.seeds, store=store, lr=args.lr,
        batch_size=args.batch_size, weight_decay=args.weight_decay, keep_per_seed=True, progress=not args.fast,
    )
    timings["gold standard"] = time.perf_counter() - start
    gold.save(out / "gold")
    from lightning_tda.further_training import load_final_model

    final = load_final_model(architecture, store)
    start = time.perf_counter()
    scores = final_model_scores(final, train, test, instances, methods, weight_decay=args.weight_decay,
                                damping_factors=DAMPING_FACTORS, proj_dim=512, progress=not args.fast)
    timings["gradient methods"] = time.perf_counter() - start

    logger = None
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="lightning-tda", name=f"further_training_{args.dataset}", save_dir=str(out))
    reporter = Reporter(out / "report", logger)
    plotted = {k: v for k, v in scores.items() if k in PLOTTED} or scores
    main_cmp = compare(gold.averaged(center=True), plotted)
    main_cmp.log(reporter, "further_training")
    everything = compare(gold.averaged(center=True), scores)
    everything.save(out / "comparison")
    frame = everything.to_frame()
    frame.to_csv(out / "comparison.csv", index=False)

    # sensitivity: seeds 1 / 5 / all and centering, for Grad-Dot and the influence functions
    sensitivity = {}
    focus = [k for k in ("grad_dot", "influence_exact:100", "influence_cg:100", "datainf:0.1") if k in scores]
    for center in (True, False):
        for count in sorted({1, min(5, args.seeds), args.seeds}):
            cmp = compare(gold.averaged(seeds=count, center=center), {k: scores[k] for k in focus})
            mean, sem = cmp.statistic("cosine")
            for a, key in enumerate(focus):
                sensitivity[f"{method_label(key)}|{'centred' if center else 'not centred'}|{count} seeds"] = {
                    "first": (float(mean[a, 0]), float(sem[a, 0])), "last": (float(mean[a, -1]), float(sem[a, -1])),
                    "max": float(np.nanmax(mean[a])), "argmax_epoch": int(np.nanargmax(mean[a])) + 1,
                }

    summary = {
        "dataset": args.dataset, "n_train": n_train, "n_test": len(test), "instances": len(instances),
        "seeds": args.seeds, "epochs": args.epochs, "steps_per_epoch": steps[0], "lr": args.lr,
        "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "final_train_accuracy": accuracy(final, train), "final_test_accuracy": accuracy(final, test_all),
        "timings_s": timings, "sensitivity": sensitivity, "gold": gold.summary(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "cosine.md").write_text(markdown(frame, "cosine"))
    (out / "spearman.md").write_text(markdown(frame, "spearman"))
    print(f"final model: train accuracy {summary['final_train_accuracy']:.3f}, "
          f"test accuracy {summary['final_test_accuracy']:.3f}")
    print(f"gold standard: {len(instances)} instances x {len(test)} test examples x {args.seeds} seeds x "
          f"{args.epochs} epochs in {timings['gold standard']:.1f} s; methods in {timings['gradient methods']:.1f} s")
    print("\ncosine with further training (centred), mean ± SEM over test examples, by epoch:\n")
    print(markdown(frame, "cosine"))
    print(f"\nfigures and tables in {out}")
    return summary


if __name__ == "__main__":
    main()
