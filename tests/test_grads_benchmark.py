"""benchmarks/gradients.py runs end to end in its quick mode and reports every method."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gradients_benchmark_quick(tmp_path):
    out = tmp_path / "gradients.md"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gradients.py", "--quick", "--cpu-only", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for model in ("DigitsCNN", "SmallResNet"):
        for method in ("fwd+bwd", "factored", "exact", "naive"):
            assert f"| {method} |" in text and model in text
    assert "factored time / fwd+bwd time" in text and "factored speed-up over naive loop" in text
    for setting in ("traker default", "traker float32", "traker best"):
        assert f"| {setting} |" in text  # a row either way: measured, or "traker not installed"
    assert "Kronecker-structured" in text and "dense JL" in text
