"""The demo entry point: ModelPred values and the cleaning result on digits, logged through a Reporter."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_tda.modelpred.demo import run_demo
from lightning_tda.reporting import Reporter

TINY = {"num_permutations": 2, "prefixes_per_permutation": 8, "num_random_subsets": 32, "num_validation_subsets": 16,
        "max_epochs": 2, "hidden": 16, "set_features": 16}


def check(values, cleaning, n, tmp_path):
    assert values.values.shape == (n,) and np.isfinite(values.values).all()
    assert cleaning.methods == ("ModelPred Shapley", "KNN-Shapley (K=5)", "influence function")
    assert cleaning.flipped.sum() == round(0.1 * n)
    reporter = Reporter(tmp_path / "report")
    values.log(reporter, "modelpred_values")
    cleaning.log(reporter, "modelpred_cleaning")
    assert (tmp_path / "report" / "figures" / "modelpred_cleaning.png").exists()
    assert (tmp_path / "report" / "tables" / "modelpred_values_table.csv").exists()


def test_demo_runs_end_to_end_small(tmp_path):
    values, cleaning = run_demo(n_train=40, settings=TINY, permutations=10)
    check(values, cleaning, 40, tmp_path)


@pytest.mark.slow
def test_demo_fast_setting(tmp_path):
    values, cleaning = run_demo(fast=True)
    check(values, cleaning, 150, tmp_path)
