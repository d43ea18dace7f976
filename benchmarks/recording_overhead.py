"""Training time with and without the recorders (every epoch), as ratios measured in one run.

    python benchmarks/recording_overhead.py            # full: digits + 10k synthetic 3x32x32 images
    python benchmarks/recording_overhead.py --quick    # seconds

Configurations are interleaved repeat by repeat (plain, checkpoints, margins, both), so machine
noise hits them alike; the overhead of a configuration is its time over the plain run's time in the
same repeat, minus one. Targets: CheckpointRecorder < 5%, MarginRecorder (train + val, every
epoch, its own forward pass) < 35%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, timed, today  # noqa: E402

from lightning_tda.callbacks import CheckpointRecorder, MarginRecorder  # noqa: E402
from lightning_tda.data import DigitsDataModule, synthetic_images  # noqa: E402
from lightning_tda.models import DigitsCNN, ImageClassifier  # noqa: E402


class SmallConvNet(nn.Module):
    """A CIFAR-sized CNN: two conv blocks and two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SyntheticDataModule(L.LightningDataModule):
    def __init__(self, n_train: int, n_val: int, batch_size: int = 128) -> None:
        super().__init__()
        self.train_dataset = synthetic_images(n_train, seed=0)
        self.val_dataset = synthetic_images(n_val, seed=1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


CONFIGS = ("plain", "checkpoints", "margins", "both")


def fit_once(config: str, make_model, make_dm, epochs: int, root: Path) -> float:
    store = root / f"store_{config}"
    callbacks = []
    if config in ("margins", "both"):
        callbacks.append(MarginRecorder(store, splits=("train", "val"), every_n_epochs=1, on_fit_end=False))
    if config in ("checkpoints", "both"):
        callbacks.append(CheckpointRecorder(store, every_n_epochs=1, on_fit_end=False))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), accelerator="auto", devices=1,
    )
    model, dm = make_model(), make_dm()
    return timed(lambda: trainer.fit(model, dm), sync=True)


def measure(name: str, make_model, make_dm, epochs: int, repeats: int) -> list[list[object]]:
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        fit_once("plain", make_model, make_dm, 1, Path(tmp) / "warmup")
        for r in range(repeats):
            for config in CONFIGS:
                times[config].append(fit_once(config, make_model, make_dm, epochs, Path(tmp) / f"r{r}"))
    rows = []
    for config, target in (("checkpoints", 0.05), ("margins", 0.35), ("both", None)):
        overheads = [t / p - 1 for t, p in zip(times[config], times["plain"])]
        med = statistics.median(overheads)
        rows.append([
            f"{name}: {config} overhead", f"{statistics.median(times[config]):.2f} s",
            f"{statistics.median(times['plain']):.2f} s", f"{1 + med:.3f}",
            f"{100 * med:+.1f}% ({100 * min(overheads):+.1f}% to {100 * max(overheads):+.1f}%)",
            "-" if target is None else ("met" if med < target else "MISSED") + f" (< {100 * target:.0f}%)",
        ])
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--datasets", nargs="+", choices=["digits", "synthetic"], default=["digits", "synthetic"])
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    if args.quick:
        digits = ("digits (200 train)", lambda: ImageClassifier(DigitsCNN()), lambda: DigitsDataModule(n_train=200), 1, 1)
        synth = ("synthetic 3x32x32 (512 train)", lambda: ImageClassifier(SmallConvNet()), lambda: SyntheticDataModule(512, 128), 1, 1)
    else:
        digits = ("digits (1438 train / 359 val)", lambda: ImageClassifier(DigitsCNN()), lambda: DigitsDataModule(), 20, args.repeats)
        synth = ("synthetic 3x32x32 (10k train / 2k val)", lambda: ImageClassifier(SmallConvNet()), lambda: SyntheticDataModule(10_000, 2_000), 2, max(2, args.repeats // 2))
    rows = []
    chosen = [case for key, case in (("digits", digits), ("synthetic", synth)) if key in args.datasets]
    for name, mm, md, epochs, repeats in chosen:
        rows += measure(name, mm, md, epochs, repeats)
    table = markdown_table(
        ["figure", "with recorder (median)", "plain (median)", "time ratio", "overhead median (range)", "target"], rows
    )
    out = f"{table}\n\nmachine: {machine()}; date: {today()}; epochs: digits {digits[3]}, synthetic {synth[3]}; repeats interleaved"
    print(out)
    return out


if __name__ == "__main__":
    main()
