"""Full-parameter influence: exact == explicit Hessian inverse built by a double autograd loop;
influence == the derivative of retraining with an example up-weighted (sign and scale); the
projected influence function is exact where Gauss-Newton is; CG stops on non-positive
curvature; CG and LiSSA (stochastic) converge to the exact solve and report it."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from lightning_tda.attribution import (
    InfluenceProblem, ProjectedInfluence, conjugate_gradient, influence_scores, lissa, power_iteration,
)
from lightning_tda.outputs import loss_from_logits, margin_from_logits, out_to_loss_from_logits
from lightning_tda.store import RunStore


def trained_mlp():
    """A non-convex problem: a tanh MLP near a minimum of its training loss."""
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


@pytest.fixture(scope="module")
def problem():
    return trained_mlp()


def weighted_optimum(problem, weights, theta):
    """Newton's method to machine precision on ``(1/n) sum_k w_k loss_k + wd/2 |theta|^2``
    (an independent retraining: plain autograd through ``functional_call``)."""
    names = [n for n, _ in problem.model.named_parameters()]
    shapes = [p.shape for _, p in problem.model.named_parameters()]

    def objective(t):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = t[offset:offset + size].view(shape)
            offset += size
        logits = functional_call(problem.model, params, (problem.x_train,))
        losses = nn.functional.cross_entropy(logits, problem.y_train, reduction="none")
        return (weights * losses).mean() + 0.5 * problem.weight_decay * (t * t).sum()

    t = theta.clone()
    for _ in range(50):
        g = grad(objective)(t)
        if float(g.norm()) < 1e-14:
            break
        t = t - torch.linalg.solve(hessian(objective)(t), g)
    return t


def test_exact_equals_explicit_hessian_inverse(problem):
    params = list(problem.model.parameters())

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    loss = loss_from_logits(problem.model(problem.x_train), problem.y_train).mean()
    g = flat(torch.autograd.grad(loss, params, create_graph=True))
    h = torch.stack([flat(torch.autograd.grad(g[i], params, retain_graph=True)) for i in range(len(g))])
    h = h + 1e-2 * torch.eye(len(g), dtype=h.dtype)
    g_train = torch.stack([
        flat(torch.autograd.grad(loss_from_logits(problem.model(problem.x_train[i:i + 1]), problem.y_train[i:i + 1])[0], params))
        for i in range(len(problem.x_train))
    ])
    g_test = torch.stack([
        flat(torch.autograd.grad(margin_from_logits(problem.model(problem.x_test[j:j + 1]), problem.y_test[j:j + 1])[0], params))
        for j in range(len(problem.x_test))
    ])
    expected = -(g_test @ torch.linalg.inv(h) @ g_train.T) / len(g_train)
    torch.testing.assert_close(influence_scores(problem, 1e-2, "exact"), expected, rtol=1e-8, atol=1e-10)


def convex_problem(classes=3, weight_decay=1e-2):
    """Softmax regression with weight decay (strictly convex), at its optimum."""
    torch.manual_seed(1)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = (x @ torch.randn(4, classes, dtype=torch.float64) + torch.randn(40, classes, dtype=torch.float64)).argmax(1)
    model = nn.Linear(4, classes).double()
    problem = InfluenceProblem(model, x, y, torch.randn(6, 4, dtype=torch.float64), torch.randint(0, classes, (6,)),
                               weight_decay=weight_decay)
    theta = weighted_optimum(problem, torch.ones(40, dtype=torch.float64), problem.theta)
    torch.nn.utils.vector_to_parameters(theta, model.parameters())
    return InfluenceProblem(model, x, y, problem.x_test, problem.y_test, weight_decay=weight_decay)


def retrained_derivative(problem, i, j, delta=1e-3):
    """d f_j / d w_i at w = 1 by retraining at w_i = 1 +- delta (central difference, O(delta^2))."""
    values = []
    for sign in (1, -1):
        weights = torch.ones(len(problem.x_train), dtype=torch.float64)
        weights[i] += sign * delta
        theta = weighted_optimum(problem, weights, problem.theta)
        logits = problem.logits(theta, problem.x_test[j:j + 1])
        values.append(float(margin_from_logits(logits, problem.y_test[j:j + 1])[0]))
    return (values[0] - values[1]) / (2 * delta)


PAIRS = [(0, 0), (3, 1), (17, 2), (25, 5), (39, 4)]


def test_influence_is_the_derivative_of_retraining_with_the_example_upweighted():
    """Up-weighting example i by 1/n in the mean loss (its weight 1 -> 2 to first order) changes
    test margin j by the score: sign and scale, to 1e-4 relative for five pairs."""
    problem = convex_problem()
    scores = influence_scores(problem, damping=0.0, method="exact")
    for i, j in PAIRS:
        assert float(scores[j, i]) == pytest.approx(retrained_derivative(problem, i, j), rel=1e-4, abs=1e-9)
    # the damping convention: damping is weight decay's unit (curvature of the mean loss)
    undecayed = InfluenceProblem(problem.model, problem.x_train, problem.y_train, problem.x_test, problem.y_test)
    torch.testing.assert_close(influence_scores(undecayed, damping=1e-2), scores, rtol=1e-9, atol=1e-12)


def test_projected_influence_is_exact_for_a_linear_binary_margin(tmp_path):
    """A linear two-class model's margin is linear in the parameters, so its loss Hessian is the
    Gauss-Newton matrix (1/n) Phi^T diag(q(1-q)) Phi: ProjectedInfluence on the exact per-example
    margin gradients (identity projection), damped by the weight decay, is retraining's derivative."""
    problem = convex_problem(classes=2, weight_decay=5e-2)
    store = RunStore.create(tmp_path / "s")
    for split, x, y in (("train", problem.x_train, problem.y_train), ("val", problem.x_test, problem.y_test)):
        phi = problem.per_example("output", x, y).numpy()
        with torch.no_grad():
            q = out_to_loss_from_logits(problem.logits(problem.theta, x), y).numpy()
        store.ensure_array(f"grads/{split}/fit_end", phi.shape, "float64", block_rows=len(phi))
        store.ensure_array(f"out_to_loss/{split}/fit_end", q.shape, "float64", block_rows=len(q))
        store.write_block(f"grads/{split}/fit_end", 0, phi)
        store.write_block(f"out_to_loss/{split}/fit_end", 0, q)
    store.update_manifest(lambda m: m["records"].__setitem__("grads", [
        {"tag": "fit_end", "index": 0, "epoch": 0, "global_step": 1, "splits": ["train", "val"], "output": "margin"}
    ]))
    scores = ProjectedInfluence(damping=5e-2, dtype=torch.float64).score(store)
    for i, j in PAIRS:
        assert float(scores[j, i]) == pytest.approx(retrained_derivative(problem, i, j), rel=1e-4, abs=1e-8)


def test_conjugate_gradient_stops_on_non_positive_curvature():
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    b = torch.ones(3, 2, dtype=torch.float64)
    result = conjugate_gradient(lambda v: a @ v, b, iters=10)
    assert result.negative_curvature and not result.converged
    assert float(result.solution.abs().max()) < 10  # no step along the bad direction, no blow-up
    with pytest.raises(ValueError, match="non-positive curvature.*raise the damping"):
        influence_scores(trained_mlp_off_minimum(), damping=0.0, method="cg")


def trained_mlp_off_minimum():
    """The MLP at a random point: its loss Hessian has negative eigenvalues."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in model.parameters():
        p.data.mul_(3)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    problem = InfluenceProblem(model, x, y, x[:4], y[:4])
    assert float(torch.linalg.eigvalsh(problem.hessian()).min()) < 0
    return problem


@pytest.mark.parametrize("case", ["convex", "nonconvex_damped"])
def test_cg_converges_to_exact_and_reports_it(problem, case):
    prob, damping = (convex_problem(), 0.0) if case == "convex" else (problem, 1e-2)
    exact = influence_scores(prob, damping, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        torch.testing.assert_close(influence_scores(prob, damping, "cg"), exact, rtol=1e-6, atol=1e-9)
    with pytest.warns(RuntimeWarning, match="did not converge in 2 steps: relative residual"):
        influence_scores(prob, damping, "cg", iters=2)


def explicit_operator(signs, damping, seed=0):
    """A = (1/n) sum_i s_i a_i a_i^T + damping I with its minibatch form: per-example curvatures
    of either sign (s_i < 0 for some: a non-convex loss), positive definite thanks to damping."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(len(signs), 6, generator=g, dtype=torch.float64)
    s = torch.as_tensor(signs, dtype=torch.float64)

    def batch(v, idx):
        return (a[idx].T * s[idx]) @ (a[idx] @ v) / len(idx) + damping * v

    full = (a.T * s) @ a / len(signs) + damping * torch.eye(6, dtype=torch.float64)
    return full, batch


@pytest.mark.parametrize("case", ["convex", "nonconvex_damped"])
def test_lissa_is_stochastic_and_converges_to_the_exact_solve(case):
    n = 32
    signs = [1.0] * n if case == "convex" else [1.0] * 24 + [-0.5] * 8
    full, batch = explicit_operator(signs, damping=0.3)
    assert float(torch.linalg.eigvalsh(full).min()) > 0
    b = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(full, b)
    scale = 1.1 * power_iteration(lambda v: full @ v, 6)
    assert scale == pytest.approx(1.1 * float(torch.linalg.eigvalsh(full).max()), rel=1e-3)
    deterministic = lissa(batch, b, scale, n, batch_size=n, depth=150, repeats=1, apply=lambda v: full @ v)
    torch.testing.assert_close(deterministic.solution, exact, rtol=1e-8, atol=1e-10)
    assert deterministic.converged and deterministic.residual < 1e-8
    one = lissa(batch, b, scale, n, batch_size=16, depth=120, repeats=1, seed=0, apply=lambda v: full @ v)
    other = lissa(batch, b, scale, n, batch_size=16, depth=120, repeats=1, seed=1, apply=lambda v: full @ v)
    assert not torch.allclose(one.solution, other.solution)  # minibatches: a stochastic estimate
    averaged = lissa(batch, b, scale, n, batch_size=16, depth=120, repeats=100, seed=2, apply=lambda v: full @ v)
    assert float((averaged.solution - exact).norm() / exact.norm()) < 0.06  # seeds 0-2 gave 0.018-0.037
    assert averaged.residual == pytest.approx(float((full @ averaged.solution - b).norm(dim=0).div(b.norm(dim=0)).max()))


def test_lissa_influence_on_the_damped_mlp(problem):
    """The plumbing: power-iteration scale, automatic depth, full-batch LiSSA equals the exact
    solve; too few steps warn with the residual."""
    exact = influence_scores(problem, 0.1, "exact")
    full_batch = influence_scores(problem, 0.1, "lissa", lissa_batch_size=40, lissa_repeats=1)
    torch.testing.assert_close(full_batch, exact, rtol=1e-6, atol=1e-9)
    with pytest.warns(RuntimeWarning, match="LiSSA did not converge in 3 steps: relative residual"):
        influence_scores(problem, 0.1, "lissa", iters=3, lissa_repeats=1, lissa_scale=1.0)


@pytest.mark.slow
def test_stochastic_lissa_influence_on_the_damped_mlp(problem):
    exact = influence_scores(problem, 0.1, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stochastic estimate: its residual is ~1e-1
        stochastic = influence_scores(problem, 0.1, "lissa", lissa_batch_size=20, lissa_repeats=16)
    assert float((stochastic - exact).norm() / exact.norm()) < 0.15
    assert float(np.corrcoef(stochastic.flatten(), exact.flatten())[0, 1]) > 0.98


def test_large_models_are_refused():
    with pytest.raises(ValueError, match="ProjectedInfluence or TRAK"):
        InfluenceProblem(nn.Linear(300, 300), torch.zeros(1, 300), torch.zeros(1, dtype=torch.long), torch.zeros(1, 300), torch.zeros(1, dtype=torch.long))
