"""A ModelDiff case study on digits, end to end: what the ``examples/modeldiff_*.py`` scripts run.

Two algorithms (:class:`Algorithm`: a datamodule with its augmentation and batch size, a model
start and a learning rate) are each trained several times with the recorders
(:func:`~lightning_tda.modeldiff.digits.record_runs`), compared with
:func:`~lightning_tda.modeldiff.pipeline.compare_algorithms` (TRAK over each algorithm's models,
the noise floor from halves of them, and a transformation verified on both), logged through a
reporter, printed as tables, and summed up in one picture.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
from torch import Tensor, nn

from lightning_tda.arguments import new_directory, positive_int
from lightning_tda.data import TensorImageDataset
from lightning_tda.modeldiff.digits import accuracy, record_runs
from lightning_tda.modeldiff.pipeline import ModelDiffReport, compare_algorithms, markdown_table
from lightning_tda.results import ReporterLike

RECORD_EPOCHS = (0, 1, 2, 4, 7, 11)
"""Epochs (0-based) whose ends are recorded besides the last: TRAK averages over these checkpoints."""


@dataclass
class Algorithm:
    """One learning algorithm of a case study."""

    name: str
    data: L.LightningDataModule
    make_model: Callable[[int], nn.Module] | None = None
    lr: float = 0.05


def verification_transforms() -> dict[str, Callable[[Tensor], Tensor]]:
    """The transformations a case study can verify (``--verify``), by name."""
    from lightning_tda.modeldiff.transformations import ChangeIntensity, GaussianBlur, Rotate, Shift

    return {"shift": Shift(0, 1), "rotate": Rotate(15.0), "blur": GaussianBlur(0.7), "dim": ChangeIntensity(0.5)}


def case_study_parser(description: str | None, name: str, verify: str = "shift") -> argparse.ArgumentParser:
    """The arguments every case study takes (checked types: a bad value exits with code 2
    before anything runs); ``verify`` is the default transformation to verify."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", choices=sorted(verification_transforms()), default=verify,
                        help="the transformation to verify (target: each image's own label)")
    parser.add_argument("--fast", action="store_true", help="4 models per algorithm, 8 epochs, k = 512 (1-4 minutes)")
    parser.add_argument("--models", type=positive_int, default=None, help="models per algorithm, >= 2 (default 10; 4 with --fast)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default 15; 8 with --fast)")
    parser.add_argument("--proj-dim", type=positive_int, default=None, help="TRAK projection dimension k (default 1024; 512 with --fast)")
    parser.add_argument("--num", type=positive_int, default=3, help="directions per algorithm")
    parser.add_argument("--images", type=positive_int, default=8, help="top training and test images shown per direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=new_directory, default=Path(f"runs/modeldiff_{name}"), help="figures, tables and result.json")
    parser.add_argument("--stores", type=new_directory, default=None,
                        help="a new directory for the RunStores (default: a temporary one, removed at the end)")
    return parser


def parse_case_study_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, fill the ``--fast`` defaults, and check what the types cannot (clear errors, exit 2)."""
    args = parser.parse_args(argv)
    fast = {"models": 4, "epochs": 8, "proj_dim": 512}
    full = {"models": 10, "epochs": 15, "proj_dim": 1024}
    for key in fast:
        if getattr(args, key) is None:
            setattr(args, key, (fast if args.fast else full)[key])
    if args.models < 2:
        parser.error(f"--models must be >= 2 (the noise floor needs two halves of each algorithm's models), got {args.models}")
    if args.stores is not None and args.stores.exists() and any(args.stores.iterdir()):
        parser.error(f"--stores {args.stores} is not empty: give a new directory (every run records into a new store)")
    return args


def run_case_study(
    args: argparse.Namespace,
    a: Algorithm,
    b: Algorithm,
    train: TensorImageDataset,
    test: TensorImageDataset,
    transform: Callable[[Tensor], Tensor] | None = None,
    target_class: int | str | None = None,
) -> tuple[ModelDiffReport, dict, tuple[list[nn.Module], list[nn.Module]]]:
    """Train, record, compare and verify; returns the report, a JSON-able summary, and both
    algorithms' trained models."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modeldiff_") as temporary:
        root = args.stores or Path(temporary)
        runs = []
        for offset, algorithm in ((0, a), (1000, b)):
            runs.append(record_runs(
                root, algorithm.name, algorithm.data, num_models=args.models, epochs=args.epochs,
                make_model=algorithm.make_model, lr=algorithm.lr, proj_dim=args.proj_dim,
                record_epochs=RECORD_EPOCHS, seed=args.seed + offset,
            ))
        (stores_a, models_a), (stores_b, models_b) = runs
        report = compare_algorithms(
            stores_a, stores_b, train, test, names=(a.name, b.name), num=args.num, transform=transform,
            target_class=target_class, models_a=models_a, models_b=models_b, images=args.images, seed=args.seed,
        )
    summary = {
        "accuracy": {a.name: accuracy(models_a, test), b.name: accuracy(models_b, test)},
        "directions": {d.name: d.to_frame(k=5).to_dict(orient="records") for d in (report.directions_a, report.directions_b)},
        "noise_floor": report.directions_a.noise_floor,
        "verification": report.verification.to_frame().to_dict(orient="records") if report.verification else None,
        "models_per_algorithm": args.models, "epochs": args.epochs, "proj_dim": args.proj_dim, "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return report, summary, (models_a, models_b)


def finish(args: argparse.Namespace, report: ModelDiffReport, summary: dict, name: str, title: str, reporter: ReporterLike) -> Path:
    """Log everything through ``reporter`` (figures, image tables, metrics), write the summary
    picture and ``result.json`` under ``args.out``, and print the tables."""
    args.out.mkdir(parents=True, exist_ok=True)
    report.log(reporter, name)
    report.save(args.out / "report")
    picture = args.out / f"modeldiff_{name}.png"
    report.plot(title=title).savefig(picture, dpi=110)
    (args.out / "result.json").write_text(json.dumps(summary, indent=2, default=float))
    names = report.names
    print(f"\nA = {names[0]}, B = {names[1]}; {args.models} models each; test accuracy "
          + " / ".join(f"{summary['accuracy'][n]:.3f}" for n in names))
    for d in (report.directions_a, report.directions_b):
        print(f"\n{d.name}'s directions (not {d.other}):")
        print(markdown_table(d.to_frame(k=5).drop(columns=["top_train_negative"])))
    if report.verification is not None:
        v = report.verification
        print(f"\nverification: {v.transformation}, Pr({v.target} | T(x)) - Pr({v.target} | x) over {v.n_examples} test images")
        print(markdown_table(v.to_frame().drop(columns=["transformation", "examples"])))
    print(f"\nsummary picture: {picture}  ({summary['seconds']} s)")
    return picture


__all__ = ["RECORD_EPOCHS", "Algorithm", "case_study_parser", "finish", "parse_case_study_args", "run_case_study"]
