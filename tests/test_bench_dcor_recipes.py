"""The dCor recipes benchmark runs end to end in quick mode and prints every section."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dcor_recipes_quick(tmp_path):
    out = tmp_path / "out.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dcor_recipes.py"), "--quick", "--cache", str(tmp_path / "cache"),
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| gain (penalty - independent) |", "| better in (seeds) |", "| dcor_diagonal_mean |",
                "| blockwise joint pass vs dense pairwise dCor: max abs diff |", "| R*(B given A, signal) |"):
        assert row in done.stdout
    assert out.read_text().strip() in done.stdout
    assert (tmp_path / "cache" / "quick" / "transfer_w0.5_s0" / "result.json").exists()
