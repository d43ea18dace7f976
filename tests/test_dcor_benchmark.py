"""benchmarks/dcor.py --quick runs and writes its tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "dcor.py"

pytest.importorskip("dcor")


def test_dcor_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("dcor_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "dcor.md"
    module.main(["--quick", "--repeats", "1", "--out", str(out)])
    report = out.read_text()
    for needle in ("Against the dcor package", "dcor 0.7 NAIVE, scipy cdist", "dcor 0.7 NAIVE as installed",
                   "partial dCor, n=300", "peak RSS growth", "< 2 GiB: met", "## GPU", "Command:"):
        assert needle in report, needle
