"""examples/dcor_diverse_models.py runs (quick mode) and reports every figure it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dcor_diverse_models.py"


def test_diverse_models_example_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dcor_diverse_models", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--weight", "0.5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["accuracy"]) == {"A", "B", "C"}
    assert set(result["dcor"]) == {"A,B (penalty)", "A,C (no penalty)"}
    assert set(result["ensemble_accuracy"]) == {"A+B (penalty)", "A+C (independent)"}
    for value in [*result["accuracy"].values(), *result["dcor"].values(), *result["ensemble_accuracy"].values()]:
        assert 0.0 <= value <= 1.0
    # the penalty makes B less distance-correlated with A than its unpenalised twin C
    assert result["dcor"]["A,B (penalty)"] < result["dcor"]["A,C (no penalty)"] - 0.1
    printed = capsys.readouterr().out
    assert "| dCor(A, second model), val features |" in printed
    assert "| ensemble accuracy A + second |" in printed
