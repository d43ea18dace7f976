"""The theory's limits of the gold standard on L2-regularised logistic regression, trained to
convergence, further trained with full-batch gradient descent (float64). They pin down the sign
and the scale of the scores:

- K -> infinity: the leave-one-out gold standard is exact leave-one-out retraining;
- K -> infinity, eps -> 0: the up-weighting score divided by eps is the exact influence function
  ``d loss_z / d eps = -grad_z^T H^-1 grad_i`` (Koh & Liang's I_up,loss);
- K = 1, eps -> 0: the up-weighting score is ``-lr * eps * GradDot`` (loss gradients), i.e.
  ``lr * |eps| * GradDot`` for a down-weighting, the direction of a removal.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_tda.attribution import InfluenceProblem, influence_scores
from lightning_tda.data import TensorImageDataset
from lightning_tda.further_training import BatchOrder, further_training_scores
from lightning_tda.grads import make_gradient_engine

N, N_TEST, D, WD, LR = 40, 12, 4, 0.25, 1.0  # GD contracts by <= 1 - LR * WD = 0.75 a step
INSTANCES = [0, 3, 7, 11, 19, 22, 30, 39]


def objective(model: nn.Module, x, y, weights=None):
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    data = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
    return data + 0.5 * WD * sum((p * p).sum() for p in model.parameters())


def minimise(model: nn.Module, x, y, weights=None) -> nn.Module:
    """The minimiser of ``objective`` by Newton's method from ``model`` (strictly convex)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        params = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        return objective_functional(model, params, x, y, weights)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(30):
        grad = torch.func.grad(f)(theta)
        if float(grad.abs().max()) < 1e-14:
            break
        theta = theta - torch.linalg.solve(torch.func.hessian(f)(theta), grad)
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta.split(sizes)):
            p.copy_(t.view(p.shape))
    return model


def objective_functional(model, params, x, y, weights):
    logits = torch.func.functional_call(model, params, (x,))
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    data = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
    return data + 0.5 * WD * sum((p * p).sum() for p in params.values())


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + N_TEST, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    y = ((x @ w + 0.8 * torch.randn(N + N_TEST, generator=g, dtype=torch.float64)) > 0).long()
    torch.manual_seed(0)
    final = minimise(nn.Linear(D, 2).double(), x[:N], y[:N])
    grad = torch.autograd.grad(objective(final, x[:N], y[:N]), list(final.parameters()))
    assert max(float(t.abs().max()) for t in grad) < 1e-10  # converged
    train, test = TensorImageDataset(x[:N], y[:N]), TensorImageDataset(x[N:], y[N:])
    return final, train, test


def test_converges_to_exact_leave_one_out_retraining(problem):
    final, train, test = problem
    gold = further_training_scores(final, train, test, INSTANCES, steps=(1, 10, 30, 150), seeds=1,
                                   lr=LR, batch_size=None, weight_decay=WD, progress=False)
    base = nn.functional.cross_entropy(final(test.images), test.targets, reduction="none").detach()
    exact = np.zeros((N_TEST, len(INSTANCES)))
    for j, i in enumerate(INSTANCES):
        weights = torch.ones(N, dtype=torch.float64)
        weights[i] = 0  # retrain on the other n - 1 examples
        loo = minimise(final, train.images, train.targets, weights)
        exact[:, j] = (nn.functional.cross_entropy(loo(test.images), test.targets, reduction="none").detach() - base).numpy()

    def cosine(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    cosines = [cosine(gold.scores[k].astype(np.float64), exact).mean() for k in range(4)]
    assert cosines[-1] > 0.99 and cosines[-1] >= cosines[1] - 1e-9
    # at K = 150 the runs have converged: the scores themselves are exact leave-one-out
    np.testing.assert_allclose(gold.scores[-1], exact, rtol=1e-3, atol=1e-6 * np.abs(exact).max())
    assert (np.abs(gold.scores[0]) < np.abs(exact).max()).all()  # one step moves much less


def test_first_order_upweighting_limit_is_the_exact_influence_function(problem):
    final, train, test = problem
    eps = 1e-5
    gold = further_training_scores(final, train, test, INSTANCES, steps=(300,), seeds=1, lr=LR, batch_size=None,
                                   weight_decay=WD, mode="upweight", eps=eps, progress=False)
    influence = influence_scores(
        InfluenceProblem(final, train.images, train.targets, test.images, test.targets, output="loss", weight_decay=WD),
        damping=0.0, method="exact",
    ).detach().numpy()  # -(1/n) grad_z^T H^-1 grad_i: the test-loss change of up-weighting by 1/n
    derivative = gold.scores[0].astype(np.float64) / eps
    expected = N * influence[:, INSTANCES]  # d loss_z / d eps = -grad_z^T H^-1 grad_i
    np.testing.assert_allclose(derivative, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # sign: up-weighting a helpful instance lowers the test loss; removing it (eps < 0) raises it


def loss_gradients(model, x, y):
    engine = make_gradient_engine("exact", model, output_fn="loss", projection="identity", dtype=torch.float64)
    return engine.project(x, y)


def test_one_step_with_small_eps_is_lr_eps_grad_dot(problem):
    final, train, test = problem
    eps, lr = 1e-6, 0.5
    grad_dot = (loss_gradients(final, test.images, test.targets) @ loss_gradients(final, train.images, train.targets).T).numpy()
    gold = further_training_scores(final, train, test, INSTANCES, steps=1, seeds=1, lr=lr, batch_size=None,
                                   weight_decay=WD, mode="upweight", eps=eps, progress=False)
    np.testing.assert_allclose(gold.scores[0], -lr * eps * grad_dot[:, INSTANCES], rtol=1e-4,
                               atol=1e-4 * lr * eps * np.abs(grad_dot).max())
    # and a removal is, to first order, the down-weighting eps = -1/n (plus a term common to all
    # instances, from the mean over n - 1 instead of n, which centering removes)
    # (the removal is a finite perturbation: a smaller step keeps its second-order term small)
    removal = further_training_scores(final, train, test, INSTANCES, steps=1, seeds=1, lr=lr / 10, batch_size=None,
                                      weight_decay=WD, center=True, progress=False)
    first_order = lr / 10 / (N - 1) * grad_dot[:, INSTANCES]
    first_order -= first_order.mean(1, keepdims=True)
    np.testing.assert_allclose(removal.scores[0], first_order, rtol=0, atol=0.01 * np.abs(first_order).max())


def test_one_minibatch_step_touches_only_the_first_batch(problem):
    final, train, test = problem
    eps, lr, b = 1e-6, 1e-2, 8
    grad_dot = (loss_gradients(final, test.images, test.targets) @ loss_gradients(final, train.images, train.targets).T).numpy()
    gold = further_training_scores(final, train, test, INSTANCES, steps=1, seeds=[4], lr=lr, batch_size=b,
                                   weight_decay=WD, mode="upweight", eps=eps, progress=False)
    first = set(BatchOrder(N, b, 4).batch(0).tolist())
    for j, i in enumerate(INSTANCES):
        if i in first:  # weight 1 + n eps in a batch mean over b: -lr * eps * (n / b) * GradDot
            np.testing.assert_allclose(gold.scores[0][:, j], -lr * eps * N / b * grad_dot[:, i], rtol=2e-2)
        else:
            np.testing.assert_allclose(gold.scores[0][:, j], 0.0, atol=1e-15)
