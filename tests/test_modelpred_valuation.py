"""ModelPred's applications: Shapley and leave-one-out values, deletion/addition with the
influence function, cleaning, memorisation, selection and calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tda.modelpred import (
    HeldOutUtility,
    LogisticTarget,
    ModelPred,
    ValuationResult,
    calibration_study,
    cleaning_study,
    counterfactual_study,
    exact_shapley,
    exact_utility,
    expected_calibration_error,
    flip_labels,
    greedy_selection,
    influence_update,
    leave_one_out_values,
    make_target,
    memorization,
    modelpred_leave_one_out,
    modelpred_shapley,
    permutation_shapley,
    predicted_utility,
    prediction_accuracy,
)
from lightning_tda.modelpred.baselines import influence_values
from lightning_tda.modelpred.cleaning import precision_at_flip_rate
from lightning_tda.modelpred.valuation import all_permutations

TINY = {"num_permutations": 4, "prefixes_per_permutation": 8, "num_random_subsets": 48, "num_validation_subsets": 16,
        "max_epochs": 2, "hidden": 16, "set_features": 16, "batch_size": 16}


def blobs(n=40, d=4, k=3, seed=0, spread=1.0):
    centers = np.random.default_rng(100 + d * 10 + k).normal(size=(k, d))  # one distribution for train and test
    y = np.arange(n) % k
    return centers[y] + spread * np.random.default_rng(seed).normal(size=(n, d)), y


@pytest.fixture(scope="module")
def fitted():
    x, y = blobs()
    xt, yt = blobs(30, seed=1)
    return ModelPred.fit(x, y, progress=False, **TINY), x, y, xt, yt


def test_permutation_shapley_over_all_orderings_is_exact_shapley():
    x, y = blobs(5, 2, 2)
    xt, yt = blobs(20, 2, 2, seed=3)
    target = LogisticTarget(x, y)
    utility = HeldOutUtility(target, xt, yt)
    fn = exact_utility(target, utility, tol=1e-10)
    exact = exact_shapley(fn, 5, utility.empty())
    sampled = permutation_shapley(fn, 5, utility.empty(), permutations=all_permutations(5), permutations_per_call=7)
    np.testing.assert_allclose(sampled.values, exact, rtol=1e-9, atol=1e-9)
    # efficiency: the values add up to U(D) - U(empty)
    full = float(fn(torch.ones(1, 5, dtype=torch.bool))[0])
    assert sampled.values.sum() == pytest.approx(full - utility.empty(), abs=1e-9)


@pytest.mark.parametrize("name", ["logistic", "svm"])
@pytest.mark.parametrize("classes", [2, 3])
def test_held_out_utility_is_the_mean_test_loss(name, classes):
    x, y = blobs(30, 4, classes)
    xt, yt = blobs(25, 4, classes, seed=5)
    target = make_target(name, x, y)
    utility = HeldOutUtility(target, xt, yt)
    theta = torch.randn(11, target.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = torch.stack([-target.example_losses(t, xt, yt).mean() for t in theta])  # one model at a time
    torch.testing.assert_close(utility(theta), reference)
    torch.testing.assert_close(utility(theta, chunk_size=4), reference)
    torch.testing.assert_close(utility(theta.to(torch.float32)), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(utility(theta.reshape(11, 1, -1)), reference[:, None])
    assert utility(theta.to(torch.float32)).dtype == torch.float64


def test_leave_one_out_values_are_the_utility_drops():
    x, y = blobs(8, 2, 2)
    xt, yt = blobs(10, 2, 2, seed=3)
    target = LogisticTarget(x, y)
    utility = HeldOutUtility(target, xt, yt)
    fn = exact_utility(target, utility)
    loo = leave_one_out_values(fn, 8)
    full = float(fn(torch.ones(1, 8, dtype=torch.bool))[0])
    without_3 = torch.ones(1, 8, dtype=torch.bool)
    without_3[0, 3] = False
    assert loo.values[3] == pytest.approx(full - float(fn(without_3)[0]))


def test_modelpred_values_use_the_predicted_models(fitted):
    mp, x, y, xt, yt = fitted
    values = modelpred_shapley(mp, xt, yt, num_permutations=6, seed=2)
    utility = HeldOutUtility(mp.target, xt, yt)
    reference = permutation_shapley(predicted_utility(mp, utility), 40, utility.empty(), 6, seed=2)
    np.testing.assert_allclose(values.values, reference.values, rtol=1e-6, atol=1e-8)
    assert values.values.shape == (40,) and np.isfinite(values.standard_errors).all()
    loo = modelpred_leave_one_out(mp, xt, yt)
    assert loo.values.shape == (40,)
    frame = values.to_frame()
    assert set(frame.columns) == {"example", "value", "standard_error", "rank"} and frame["rank"].min() == 1


def test_influence_values_approximate_exact_leave_one_out():
    x, y = blobs(60, 3, 3, spread=2.0)
    xt, yt = blobs(50, 3, 3, seed=4, spread=2.0)
    target = LogisticTarget(x, y, C=0.5)
    utility = HeldOutUtility(target, xt, yt)
    exact = leave_one_out_values(exact_utility(target, utility, tol=1e-10), 60).values
    approx = influence_values(target, xt, yt).values
    assert np.corrcoef(exact, approx)[0, 1] > 0.97  # first order: a few high-leverage points are off
    np.testing.assert_allclose(approx, exact, atol=0.4 * np.abs(exact).max())
    # exactly the derivative: removing a small weight eps of example i changes U by eps * v_i
    eps, i = 1e-4, 26
    weights = torch.ones(1, 60, dtype=torch.float64)
    weights[0, i] = 1 - eps
    full = float(utility(target.solve(torch.ones(1, 60), tol=1e-12, method="newton"))[0])
    reduced = float(utility(target.solve(weights, tol=1e-12, method="newton"))[0])
    assert (full - reduced) / eps == pytest.approx(approx[i], rel=1e-3)


def test_influence_update_is_one_newton_step_and_close_for_small_deletions():
    x, y = blobs(50, 3, 3)
    target = LogisticTarget(x, y)
    full = torch.ones(1, 50, dtype=torch.bool)
    removed = full.clone()
    removed[0, :2] = False
    estimate = influence_update(target, full, removed)[0]
    theta = target.solve(full)[0]
    hessian = target.hessian(theta[None], full.double())[0]
    step = torch.linalg.solve(hessian, target.gradient(theta[None], removed.double())[0])
    torch.testing.assert_close(estimate, theta - step)
    exact = target.solve(removed)[0]
    assert (estimate - exact).norm() < 0.25 * (theta - exact).norm()  # first order: far closer than no update


def test_counterfactual_study_reports_each_method(fitted):
    mp, x, y, xt, yt = fitted
    result = counterfactual_study(mp, "deletion", fractions=(0.1, 0.5), num_trials=2, x_test=xt, y_test=yt)
    assert result.errors.shape == (4, 2, 2) and result.methods[0] == "ModelPred"
    # the "no update" error is the relative distance between the full and the reduced solutions
    full = mp.solve(np.ones((1, 40), dtype=bool))[0]
    assert (result.errors[2] > 0).all() and np.isfinite(result.accuracy_gaps).all()
    added = counterfactual_study(mp, "addition", fractions=(0.2,), num_trials=2, base_fraction=0.5, include_sklearn=False)
    assert added.errors.shape == (3, 1, 2)
    assert full.shape == (mp.target.num_params,)
    with pytest.raises(ValueError, match="fractions must be in"):
        counterfactual_study(mp, fractions=(1.5,))


def test_prediction_accuracy_compares_with_exact_solutions(fitted):
    mp, x, y, xt, yt = fitted
    masks = np.ones((3, 40), dtype=bool)
    result = prediction_accuracy(mp, masks, xt, yt)
    predicted, exact = mp.predict_params(masks).double(), mp.solve(masks)
    expected = ((predicted - exact).norm(dim=1) / exact.norm(dim=1)).numpy()
    np.testing.assert_allclose(result.relative_errors, expected, rtol=1e-6)
    assert set(result.summary()) >= {"relative_error_mean", "accuracy_gap_mean"}


def test_memorization_exact_matches_a_direct_computation(fitted):
    mp, x, y, xt, yt = fitted
    result = memorization(mp, method="exact")
    target = mp.target
    without = np.ones((1, 40), dtype=bool)
    without[0, 7] = False
    p_with = torch.softmax(target.logits(target.solve(np.ones((1, 40), dtype=bool))[0], x[7:8]), -1)[0, y[7]]
    p_without = torch.softmax(target.logits(target.solve(without)[0], x[7:8]), -1)[0, y[7]]
    assert result.scores[7] == pytest.approx(float(p_with - p_without), abs=1e-6)
    assert memorization(mp).scores.shape == (40,)


def test_greedy_selection_chooses_distinct_examples(fitted):
    mp, x, y, xt, yt = fitted
    result = greedy_selection(mp, xt[:15], yt[:15], size=6, x_test=xt[15:], y_test=yt[15:], num_checkpoints=3, num_random=2)
    assert len(set(result.selected.tolist())) == 6 and result.sizes[-1] == 6
    assert result.predicted_utilities.shape == (6,)
    with pytest.raises(ValueError, match="size must be in"):
        greedy_selection(mp, xt, yt, size=0, x_test=xt, y_test=yt)


def test_expected_calibration_error_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(200, 4)) * 2), -1)
    labels = torch.as_tensor(rng.integers(0, 4, 200))
    conf, pred = probs.max(1)
    bins = np.minimum((conf.numpy() * 10).astype(int), 9)
    correct = (pred == labels).numpy()
    manual = sum(abs(conf.numpy()[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean() for b in range(10) if (bins == b).any())
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(manual, abs=1e-5)


def test_calibration_study_runs(fitted):
    mp, x, y, xt, yt = fitted
    result = calibration_study(mp, xt, yt, num_models=4)
    assert 0 <= result.ece_single <= 1 and 0 <= result.ece_predicted_ensemble <= 1
    assert result.bin_count.shape == (3, 10) and result.bin_count.sum(1).tolist() == [30.0] * 3


def test_flip_labels_and_cleaning():
    noisy, flipped = flip_labels(np.arange(50) % 5, 0.2, 5, seed=1)
    assert flipped.sum() == 10 and (noisy[flipped] != (np.arange(50) % 5)[flipped]).all()
    assert (noisy[~flipped] == (np.arange(50) % 5)[~flipped]).all()
    values = np.where(flipped, -1.0, 1.0)
    assert precision_at_flip_rate(values, flipped) == 1.0
    x, y = blobs(40, 3, 2, spread=0.5)
    xt, yt = blobs(30, 3, 2, seed=5, spread=0.5)
    result = cleaning_study(x, y, xt, yt, methods=("modelpred_shapley", "knn_shapley", "influence"), shapley_permutations=5, modelpred_settings=TINY)
    assert result.methods == ("ModelPred Shapley", "KNN-Shapley (K=5)", "influence function")
    assert result.found.shape == (3,) and result.flipped.sum() == 4
    assert result.found[1] >= 2  # KNN-Shapley finds flipped labels of well-separated blobs
    assert result.seconds[0] >= result.settings["modelpred_fit_seconds"]
    with pytest.raises(ValueError, match="methods must be"):
        cleaning_study(x, y, xt, yt, methods=("oracle",))


def test_cleaning_modelpred_shapley_at_tmc_budget_shares_the_fit():
    x, y = blobs(40, 3, 2, spread=0.5)
    xt, yt = blobs(30, 3, 2, seed=5, spread=0.5)
    result = cleaning_study(x, y, xt, yt, methods=("modelpred_shapley", "modelpred_shapley_tmc_budget"), shapley_permutations=12,
                            tmc_permutations=4, modelpred_settings=TINY)
    assert result.methods == ("ModelPred Shapley", "ModelPred Shapley at TMC's budget (4 permutations)")
    fit = result.settings["modelpred_fit_seconds"]
    assert (result.seconds >= fit).all()  # one fit, counted in both rows
    same = cleaning_study(x, y, xt, yt, methods=("modelpred_shapley", "modelpred_shapley_tmc_budget"), shapley_permutations=4,
                          tmc_permutations=4, modelpred_settings=TINY)
    np.testing.assert_allclose(same.values[0], same.values[1])  # the same estimator, at TMC's permutation count
    assert not np.allclose(result.values[0], result.values[1])


def test_results_save_and_load(fitted, tmp_path):
    mp, x, y, xt, yt = fitted
    values = modelpred_leave_one_out(mp, xt, yt)
    values.save(tmp_path / "v")
    loaded = ValuationResult.load(tmp_path / "v")
    np.testing.assert_array_equal(loaded.values, values.values)
    fig, ax = values.plot()
    assert ax.get_xlabel()
