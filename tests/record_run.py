"""A training run with both recorders, used by the kill-and-resume tests as a subprocess.

    python tests/record_run.py ROOT [--kill-at N --kill-phase before|between|after] [--resume]

With ``--kill-at N`` the process SIGKILLs itself at the gathered write that holds the N-th block
written to the store: before it, halfway through it, or after it (``--kill-phase``).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder, MarginRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.store import RunStore


def install_kill_switch(kill_at: int, phase: str) -> None:
    """SIGKILL this process at the gathered write that holds the ``kill_at``-th block (counted over
    all writes): before it, halfway through it (some of its chunks stored), or after it."""
    original = RunStore._store_values
    calls = {"n": 0}

    def store_values(data):
        calls["n"] += len(data)
        if calls["n"] < kill_at:
            return original(data)
        if phase == "between":
            original(data[: len(data) // 2])
        elif phase == "after":
            original(data)
        os.kill(os.getpid(), signal.SIGKILL)

    RunStore._store_values = staticmethod(store_values)  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--kill-phase", choices=["before", "between", "after"], default="before")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.kill_at:
        install_kill_switch(args.kill_at, args.kill_phase)
    L.seed_everything(0, verbose=False)
    store = args.root / "store"
    last = args.root / "ckpts" / "last.ckpt"
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(args.root),
        callbacks=[
            MarginRecorder(store, block_rows=40, batch_size=20, embeddings="model.fc1"),
            GradientRecorder(store, proj_dim=32, every_n_epochs=1, block_rows=40, batch_size=20),
            CheckpointRecorder(store),
            ModelCheckpoint(dirpath=args.root / "ckpts", save_last=True, save_top_k=0),
        ],
    )
    ckpt = str(last) if args.resume and last.exists() else None
    trainer.fit(ImageClassifier(DigitsCNN(width=8), lr=0.05), DigitsDataModule(batch_size=32, n_train=200), ckpt_path=ckpt)


if __name__ == "__main__":
    main()
