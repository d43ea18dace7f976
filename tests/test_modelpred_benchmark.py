"""benchmarks/modelpred.py, modelpred_studies.py and modelpred_regularisers.py run in their --quick
modes and write their tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


def test_regulariser_sweep_quick_reads_the_tuning_split_and_resumes(tmp_path):
    bench = load("modelpred_regularisers")
    out = tmp_path / "sweep.md"
    bench.main(["--quick", "--datasets", "breast-cancer", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    report = out.read_text()
    for needle in ("swept on the tuning split", "split seed 1", "lambda_global (KKT)", "(default)", "without either"):
        assert needle in report, needle
    assert bench.TUNING_SEED != 0  # the reported tables use split seed 0
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.json"))
    assert cached == ["breast-cancer_g0_l0.json", "breast-cancer_g1_l1.json"]
    again = bench.main(["--quick", "--datasets", "breast-cancer", "--cache", str(tmp_path / "cache"), "--report-only"])
    assert again.split("machine:")[1] == report.split("machine:")[1]  # read back from the cache, nothing refitted


def test_modelpred_studies_quick(tmp_path):
    out = tmp_path / "studies.md"
    load("modelpred_studies").main(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(out), "--peer-settings", "both"])
    report = out.read_text()
    for needle in ("Accuracy of the prediction: breast-cancer", "without global (KKT)", "Shapley values against Shapley by retraining",
                   "Deletion", "Addition", "Cleaning: breast-cancer", "KNN-Shapley", "Data-OOB", "influence function",
                   "KNN-Shapley, tuned best", "TMC Shapley, tuned best", "influence function, tuned best", "split seed 1, flip seed 1",
                   "ModelPred Shapley at TMC's budget (3 permutations)", "shown apart", "ModelPred Shapley used 20 permutations"):
        assert needle in report, needle


def test_studies_merge_cleaning_parts_with_the_same_flips(tmp_path):
    import json

    studies = load("modelpred_studies")
    flipped = [True, False, False, True]
    part = {"dataset": "digits", "n": 4, "num_flipped": 2, "modelpred_fit_seconds": float("nan"), "flipped": flipped}
    (tmp_path / "cleaning_digits_part_a.json").write_text(json.dumps({**part, "methods": ["A"], "precision": [1.0], "found": [2], "seconds": [1.0],
                                                                   "values": [[0, 3, 2, 1]], "tmc_permutations": 5}))
    (tmp_path / "cleaning_digits_part_b.json").write_text(json.dumps({**part, "methods": ["TMC Shapley"], "precision": [0.5], "found": [1], "seconds": [2.0],
                                                                   "values": [[0, 1, 2, 3]], "tmc_permutations": 7, "modelpred_fit_seconds": 3.0}))
    merged = studies.merged_cleaning(tmp_path, "digits")
    assert merged["methods"] == ["A", "TMC Shapley"] and merged["found"] == [2, 1] and merged["tmc_permutations"] == 7
    assert merged["modelpred_fit_seconds"] == 3.0
    studies.cleaning_figure(merged, tmp_path)
    assert (tmp_path / "cleaning_digits.png").exists()
    (tmp_path / "cleaning_digits_part_b.json").write_text(json.dumps({**part, "flipped": [False] * 4, "methods": ["B"], "precision": [0.0], "found": [0],
                                                                   "seconds": [1.0], "values": [[0, 1, 2, 3]], "tmc_permutations": 7}))
    with pytest.raises(SystemExit, match="flipped different labels"):
        studies.merged_cleaning(tmp_path, "digits")


def test_shapley_budget_quick_matches_budgets_and_reads_back(tmp_path):
    bench = load("modelpred_shapley_budget")
    out, fig = tmp_path / "budget.md", tmp_path / "budget.png"
    common = ["--quick", "--cache", str(tmp_path / "cache"), "--figure", str(fig)]
    report = bench.main(common + ["--out", str(out)])
    for needle in ("TMC Shapley (retraining)", "ModelPred Shapley", "speed-up after the fit", "speed-up counting the fit", "split, flip and permutation seed 0",
                   "ModelPred TMC Shapley (tolerance 0.01)"):
        assert needle in report, needle
    assert fig.exists() and out.exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "breast-cancer").glob("*.json")) == ["fit.json", "modelpred.json", "modelpred_tmc.json", "tmc.json"]
    again = bench.main(common + ["--report-only"])
    assert again.split("machine:")[1] == report.split("machine:")[1]  # read back, nothing recomputed


def test_shapley_budget_match_takes_the_cheapest_budget_good_on_both_figures():
    bench = load("modelpred_shapley_budget")
    r = {"fit_seconds": 10.0,
         "tmc": [{"budget": 5, "precision": 0.5, "auc": 0.8, "seconds": 100.0}, {"budget": 9, "precision": 0.9, "auc": 0.95, "seconds": 200.0}],
         "modelpred": [{"budget": 1, "precision": 0.6, "auc": 0.7, "seconds": 0.1}, {"budget": 2, "precision": 0.5, "auc": 0.85, "seconds": 0.5},
                       {"budget": 3, "precision": 0.7, "auc": 0.9, "seconds": 2.0}]}
    first, second = bench.matches(r, r["modelpred"])
    assert first["modelpred"]["budget"] == 2 and first["after_fit"] == 200.0 and abs(first["with_fit"] - 100 / 10.5) < 1e-12
    assert second["modelpred"] is None and second["after_fit"] is None  # none on the grid is as good
