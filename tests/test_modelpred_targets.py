"""ModelPred targets: the exact batched solvers against scikit-learn, closed-form gradients and
Hessians against autograd, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from lightning_tda.modelpred.module import global_regularizer, local_regularizer
from lightning_tda.modelpred.targets import LogisticTarget, SquaredHingeSVMTarget, make_target


def blobs(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(size=(k, d))
    return centers[y] + rng.normal(size=(n, d)), y


def random_masks(n: int, m: int, k: int, y: np.ndarray, seed: int = 1) -> np.ndarray:
    """Random subsets that contain every class (scikit-learn needs all of them)."""
    rng = np.random.default_rng(seed)
    masks = rng.random((m, n)) < rng.uniform(0.3, 1.0, (m, 1))
    for c in range(k):
        masks[:, np.flatnonzero(y == c)[0]] = True
    return masks


def sklearn_theta(name: str, x: np.ndarray, y: np.ndarray, mask: np.ndarray, C: float) -> np.ndarray:
    xa = np.c_[x[mask], np.ones(mask.sum())]
    if name == "logistic":
        model = LogisticRegression(C=C, fit_intercept=False, tol=1e-12, max_iter=100000)
    else:
        model = LinearSVC(C=C, fit_intercept=False, tol=1e-12, max_iter=100000, dual=False)
    return model.fit(xa, y[mask]).coef_.reshape(-1)


@pytest.mark.parametrize("name", ["logistic", "svm"])
@pytest.mark.parametrize("k", [2, 3])
def test_solve_equals_sklearn(name, k):
    x, y = blobs(60, 4, k)
    target = make_target(name, x, y, C=0.7)
    masks = random_masks(60, 6, k, y)
    theta = target.solve(masks, tol=1e-10)
    for mask, ours in zip(masks, theta.numpy()):
        reference = sklearn_theta(name, x, y, mask, 0.7)
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_newton_and_lbfgs_agree_and_bound_the_error():
    x, y = blobs(50, 3, 4)
    target = LogisticTarget(x, y)
    masks = random_masks(50, 5, 4, y)
    a = target.solve(masks, method="newton", tol=1e-10)
    b = target.solve(masks, method="lbfgs", tol=1e-7)
    # 1-strong convexity: ||theta - theta*|| <= ||grad|| <= tol
    assert (a - b).norm(dim=1).max() <= 1e-7 + 1e-10
    assert target.gradient(b, target.check_weights(masks)).norm(dim=1).max() <= 1e-7


def test_counts_as_weights_equal_sklearn_sample_weight():
    x, y = blobs(40, 3, 3)
    target = LogisticTarget(x, y)
    counts = np.random.default_rng(0).integers(0, 3, size=(1, 40))
    counts[0, :3] = 1  # every class present
    ours = target.solve(counts, tol=1e-10)[0].numpy()
    model = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-12, max_iter=100000)
    model.fit(np.c_[x, np.ones(40)], y, sample_weight=counts[0])
    np.testing.assert_allclose(ours, model.coef_.reshape(-1), rtol=1e-5, atol=1e-6)


def test_a_subset_missing_a_class_has_a_finite_solution_and_the_empty_set_zero():
    x, y = blobs(30, 3, 3)
    target = LogisticTarget(x, y)
    only_two = (y != 2)[None]
    theta = target.solve(only_two)
    assert torch.isfinite(theta).all()
    assert target.logits(theta, x[y == 2]).argmax(-1).ne(2).all()  # class 2 never seen: never predicted
    assert target.solve(np.zeros((1, 30), dtype=bool), allow_empty=True).abs().max() == 0


@pytest.mark.parametrize("target_cls,k", [(LogisticTarget, 2), (LogisticTarget, 3), (SquaredHingeSVMTarget, 2), (SquaredHingeSVMTarget, 3)])
def test_closed_form_gradient_and_hessian_equal_autograd(target_cls, k):
    x, y = blobs(25, 3, k, seed=2)
    target = target_cls(x, y, C=1.3)
    w = torch.as_tensor(np.random.default_rng(3).integers(0, 3, size=(1, 25)), dtype=torch.float64)
    theta = 0.3 * torch.randn(1, target.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    auto_grad = torch.autograd.functional.jacobian(lambda t: target.objective(t[None], w)[0], theta[0])
    torch.testing.assert_close(target.gradient(theta, w)[0], auto_grad)
    auto_hess = torch.autograd.functional.hessian(lambda t: target.objective(t[None], w)[0], theta[0])
    torch.testing.assert_close(target.hessian(theta, w)[0], auto_hess)


def test_per_example_gradients_sum_to_the_objective_gradient():
    x, y = blobs(20, 3, 3)
    target = LogisticTarget(x, y, C=2.0)
    theta = torch.randn(target.num_params, dtype=torch.float64)
    ones = torch.ones(1, 20, dtype=torch.float64)
    torch.testing.assert_close(theta + 2.0 * target.loss_gradients(theta).sum(0), target.gradient(theta[None], ones)[0])


def test_a_warm_start_gives_the_same_solution():
    x, y = blobs(30, 3, 3)
    for target in (LogisticTarget(x, y), SquaredHingeSVMTarget(x, y)):
        masks = random_masks(30, 3, 3, y)
        cold = target.solve(masks, tol=1e-8)
        warm = target.solve(masks, tol=1e-8, theta0=cold + 0.05)
        torch.testing.assert_close(warm, cold, atol=2e-8, rtol=0)


def test_logits_and_losses_are_batched_and_binary_has_two_columns():
    x, y = blobs(20, 3, 2)
    target = LogisticTarget(x, y)
    theta = torch.randn(5, target.num_params, dtype=torch.float64)
    logits = target.logits(theta, x)
    assert logits.shape == (5, 20, 2) and (logits[..., 0] == 0).all()
    ce = torch.nn.functional.cross_entropy(logits[2], torch.as_tensor(y), reduction="none")
    torch.testing.assert_close(target.example_losses(theta, x, y)[2], ce)
    assert target.logits(theta[0], x).shape == (20, 2)


def test_regularisers_vanish_at_the_exact_solution_only():
    x, y = blobs(30, 3, 3)
    target = LogisticTarget(x, y)
    masks = random_masks(30, 4, 3, y)
    w = target.check_weights(masks)
    theta = target.solve(masks, tol=1e-10)
    assert global_regularizer(target, theta, w) < 1e-18
    assert local_regularizer(target, theta, theta, w) == 0
    shifted = theta + 0.1
    assert global_regularizer(target, shifted, w) > 1e-4
    assert local_regularizer(target, shifted, theta, w) > 0


def test_bad_input_errors():
    x, y = blobs(20, 3, 3)
    with pytest.raises(ValueError, match="outside the target's classes 0..2"):
        LogisticTarget(x, np.r_[y[:-1], 5], num_classes=3)
    target = LogisticTarget(x, y)
    with pytest.raises(ValueError, match="has 4 features but the logistic target was built on 3"):
        target.logits(torch.zeros(target.num_params), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="outside the target's classes"):
        target.example_losses(torch.zeros(target.num_params), x[:2], [0, 7])
    with pytest.raises(ValueError, match="are empty"):
        target.solve(np.zeros((2, 20), dtype=bool))
    with pytest.raises(ValueError, match=r"masks must be \[subsets, 20\]"):
        target.solve(np.ones((2, 19), dtype=bool))
    with pytest.raises(ValueError, match="non-finite"):
        LogisticTarget(np.full((3, 2), np.nan), [0, 1, 0])
    with pytest.raises(ValueError, match="target must be one of"):
        make_target("tree", x, y)
    with pytest.raises(ValueError, match="theta has 5 parameters"):
        target.logits(torch.zeros(5), x)
