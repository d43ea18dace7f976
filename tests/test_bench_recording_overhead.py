"""The recording-overhead benchmark runs in quick mode and prints its table."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_recording_overhead_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recording_overhead.py"), "--quick"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| digits (200 train): margins overhead |" in done.stdout
    assert "machine:" in done.stdout
