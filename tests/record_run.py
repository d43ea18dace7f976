"""A training run with both recorders, used by the kill-and-resume tests as a subprocess.

    python tests/record_run.py ROOT [--kill-at N --kill-phase before|between|after] [--resume]
    python tests/record_run.py ROOT --lightning-every-step 7 --kill-at-epoch-end 1   # then --resume

With ``--kill-at N`` the process SIGKILLs itself at the gathered write that holds the N-th block
written to the store: before it, halfway through it, or after it (``--kill-phase``). With
``--kill-at-epoch-end E`` it SIGKILLs itself as epoch E ends, before any recorder sees that; with
``--lightning-every-step K`` Lightning checkpoints every K steps (on an epoch's last step when K is
the epoch's length: after the epoch's batches, before its end).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

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


class KillAtEpochEnd(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--kill-phase", choices=["before", "between", "after"], default="before")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-at-epoch-end", type=int, default=None)
    parser.add_argument("--lightning-every-step", type=int, default=None)
    args = parser.parse_args()
    if args.kill_at:
        install_kill_switch(args.kill_at, args.kill_phase)
    L.seed_everything(0, verbose=False)
    store = args.root / "store"
    last = args.root / "ckpts" / "last.ckpt"
    ckpt = str(last) if args.resume and last.exists() else None
    # killed before Lightning saved a checkpoint: nothing to resume, so the rerun starts the run
    # afresh and clears what the killed one recorded (a fresh fit into a store with records is
    # otherwise refused)
    overwrite = args.resume and ckpt is None
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
            *([KillAtEpochEnd(args.kill_at_epoch_end)] if args.kill_at_epoch_end is not None else []),
            MarginRecorder(store, block_rows=40, batch_size=20, embeddings="model.fc1", overwrite=overwrite),
            GradientRecorder(store, proj_dim=32, every_n_epochs=1, block_rows=40, batch_size=20, overwrite=overwrite),
            CheckpointRecorder(store, overwrite=overwrite),
            ModelCheckpoint(
                dirpath=args.root / "ckpts", save_last=True, save_top_k=0, every_n_train_steps=args.lightning_every_step
            ),
        ],
    )
    trainer.fit(ImageClassifier(DigitsCNN(width=8), lr=0.05), DigitsDataModule(batch_size=32, n_train=200), ckpt_path=ckpt)


if __name__ == "__main__":
    main()
