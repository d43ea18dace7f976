"""The LDS benchmark runs end to end in quick mode (sweep, recorders, every scorer, traker)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_lds_digits_quick(tmp_path):
    pytest.importorskip("trak")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lds_digits.py"), "--quick", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| GradDot | 1 | 1 |", "| TracIn |", "| TRAK (ours) | 2 | 1 |", "| TRAK (traker 0.3.2, default lambda_reg=0) | 2 | 1 |", "as ours) | 2 | 1 |", "random scores"):
        assert row in done.stdout
