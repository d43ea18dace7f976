"""Scoring into a store stays within its memory plan: the peak RSS growth of a scoring whose
scores (160 MB) are five times its budget (32 MiB) stays under the budget plus 16 MiB of fixed
costs (BLAS buffers, zarr). Tile buffers are reused: fresh tile-sized allocations grew the heap
by fragmentation (63 MiB here before)."""

import ctypes

import numpy as np
import pytest

from attribution_stores import fake_gradient_store
from lightning_tda.attribution import TRAK
from lightning_tda.store import RunStore


def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _reset_peak():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak RSS")


def test_peak_memory_is_bounded_by_the_plan_not_the_scores(tmp_path):
    budget = 32 << 20
    store, _ = fake_gradient_store(
        tmp_path / "s", [("epoch=0", 0.1, 5), ("epoch=1", 0.1, 9)], n_train=20_000, n_test=2_000, k=256,
        dtype="float16", block_rows=4096,
    )
    out = RunStore.create(tmp_path / "out")
    scorer = TRAK(progress=False, memory_bytes=budget)
    small, _ = fake_gradient_store(tmp_path / "small", [("epoch=0", 0.1, 5)], k=256, dtype="float16")
    scorer.score(small, out=RunStore.create(tmp_path / "warm"))  # one-time allocations (BLAS buffers, imports)
    _reset_peak()
    base = _rss("VmRSS:")
    stored = scorer.score(store, out=out, max_return_bytes=0)
    growth = _rss("VmHWM:") - base
    assert stored.nbytes == 2_000 * 20_000 * 4 > 4 * budget
    assert growth < budget + (16 << 20), f"peak RSS grew by {growth / 2**20:.0f} MiB"  # + fixed costs (BLAS, zarr)
    # the tiles are the scores: spot-check rows against an in-memory scoring of those rows
    rows = stored.read(slice(1_000, 1_010))
    assert rows.shape == (10, 20_000) and np.isfinite(rows).all()
    np.testing.assert_allclose(rows, TRAK(progress=False).score(store)[1_000:1_010], rtol=1e-4, atol=1e-7)
