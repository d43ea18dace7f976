"""The data-valuation peers, each against an independent reference on a small exact case:
KNN-Shapley against Shapley by enumeration of its utility, TMC Shapley against exact Shapley,
Data-OOB against a plain loop of fits on the same bootstrap samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from lightning_tda.modelpred import HeldOutUtility, LogisticTarget, exact_shapley, exact_utility
from lightning_tda.modelpred.baselines import data_oob, knn_shapley, knn_utility, tmc_shapley, tmc_shapley_budgets


def data(n, d=2, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, k, n)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_shapley_recursion_equals_enumeration(k):
    x, y = data(8, k=3)
    xt, yt = data(6, k=3, seed=1)
    fast = knn_shapley(x, y, xt, yt, k=k).values
    brute = exact_shapley(lambda masks: knn_utility(x, y, xt, yt, masks, k), 8, empty_utility=0.0)
    np.testing.assert_allclose(fast, brute, atol=1e-12)


def test_tmc_shapley_converges_to_exact_and_truncation_saves_retraining():
    x, y = data(5, seed=2)
    xt, yt = data(30, seed=3)
    target = LogisticTarget(x, y)
    utility = HeldOutUtility(target, xt, yt)
    fn = exact_utility(target, utility, tol=1e-9)
    exact = exact_shapley(fn, 5, utility.empty())
    full = float(fn(torch.ones(1, 5, dtype=torch.bool))[0])
    plain = tmc_shapley(fn, 5, utility.empty(), full, num_permutations=120, truncation_tolerance=0.0, seed=0)
    assert np.all(np.abs(plain.values - exact) <= 4 * plain.standard_errors + 1e-12)
    assert plain.settings["retrainings"] == 120 * 4  # the full set's utility is known
    truncated = tmc_shapley(fn, 5, utility.empty(), full, num_permutations=50, truncation_tolerance=0.5, seed=0)
    assert truncated.settings["retrainings"] < 50 * 4


def test_tmc_shapley_budgets_equal_separate_runs_with_the_same_seed():
    x, y = data(6, seed=2)
    xt, yt = data(20, seed=3)
    target = LogisticTarget(x, y)
    utility = HeldOutUtility(target, xt, yt)
    fn = exact_utility(target, utility, tol=1e-9)
    full = float(fn(torch.ones(1, 6, dtype=torch.bool))[0])
    runs = tmc_shapley_budgets(fn, 6, utility.empty(), full, [7, 3, 12], truncation_tolerance=0.05, seed=4)
    assert [r.settings["num_permutations"] for r in runs] == [7, 3, 12]  # in the order asked
    for r in runs:
        alone = tmc_shapley(fn, 6, utility.empty(), full, num_permutations=r.settings["num_permutations"], truncation_tolerance=0.05, seed=4)
        np.testing.assert_allclose(r.values, alone.values, atol=1e-12)
        np.testing.assert_allclose(r.standard_errors, alone.standard_errors, atol=1e-12)
        assert r.settings["retrainings"] == alone.settings["retrainings"]
    assert runs[1].seconds <= runs[0].seconds <= runs[2].seconds  # time spent until each budget
    with pytest.raises(ValueError, match="budget"):
        tmc_shapley_budgets(fn, 6, utility.empty(), full, [0, 5])


def test_data_oob_trees_equal_a_loop_on_the_same_bootstrap_samples():
    x, y = data(30, k=2)
    result = data_oob(x, y, num_models=6, learner="tree", seed=4)
    rng = np.random.default_rng(4)
    samples = rng.integers(0, 30, size=(6, 30))
    hits, seen = np.zeros(30), np.zeros(30)
    for b, sample in enumerate(samples):
        out = np.setdiff1d(np.arange(30), sample)
        tree = DecisionTreeClassifier(random_state=4 + b).fit(x[sample], y[sample])
        hits[out] += tree.predict(x[out]) == y[out]
        seen[out] += 1
    expected = np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)
    expected = np.nan_to_num(expected, nan=np.nanmean(expected))
    np.testing.assert_allclose(result.values, expected)


def test_data_oob_with_the_target_equals_sklearn_with_sample_weights():
    x, y = data(30, k=2, seed=5)
    target = LogisticTarget(x, y)
    result = data_oob(x, y, num_models=4, learner="target", target=target, seed=6)
    rng = np.random.default_rng(6)
    samples = rng.integers(0, 30, size=(4, 30))
    hits, seen = np.zeros(30), np.zeros(30)
    for sample in samples:
        counts = np.bincount(sample, minlength=30)
        model = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-10, max_iter=10000).fit(np.c_[x, np.ones(30)], y, sample_weight=counts)
        out = counts == 0
        hits[out] += model.predict(np.c_[x, np.ones(30)][out]) == y[out]
        seen[out] += 1
    expected = np.where(seen > 0, hits / np.maximum(seen, 1), np.nan)
    np.testing.assert_allclose(result.values, np.nan_to_num(expected, nan=np.nanmean(expected)))


def test_peer_argument_errors():
    x, y = data(10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_shapley(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="needs target="):
        data_oob(x, y, num_models=3, learner="target")
    with pytest.raises(ValueError, match="x_train has 2 features but x_test has 3"):
        knn_shapley(x, y, np.zeros((2, 3)), [0, 1])


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.3])
def test_batched_permutation_shapley_with_truncation_equals_the_tmc_loop(tolerance):
    from lightning_tda.modelpred.valuation import permutation_shapley

    x, y = data(7, seed=5)
    xt, yt = data(25, seed=6)
    target = LogisticTarget(x, y)
    utility = HeldOutUtility(target, xt, yt)
    fn = exact_utility(target, utility, tol=1e-10)
    full = float(fn(torch.ones(1, 7, dtype=torch.bool))[0])
    loop = tmc_shapley(fn, 7, utility.empty(), full, num_permutations=9, truncation_tolerance=tolerance, seed=3)
    batched = permutation_shapley(fn, 7, utility.empty(), num_permutations=9, seed=3, truncation_tolerance=tolerance)
    np.testing.assert_allclose(batched.values, loop.values, atol=1e-7)
    np.testing.assert_allclose(batched.standard_errors, loop.standard_errors, atol=1e-7)
    if tolerance == 0.3:
        assert loop.settings["retrainings"] < 9 * 6  # the rule did truncate here
    with pytest.raises(ValueError, match="truncation_tolerance"):
        permutation_shapley(fn, 7, utility.empty(), num_permutations=2, truncation_tolerance=-1.0)
