"""A TRAK scoring of two fake runs (3 checkpoints each) into an out store, run as a subprocess by
the resume tests; it can SIGKILL itself after some kernels or tiles are written.

    python tests/scoring_run.py ROOT [--kill-after-tiles N] [--kill-after-kernels N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from attribution_stores import fake_gradient_store  # noqa: E402

from lightning_tda.attribution import TRAK  # noqa: E402
from lightning_tda.store import RunStore  # noqa: E402

RECORDS = [("epoch=0", 0.1, 5), ("epoch=1", 0.1, 9), ("epoch=2", 0.1, 13)]
TILES = dict(tile_rows=4, tile_cols=8)  # 3 x 4 = 12 tiles of the 9 x 30 scores


def sources(root: Path) -> list[RunStore]:
    """The two runs' stores under ``root`` (created once, then opened)."""
    stores = []
    for run in range(2):
        path = root / f"run{run}"
        if RunStore.exists(path):
            stores.append(RunStore(path))
        else:
            stores.append(fake_gradient_store(path, RECORDS, n_train=30, n_test=9, k=16, seed=run, dtype="float16", block_rows=8)[0])
    return stores


def scorer() -> TRAK:
    return TRAK(damping=0.05, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-after-tiles", type=int, default=0)
    parser.add_argument("--kill-after-kernels", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kill_after_tiles:
        original_tile = RunStore.write_tile
        tiles = [0]

        def write_tile(self, name, row_start, col_start, values):
            original_tile(self, name, row_start, col_start, values)
            tiles[0] += 1
            if tiles[0] == args.kill_after_tiles:
                os.kill(os.getpid(), signal.SIGKILL)

        RunStore.write_tile = write_tile  # type: ignore[method-assign]
    if args.kill_after_kernels:
        original_block = RunStore.write_block
        kernels = [0]

        def write_block(self, name, start, values, lead=()):
            original_block(self, name, start, values, lead)
            if name.endswith("/kernels"):
                kernels[0] += 1
                if kernels[0] == args.kill_after_kernels:
                    os.kill(os.getpid(), signal.SIGKILL)

        RunStore.write_block = write_block  # type: ignore[method-assign]
    out = RunStore.create(args.root / "out", exist_ok=True)
    scorer().score(sources(args.root), out=out, **TILES)


if __name__ == "__main__":
    main()
