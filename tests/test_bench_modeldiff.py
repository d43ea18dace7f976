"""The ModelDiff benchmark runs end to end in quick mode (our residual PCA at a small scale, and
MadryLab's package on the same matrices), and its tables hold finite figures."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_modeldiff_benchmark_quick(tmp_path):
    pytest.importorskip("modeldiff")
    out = tmp_path / "modeldiff.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "modeldiff_speed.py"), "--quick", "--repeats", "1", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "600 x 3,000 float32: time" in report and "modeldiff 1.0.1 residual_pca (CPU)" in report
    cos = [float(c) for c in re.search(r"abs\(cos\) of directions 1-5 [^|]*\| ([0-9. /]+) \|", report).group(1).split(" / ")]
    assert len(cos) == 5 and min(cos[:3]) > 0.99  # the package and ours find the same planted directions
