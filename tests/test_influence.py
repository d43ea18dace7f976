"""Full-parameter influence: exact == explicit Hessian inverse built by a double autograd loop;
conjugate gradient and LiSSA converge to it."""

import pytest
import torch
from torch import nn

from lightning_tda.attribution import InfluenceProblem, influence_scores
from lightning_tda.outputs import loss_from_logits, margin_from_logits


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    xt, yt = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = loss_from_logits(model(x), y).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return InfluenceProblem(model, x, y, xt, yt, output="margin")


def explicit_influence(problem, damping):
    """Hessian by differentiating every gradient entry again; gradients by a per-example loop."""
    params = [p for p in problem.model.parameters()]

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    loss = loss_from_logits(problem.model(problem.x_train), problem.y_train).mean()
    g = flat(torch.autograd.grad(loss, params, create_graph=True))
    h = torch.stack([flat(torch.autograd.grad(g[i], params, retain_graph=True)) for i in range(len(g))])
    h = h + damping * torch.eye(len(g), dtype=h.dtype)
    g_train = torch.stack([
        flat(torch.autograd.grad(loss_from_logits(problem.model(problem.x_train[i:i + 1]), problem.y_train[i:i + 1])[0], params))
        for i in range(len(problem.x_train))
    ])
    g_test = torch.stack([
        flat(torch.autograd.grad(margin_from_logits(problem.model(problem.x_test[j:j + 1]), problem.y_test[j:j + 1])[0], params))
        for j in range(len(problem.x_test))
    ])
    return -(g_test @ torch.linalg.inv(h) @ g_train.T) / len(g_train)


def test_exact_equals_explicit_hessian_inverse(problem):
    expected = explicit_influence(problem, 1e-2)
    torch.testing.assert_close(influence_scores(problem, 1e-2, "exact"), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_iterative_solvers_converge_to_exact(problem, method):
    exact = influence_scores(problem, 1e-2, "exact")
    got = influence_scores(problem, 1e-2, method)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-7)


def test_sign_convention_matches_retraining_direction(problem):
    """Up-weighting the most helpful example (small step along the IF direction) raises the margin."""
    scores = influence_scores(problem, 1e-2, "exact")
    j = 0
    i = int(scores[j].argmax())
    assert scores[j, i] > 0


def test_large_models_are_refused():
    with pytest.raises(ValueError, match="ProjectedInfluence or TRAK"):
        InfluenceProblem(nn.Linear(300, 300), torch.zeros(1, 300), torch.zeros(1, dtype=torch.long), torch.zeros(1, 300), torch.zeros(1, dtype=torch.long))
