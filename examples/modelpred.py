"""ModelPred on digits (raw pixels and a CNN's recorded features) and on breast-cancer.

    python examples/modelpred.py              # a few minutes on 2 CPU cores
    python examples/modelpred.py --fast       # small pools and short training, under a minute or two

For each dataset ModelPred is fitted in one call; then, from the fitted predictor: the accuracy of
its predicted models on held-out subsets, Shapley values, label cleaning (10% flipped), and on
raw digits also memorisation, greedy data selection, calibration and deletion. Every result is
written through a ``Reporter`` (figures, tables, metrics) under ``--out``.

The CNN features come from a store: a small CNN is trained on digits with
``MarginRecorder(embeddings="model.fc1")`` and its penultimate features are read back with
``embeddings_from_store``, as the paper did with a CNN on MNIST.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_tda.arguments import new_directory, positive_int
from lightning_tda.callbacks import MarginRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.modelpred import (
    ModelPred,
    calibration_study,
    cleaning_study,
    counterfactual_study,
    embeddings_from_store,
    greedy_selection,
    memorization,
    modelpred_shapley,
    prediction_accuracy,
)
from lightning_tda.modelpred.demo import digits_split
from lightning_tda.modelpred.pairs import sample_masks
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.reporting import Reporter


SMOKE_SETTINGS: dict[str, Any] = {
    "num_permutations": 4, "prefixes_per_permutation": 8, "num_random_subsets": 64, "num_validation_subsets": 32,
    "max_epochs": 4, "hidden": 64, "set_features": 64,
}
"""--fast: enough to run every step, not to predict well (the full settings are ModelPred's defaults)."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=new_directory, default=Path("runs/modelpred_example"), help="report directory")
    parser.add_argument("--n-train", type=positive_int, default=300, help="training pool size per dataset")
    parser.add_argument("--n-test", type=positive_int, default=300, help="test examples per dataset")
    parser.add_argument("--cnn-epochs", type=positive_int, default=8, help="epochs of the digits CNN whose features are used")
    parser.add_argument("--permutations", type=positive_int, default=500, help="permutations of ModelPred Shapley")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="small pools and short training (for smoke tests)")
    args = parser.parse_args(argv)
    if args.fast:
        args.n_train, args.n_test, args.cnn_epochs, args.permutations = 60, 100, 1, 50
    if args.n_train < 10:
        parser.error("--n-train must be at least 10 (a pool to value)")
    if args.n_train + args.n_test > 1797:
        parser.error(f"--n-train + --n-test must be at most 1797 (the digits), got {args.n_train + args.n_test}")
    return args


def held_out_accuracy(mp: ModelPred, xt: np.ndarray, yt: np.ndarray, seed: int, label: str) -> Any:
    masks = sample_masks(mp.target.n, 4, 8, 32, seed + 999)  # subsets the set network never saw
    return prediction_accuracy(mp, masks, xt, yt, label=label)


def study(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, num_classes: int, args: argparse.Namespace,
          reporter: Reporter, settings: dict[str, Any], extras: bool = False) -> None:
    start = time.perf_counter()
    mp = ModelPred.fit(x, y, target="logistic", seed=args.seed, num_classes=num_classes, progress=not args.fast, **settings)
    print(f"[{name}] ModelPred fitted on {len(y)} examples in {time.perf_counter() - start:.0f} s ({len(mp.history)} epochs)")
    accuracy = held_out_accuracy(mp, xt, yt, args.seed, name)
    accuracy.log(reporter, f"{name}_accuracy")
    s = accuracy.summary()
    print(f"[{name}] held-out subsets: relative parameter error {s['relative_error_mean']:.3f}, test-accuracy gap {s['accuracy_gap_mean']:.3f}")
    values = modelpred_shapley(mp, xt, yt, num_permutations=args.permutations, seed=args.seed)
    values.log(reporter, f"{name}_shapley")
    print(f"[{name}] ModelPred Shapley values of {len(y)} examples from {args.permutations} permutations in {values.seconds:.2f} s")
    cleaning = cleaning_study(
        x, y, xt, yt, flip_fraction=0.1, methods=("modelpred_shapley", "knn_shapley", "influence"), num_classes=num_classes,
        shapley_permutations=args.permutations, seed=args.seed, modelpred_settings=settings,
    )
    cleaning.log(reporter, f"{name}_cleaning")
    found = ", ".join(f"{m} {f}" for m, f in zip(cleaning.methods, cleaning.found))
    print(f"[{name}] cleaning: of {int(cleaning.flipped.sum())} flipped labels the lowest values find: {found}")
    if not extras:
        return
    mem = memorization(mp)
    mem.log(reporter, f"{name}_memorization")
    top = mem.top(16)
    reporter.log_image_grid(f"{name}_most_memorized", x[top].reshape(-1, 8, 8), captions=[f"#{i} label {y[i]}" for i in top])
    half = len(yt) // 2
    selection = greedy_selection(mp, xt[:half], yt[:half], size=max(2, len(y) // 5), x_test=xt[half:], y_test=yt[half:], seed=args.seed)
    selection.log(reporter, f"{name}_selection")
    s = selection.summary()
    print(f"[{name}] greedy selection of {len(selection.selected)}: test accuracy {s['greedy_test_accuracy']:.3f} against {s['random_test_accuracy']:.3f} for random subsets")
    calibration = calibration_study(mp, xt, yt, num_models=32, seed=args.seed)
    calibration.log(reporter, f"{name}_calibration")
    print(f"[{name}] expected calibration error: single model {calibration.ece_single:.3f}, ModelPred ensemble "
          f"{calibration.ece_predicted_ensemble:.3f}, exact ensemble {calibration.ece_exact_ensemble:.3f}")
    deletion = counterfactual_study(mp, "deletion", (0.1, 0.3, 0.5), num_trials=4, x_test=xt, y_test=yt, seed=args.seed)
    deletion.log(reporter, f"{name}_deletion")
    errors = ", ".join(f"{m} {deletion.errors[i].mean():.3f}" for i, m in enumerate(deletion.methods))
    print(f"[{name}] deletion of 10-50%: relative parameter error {errors}")


def cnn_features(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """Train the digits CNN with a MarginRecorder that records ``model.fc1``; read the features back."""
    store = args.out / "cnn_store"
    dm = DigitsDataModule(split_seed=args.seed)
    L.seed_everything(args.seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=args.cnn_epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not args.fast, default_root_dir=str(args.out),
        callbacks=[MarginRecorder(store, splits=("train", "val"), every_n_epochs=None, on_fit_end=True, embeddings="model.fc1", overwrite=True)],
    )
    trainer.fit(ImageClassifier(DigitsCNN()), dm)
    train, val = embeddings_from_store(store, "train"), embeddings_from_store(store, "val")
    y_train = dm.recording_dataset("train").targets.numpy()
    y_val = dm.recording_dataset("val").targets.numpy()
    scale = np.abs(train).max()  # one constant for all features, as the paper scaled its CNN features
    return train[: args.n_train] / scale, y_train[: args.n_train], val[: args.n_test] / scale, y_val[: args.n_test]


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reporter = Reporter(args.out)
    settings = SMOKE_SETTINGS if args.fast else {}
    x, y, xt, yt = digits_split(args.n_train, args.n_test, seed=args.seed)
    study("digits_pixels", x, y, xt, yt, 10, args, reporter, settings, extras=True)
    study("digits_cnn_features", *cnn_features(args), 10, args, reporter, settings)
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    bc = load_breast_cancer()
    order = np.random.default_rng(args.seed).permutation(len(bc.target))
    xb, yb = StandardScaler().fit_transform(bc.data)[order], bc.target[order]
    n_test = min(args.n_test, len(yb) - args.n_train)
    if n_test < 1:
        raise SystemExit(f"breast-cancer has {len(yb)} examples: --n-train must leave some for testing")
    study("breast_cancer", xb[: args.n_train], yb[: args.n_train], xb[args.n_train : args.n_train + n_test], yb[args.n_train : args.n_train + n_test], 2, args, reporter, settings)
    print(f"reports under {args.out}/ (figures/, tables/, metrics.csv)")
    return args.out


if __name__ == "__main__":
    main()
