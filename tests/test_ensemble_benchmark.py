"""The ensemble throughput benchmark runs (``--quick``) and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ensemble_throughput_quick(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ensemble_throughput.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "| models / s vs 2 sequential Lightning fits, median" in table
    assert "| models / s vs 2 sequential plain PyTorch loops" in table
    assert table.count("x |") == 2 and "ours (EnsembleModule)" in table
