"""benchmarks/modelpred.py --quick and benchmarks/modelpred_studies.py --quick run and write their tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modelpred_benchmark_quick(tmp_path):
    out = tmp_path / "modelpred.md"
    load("modelpred").main(["--quick", "--out", str(out)])
    report = out.read_text()
    for needle in ("time per utility evaluation", "scikit-learn refit", "our batched exact solver", ">= 100x", "machine:"):
        assert needle in report, needle


def test_modelpred_studies_quick(tmp_path):
    out = tmp_path / "studies.md"
    load("modelpred_studies").main(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    report = out.read_text()
    for needle in ("Accuracy of the prediction: breast-cancer", "without global (KKT)", "Shapley values against Shapley by retraining",
                   "Deletion", "Addition", "Cleaning: breast-cancer", "KNN-Shapley", "Data-OOB", "influence function"):
        assert needle in report, needle
