"""benchmarks/diversity.py --quick runs the example's tiny family and prints the category tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "diversity.py"


def test_diversity_benchmark_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = importlib.util.spec_from_file_location("diversity_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--quick", "--runs", str(tmp_path / "runs")])
    for needle in ("error inconsistency % [95% CI]", "| seed |", "| data |", "Pairs with a base CNN",
                   "monotone in the seed's order", "greedy selection (held-out split)", "overlap cnn-s0 vs mlp-s0",
                   "machine:"):
        assert needle in text, needle
    assert (tmp_path / "runs" / "digits" / "figures" / "diversity_heatmap.png").exists()
