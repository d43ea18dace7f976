"""The four ModelDiff case studies run (a tiny setting each in CI; the planted one's ``--fast`` mode,
with its known answer checked, under ``-m slow``), and every one ends in its picture."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASES = ["modeldiff_augmentation", "modeldiff_pretraining", "modeldiff_sgd", "modeldiff_planted"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CASES)
def test_case_study_runs_tiny(name, tmp_path, capsys):
    extra = ["--pretrain-epochs", "1"] if name == "modeldiff_pretraining" else []
    result = load(name).main(["--fast", "--models", "2", "--epochs", "1", "--proj-dim", "32", "--num", "1", "--images", "3",
                              "--out", str(tmp_path / "out"), *extra])
    assert json.loads((tmp_path / "out" / "result.json").read_text())["models_per_algorithm"] == 2
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 10_000
    assert len(result["verification"]) == 3 and len(next(iter(result["directions"].values()))) == 1
    printed = capsys.readouterr().out
    assert "directions (not" in printed and "| algorithm | target | effect |" in printed


def test_case_study_arguments_are_checked(tmp_path):
    module = load("modeldiff_sgd")
    for bad in (["--models", "1"], ["--epochs", "0"], ["--proj-dim", "0"], ["--num", "0"]):
        with pytest.raises(SystemExit):
            module.main([*bad, "--out", str(tmp_path)])
    (tmp_path / "stores").mkdir()
    (tmp_path / "stores" / "x").write_text("")
    with pytest.raises(SystemExit):
        module.main(["--stores", str(tmp_path / "stores")])
    with pytest.raises(SystemExit):
        load("modeldiff_planted").main(["--planted-class", "12"])


@pytest.mark.slow
def test_planted_case_fast_finds_the_planted_feature(tmp_path):
    result = load("modeldiff_planted").main(["--fast", "--out", str(tmp_path / "out")])
    assert result["precision_at_20"] >= 0.8
    assert result["top_direction_distinguishing"]
    plain, augmented, _ = result["verification"]
    assert plain["ci_excludes_zero"] and plain["effect"] > 0.1
    assert not augmented["ci_excludes_zero"] or abs(augmented["effect"]) < 0.01
