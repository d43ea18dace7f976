"""A small subset sweep on digits, run as a subprocess by the sweep tests.

    python tests/sweep_run.py STORE [--shard I --num-shards K] [--kill-after-blocks N]
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from torch.utils.data import Subset

from lightning_tda.data import DigitsDataModule
from lightning_tda.models import MLP
from lightning_tda.store import RunStore
from lightning_tda.sweep import SubsetSweep


def make_sweep(store: str, shard: int = 0, num_shards: int = 1) -> SubsetSweep:
    torch.set_num_threads(1)
    dm = DigitsDataModule(n_train=120)
    dm.setup()
    val = Subset(dm.recording_dataset("val"), range(40))
    return SubsetSweep(
        store, model_fn=lambda: MLP(64, 16, 10), train_dataset=dm.recording_dataset("train"),
        eval_datasets={"val": val, "train": dm.recording_dataset("train")}, num_models=12, alpha=0.5, seed=3,
        models_per_block=4, epochs=2, batch_size=32, lr=0.1, shard_index=shard, num_shards=num_shards, progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--kill-after-blocks", type=int, default=0)
    args = parser.parse_args()
    if args.kill_after_blocks:
        original = RunStore.write_block
        done = {"masks": 0}

        def write_block(self, name, start, values, lead=()):
            original(self, name, start, values, lead)
            if name == "sweep/masks":
                done["masks"] += 1
                if done["masks"] == args.kill_after_blocks:
                    os.kill(os.getpid(), signal.SIGKILL)

        RunStore.write_block = write_block  # type: ignore[method-assign]
    make_sweep(args.store, args.shard, args.num_shards).run()


if __name__ == "__main__":
    main()
