"""LDS of every scorer on a fixed digits benchmark, with traker's TRAK on the same checkpoints.

    python benchmarks/lds_digits.py            # full: 1,000 train / 300 test, 256 subset models
    python benchmarks/lds_digits.py --quick    # seconds-scale smoke run

Ground truth: a SubsetSweep of DigitsCNN models, each trained on a random half (alpha = 0.5) of
the 1,000 training examples, recording margins on the 300 test examples. Attribution: R models
trained on all 1,000 examples with a GradientRecorder (projected gradients of the margin,
k = 2048, factored engine) at 5 checkpoints each; every scorer is evaluated with 1, 5 and 10
models (final checkpoints), TracIn with all 5 checkpoints of 1 and 10 models. traker's TRAKer
featurizes and scores the same final checkpoints with the same k.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, today  # noqa: E402

from lightning_tda.attribution import TRAK, GradCos, GradDot, ProjectedInfluence, TracIn, load_features, select_tags  # noqa: E402
from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder  # noqa: E402
from lightning_tda.data import DigitsDataModule, TensorImageDataset  # noqa: E402
from lightning_tda.datamodels import lds  # noqa: E402
from lightning_tda.models import DigitsCNN, ImageClassifier  # noqa: E402
from lightning_tda.store import RunStore  # noqa: E402
from lightning_tda.sweep import SubsetSweep, read_sweep  # noqa: E402


def datasets(n_train: int, n_test: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    dm = DigitsDataModule(n_train=n_train)
    dm.setup()
    val = dm.recording_dataset("val")
    train = dm.recording_dataset("train")
    test = TensorImageDataset(val.images[:n_test], val.targets[:n_test])
    return train, test


class FixedData(L.LightningDataModule):
    def __init__(self, train: TensorImageDataset, test: TensorImageDataset, batch_size: int = 64) -> None:
        super().__init__()
        self.train, self.test, self.batch_size = train, test, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def recording_dataset(self, split: str) -> TensorImageDataset:
        return {"train": self.train, "test": self.test}[split]


def train_attribution_runs(root: Path, train, test, runs: int, epochs: int, k: int) -> list[RunStore]:
    stores = []
    every = max(1, epochs // 5)
    for r in range(runs):
        path = root / f"run{r}"
        if (path / "manifest.json").exists() and RunStore(path).checkpoint_tags():
            stores.append(RunStore(path))  # finished earlier (--out reused)
            continue
        L.seed_everything(100 + r, verbose=False)
        trainer = L.Trainer(
            max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1,
            callbacks=[
                GradientRecorder(path, proj_dim=k, engine="factored", every_n_epochs=every, splits=("train", "test")),
                CheckpointRecorder(path, every_n_epochs=None, on_fit_end=True),
            ],
        )
        trainer.fit(ImageClassifier(DigitsCNN(), lr=0.05), FixedData(train, test))
        stores.append(RunStore(path))
    return stores


def traker_scores(stores: list[RunStore], train, test, k: int, save_dir: Path, lambda_reg: float = 0.0) -> np.ndarray:
    """traker's TRAK on the final checkpoints of ``stores`` (CPU: BasicProjector, float32;
    ``lambda_reg`` 0 is traker's default)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = ImageClassifier(DigitsCNN()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(n_params, k, seed=0, proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32)
    traker = TRAKer(
        model=model, task="image_classification", train_set_size=len(train), save_dir=str(save_dir),
        device="cpu", proj_dim=k, projector=projector, use_half_precision=False, logging_level=40,
        lambda_reg=lambda_reg,
    )
    checkpoints = []
    for model_id, store in enumerate(stores):
        tag = store.checkpoint_tags()[-1]
        state = store.load_checkpoint(tag)[0]
        checkpoints.append(state)
        traker.load_checkpoint(state, model_id=model_id)
        for lo in range(0, len(train), 100):
            traker.featurize(batch=(train.images[lo:lo + 100], train.targets[lo:lo + 100]), num_samples=min(100, len(train) - lo))
    traker.finalize_features()
    for model_id, state in enumerate(checkpoints):
        traker.start_scoring_checkpoint(exp_name="lds", checkpoint=state, model_id=model_id, num_targets=len(test))
        for lo in range(0, len(test), 100):
            traker.score(batch=(test.images[lo:lo + 100], test.targets[lo:lo + 100]), num_samples=min(100, len(test) - lo))
    scores = traker.finalize_scores(exp_name="lds")
    return np.asarray(scores, dtype=np.float64).T  # traker: [n_train, n_test]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep stores here (default: a temp dir); "
                        "a rerun with the same --out reuses the finished sweep and runs")
    parser.add_argument("--models", type=int, default=256, help="subset models of the ground truth")
    parser.add_argument("--no-traker", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.quick:
        n_train, n_test, n_models, sweep_epochs, runs, epochs, k = 200, 60, 16, 2, 2, 2, 256
        model_counts = (1, 2)
    else:
        n_train, n_test, n_models, sweep_epochs, runs, epochs, k = 1000, 300, args.models, 15, 10, 15, 2048
        model_counts = (1, 5, 10)
    root = args.out or Path(tempfile.mkdtemp(prefix="lds_digits_"))
    train, test = datasets(n_train, n_test)
    t0 = time.perf_counter()
    sweep = SubsetSweep(
        root / "sweep", model_fn=lambda: DigitsCNN(), train_dataset=train, eval_datasets={"test": test},
        num_models=n_models, alpha=0.5, seed=0, models_per_block=64, epochs=sweep_epochs, batch_size=64, lr=0.05,
    )
    masks, margins = read_sweep(sweep.run(), "test")
    t_sweep = time.perf_counter() - t0
    stores = train_attribution_runs(root, train, test, runs, epochs, k)
    t_runs = time.perf_counter() - t0 - t_sweep

    rows = []

    def add(name: str, n_models: int, n_ckpts: int, scores: np.ndarray) -> None:
        result = lds(scores, masks, margins, n_bootstrap=500, seed=0)
        rows.append([name, n_models, n_ckpts, f"{result.value:.3f}", f"[{result.ci_low:.3f}, {result.ci_high:.3f}]"])
        print(rows[-1], flush=True)

    scorers = [("GradDot", GradDot), ("GradCos", GradCos), ("TRAK (ours)", TRAK), ("InfluenceFunction (projected GN)", ProjectedInfluence)]
    for m in model_counts:
        for name, cls in scorers:
            add(name, m, 1, cls(checkpoints=1, progress=False).score(stores[:m], "train", "test"))
    for m in (1, model_counts[-1]):
        n_ckpt = len(stores[0].manifest["records"]["grads"])
        add("TracIn", m, n_ckpt, TracIn(progress=False).score(stores[:m], "train", "test"))
        add("TRAK (ours), all checkpoints", m, n_ckpt, TRAK(progress=False).score(stores[:m], "train", "test"))
    if not args.no_traker:
        for m in model_counts:
            add("TRAK (traker 0.3.2, default lambda_reg=0)", m, 1, traker_scores(stores[:m], train, test, k, root / f"traker{m}"))
        # the same ridge as ours (its mean over the runs), to separate the ridge from the rest
        m = model_counts[-1]
        lam = float(np.mean([TRAK().lam(load_features(s, "train", select_tags(s, 1)[0]).phi) for s in stores[:m]]))
        add(f"TRAK (traker 0.3.2, lambda_reg={lam:.3g} as ours)", m, 1,
            traker_scores(stores[:m], train, test, k, root / f"traker{m}_ridge", lambda_reg=lam))
    add("random scores (control)", 0, 0, np.random.default_rng(0).normal(size=(len(test), len(train))))
    table = markdown_table(["scorer", "models", "checkpoints per model", "LDS", "95% CI (bootstrap over test examples)"], rows)
    out = (
        f"{table}\n\nground truth: {n_models} DigitsCNN models on random halves of {n_train} digits "
        f"({sweep_epochs} epochs each), margins on {n_test} test digits; attribution: {runs} models x "
        f"{epochs} epochs, k = {k}; sweep {t_sweep:.0f} s, attribution runs {t_runs:.0f} s; "
        f"machine: {machine()}; date: {today()}"
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
