"""The further-training benchmark runs (``--quick``) and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_further_training_benchmark_quick(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "further_training.py"), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "| LOO replicas / s, 1 thread: further_training_scores vs sequential Lightning fits |" in table
    assert "FurtherTraining + Trainer vs sequential plain PyTorch loops" in table
    rows = [line for line in table.splitlines() if line.startswith("| LOO replicas")]
    assert len(rows) == 4 and all(row.split(" | ")[3].endswith("x") for row in rows)
