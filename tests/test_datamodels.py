"""Datamodels (batched Lasso against sklearn), rank statistics (against scipy) and the LDS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import Lasso

from lightning_tda import datamodels
from lightning_tda.datamodels import (
    batched_lasso,
    fit_datamodels,
    lds,
    rankdata,
    spearman_correlation,
)


@pytest.fixture(autouse=True)
def single_thread():
    """The problems here are tiny: one thread is faster than a thread pool (much faster on a busy
    machine, where pool threads wait for each other on every small operation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(n_models: int, n_train: int, n_test: int, *, density: float, noise: float, seed: int):
    """Random 1/2-subsets and margins that are a linear function of them plus noise."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_models, n_train, generator=gen) < 0.5
    weights = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)
    weights *= torch.rand(n_test, n_train, generator=gen) < density
    biases = torch.randn(n_test, generator=gen, dtype=torch.float64)
    noise = noise * torch.randn(n_models, n_test, generator=gen, dtype=torch.float64)
    margins = masks.double() @ weights.T + biases + noise
    return masks, margins, weights


# ------------------------------------------------------------------ rank statistics vs scipy


def test_rankdata_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40, 7), generator=gen).double()  # many ties
    for dim in (0, 1):
        np.testing.assert_array_equal(rankdata(x, dim).numpy(), stats.rankdata(x.numpy(), axis=dim))
    y = torch.randn(3, 5, 11, generator=gen)
    np.testing.assert_array_equal(rankdata(y, 2).numpy(), stats.rankdata(y.numpy(), axis=2))


def test_spearman_matches_scipy():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 8, (60, 9), generator=gen).float()
    b = a + 3 * torch.randn(60, 9, generator=gen)
    b[:, 0] = torch.randint(0, 3, (60,), generator=gen).float()  # ties on both sides
    ours = spearman_correlation(a, b, dim=0).numpy()
    ref = [stats.spearmanr(a[:, j].numpy(), b[:, j].numpy()).statistic for j in range(9)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    ours_rows = spearman_correlation(a.T, b.T, dim=1).numpy()
    np.testing.assert_allclose(ours_rows, ref, rtol=1e-12, atol=1e-12)
    constant = spearman_correlation(torch.ones(10, 1), torch.randn(10, 1, generator=gen))
    assert torch.isnan(constant).all()  # scipy gives nan too


# ------------------------------------------------------------------ batched Lasso vs sklearn


@pytest.mark.parametrize("n_models, n_train", [(120, 30), (40, 100)], ids=["gram", "direct"])
def test_batched_lasso_equals_sklearn_lasso(n_models, n_train):
    masks, margins, _ = planted(n_models, n_train, 5, density=0.2, noise=0.3, seed=2)
    lambdas = torch.tensor([0.002, 0.01, 0.03, 0.06, 0.2])
    w, b, converged = batched_lasso(masks, margins, lambdas, tol=1e-12, max_iter=200_000, dtype=torch.float64)
    assert converged.all()
    for j, lam in enumerate(lambdas.tolist()):
        ref = Lasso(alpha=lam, tol=1e-12, max_iter=200_000).fit(masks.double().numpy(), margins[:, j].numpy())
        np.testing.assert_allclose(w[j].numpy(), ref.coef_, atol=1e-7)
        np.testing.assert_allclose(float(b[j]), ref.intercept_, atol=1e-7)
    # A warm start from the solution stays there; one shared lambda broadcasts.
    w2, _, _ = batched_lasso(masks, margins, 0.03, init=w, tol=1e-12, dtype=torch.float64)
    w3, _, _ = batched_lasso(masks, margins, torch.full((5,), 0.03), tol=1e-12, dtype=torch.float64)
    np.testing.assert_allclose(w2.numpy(), w3.numpy(), atol=1e-7)


def test_power_iteration_step_size_gives_the_same_solution(monkeypatch):
    """Large problems take the Lipschitz constant from power iteration (with a safety margin)."""
    masks, margins, _ = planted(80, 40, 3, density=0.2, noise=0.3, seed=13)
    exact, _, _ = batched_lasso(masks, margins, 0.02, tol=1e-12, dtype=torch.float64)
    monkeypatch.setattr(datamodels, "_MAX_EXACT_EIGEN", 0)
    power, _, converged = batched_lasso(masks, margins, 0.02, tol=1e-12, dtype=torch.float64)
    assert converged.all()
    np.testing.assert_allclose(power.numpy(), exact.numpy(), atol=1e-7)


def test_fit_datamodels_torch_equals_sklearn_reference():
    masks, margins, _ = planted(200, 25, 6, density=0.15, noise=0.5, seed=3)
    kwargs = dict(n_lambdas=8, tol=1e-12, max_iter=200_000, seed=5, progress=False)
    ours = fit_datamodels(masks, margins, dtype=torch.float64, **kwargs)
    ref = fit_datamodels(masks, margins, solver="sklearn", **kwargs)
    torch.testing.assert_close(ours.val_models, ref.val_models)
    torch.testing.assert_close(ours.lambda_path, ref.lambda_path, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.val_mse_path, ref.val_mse_path, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.lambdas, ref.lambdas, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours.weights, ref.weights, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.biases, ref.biases, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.val_spearman, ref.val_spearman, rtol=0, atol=1e-9)
    assert ours.converged.all() and ref.converged.all()


def test_chunking_patience_and_predict():
    masks, margins, _ = planted(150, 20, 7, density=0.2, noise=0.5, seed=4)
    kwargs = dict(n_lambdas=10, tol=1e-10, dtype=torch.float64, progress=False)
    full = fit_datamodels(masks, margins, **kwargs)
    chunked = fit_datamodels(masks, margins, chunk_size=3, **kwargs)
    torch.testing.assert_close(chunked.weights, full.weights)
    torch.testing.assert_close(chunked.lambdas, full.lambdas)
    # Patience longer than the path changes nothing; patience 1 stops each path one step after its
    # first non-improvement, choosing the best lambda it saw.
    torch.testing.assert_close(fit_datamodels(masks, margins, patience=10, **kwargs).weights, full.weights)
    early = fit_datamodels(masks, margins, patience=1, **kwargs)
    assert torch.isnan(early.val_mse_path).any()
    seen = torch.nan_to_num(early.val_mse_path, nan=float("inf"))
    chosen = early.lambda_path.gather(0, seen.argmin(0, keepdim=True))[0]
    torch.testing.assert_close(early.lambdas, chosen)
    # No refit: the weights are the fitting-set weights; predict() applies weights and biases.
    no_refit = fit_datamodels(masks, margins, refit=False, **kwargs)
    torch.testing.assert_close(no_refit.lambdas, full.lambdas)
    torch.testing.assert_close(full.predict(masks), masks.double() @ full.weights.T + full.biases)


# ------------------------------------------------------------------ must show


def test_datamodels_recover_planted_sparse_effect():
    n_models, n_train, n_test, k = 600, 50, 12, 3
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(n_models, n_train, generator=gen) < 0.5
    true = torch.zeros(n_test, n_train, dtype=torch.float64)
    for j in range(n_test):
        support = torch.randperm(n_train, generator=gen)[:k]
        signs = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).double()
        true[j, support] = signs * (1 + torch.rand(k, generator=gen, dtype=torch.float64))
    noise = 0.5 * torch.randn(n_models, n_test, generator=gen, dtype=torch.float64)
    margins = masks.double() @ true.T + noise

    result = fit_datamodels(masks, margins, progress=False)
    w = result.weights.double()
    assert w.shape == (n_test, n_train) and result.converged.all()
    for j in range(n_test):
        support = true[j].nonzero().flatten()
        off = torch.ones(n_train, dtype=torch.bool)
        off[support] = False
        top = w[j].abs().topk(k).indices
        assert set(top.tolist()) == set(support.tolist()), f"example {j}: support"
        assert torch.equal(torch.sign(w[j, support]), torch.sign(true[j, support])), f"example {j}: sign"
        assert w[j, off].abs().max() < 0.25 * w[j, support].abs().min()
        torch.testing.assert_close(w[j, support], true[j, support], atol=0.2, rtol=0)
    assert (result.val_spearman > 0.8).all()
    # The fitted datamodels predict fresh models: LDS on new subsets is high.
    fresh_masks, _, _ = planted(300, n_train, 1, density=0, noise=0, seed=7)
    fresh_noise = 0.5 * torch.randn(300, n_test, generator=gen, dtype=torch.float64)
    fresh_margins = fresh_masks.double() @ true.T + fresh_noise
    assert lds(result.weights, fresh_masks, fresh_margins, n_bootstrap=200).value > 0.85


def test_lds_of_true_linear_model_is_one():
    masks, margins, weights = planted(300, 60, 40, density=0.5, noise=0.0, seed=8)
    exact = lds(weights, masks, margins, n_bootstrap=200)
    assert exact.value == pytest.approx(1.0, abs=1e-12)
    assert exact.ci_low == pytest.approx(1.0, abs=1e-12) and exact.ci_high == pytest.approx(1.0, abs=1e-12)
    noisy_masks, noisy_margins, noisy_weights = planted(300, 60, 40, density=0.5, noise=0.3, seed=8)
    noisy = lds(noisy_weights, noisy_masks, noisy_margins, n_bootstrap=500)
    assert 0.95 < noisy.ci_low <= noisy.value <= noisy.ci_high <= 1.0
    assert float(noisy) == noisy.value and noisy.per_example.shape == (40,)


@pytest.mark.parametrize("resample", ["examples", "models", "both"])
def test_lds_of_random_scores_is_zero_inside_its_interval(resample):
    masks, margins, _ = planted(200, 60, 50, density=0.5, noise=0.3, seed=9)
    random_scores = torch.randn(50, 60, generator=torch.Generator().manual_seed(10))
    result = lds(random_scores, masks, margins, n_bootstrap=300, resample=resample, seed=1)
    assert abs(result.value) < 0.05
    assert result.ci_low <= 0.0 <= result.ci_high
    assert result.ci_high - result.ci_low < 0.1
    again = lds(random_scores, masks, margins, n_bootstrap=300, resample=resample, seed=1)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)


def test_lds_undefined_correlations_count_as_zero():
    masks, margins, weights = planted(100, 30, 4, density=0.5, noise=0.0, seed=11)
    scores = weights.clone()
    scores[1] = 0  # a constant prediction: no ranking information
    result = lds(scores, masks, margins, n_bootstrap=0)
    assert torch.isnan(result.per_example[1]) and result.n_undefined == 1
    assert result.value == pytest.approx(3 / 4)
    assert np.isnan(result.ci_low) and np.isnan(result.ci_high)


# ------------------------------------------------------------------ bad input


def test_bad_input_clear_errors():
    masks, margins, weights = planted(50, 20, 5, density=0.5, noise=0.1, seed=12)
    with pytest.raises(ValueError, match="masks has 50 models and margins has 49"):
        fit_datamodels(masks, margins[:49], progress=False)
    with pytest.raises(ValueError, match="masks has 49 models and margins has 50"):
        lds(weights, masks[:49], margins)
    with pytest.raises(ValueError, match="scores cover 19 training examples .* masks have 20"):
        lds(weights[:, :19], masks, margins)
    with pytest.raises(ValueError, match="scores cover 4 test examples .* margins have 5"):
        lds(weights[:4], masks, margins)
    bad = margins.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"margins has non-finite values.*\[3, 2\]"):
        fit_datamodels(masks, bad, progress=False)
    with pytest.raises(ValueError, match="masks must be 2-D"):
        lds(weights, masks[0], margins)
    with pytest.raises(ValueError, match="at least 3 models"):
        lds(weights, masks[:2], margins[:2])
    with pytest.raises(ValueError, match="confidence"):
        lds(weights, masks, margins, confidence=1.0)
    with pytest.raises(ValueError, match="resample"):
        lds(weights, masks, margins, resample="tests")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        fit_datamodels(masks, margins, val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="lambdas must be"):
        fit_datamodels(masks, margins, lambdas=[0.1, -1.0], progress=False)
    with pytest.raises(ValueError, match="solver"):
        fit_datamodels(masks, margins, solver="cd", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="masks must be a torch Tensor or numpy array"):
        lds(weights, masks.tolist(), margins)  # type: ignore[arg-type]
