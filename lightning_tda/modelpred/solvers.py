"""Batched exact solvers: many strongly convex problems (one per training subset) at once.

Every target objective here is 1-strongly convex (it carries :math:`\\tfrac12\\|\\theta\\|^2`), so a
stopping rule on the gradient is a bound on the distance to the exact solution:

.. math::  \\|\\theta - \\theta^*\\|_2 \\le \\|\\nabla F(\\theta)\\|_2 \\le \\text{tol}.

Two methods, each over a batch of problems ``[m, P]`` that share nothing but the code path:

- :func:`newton`: damped Newton with a block-diagonal Hessian (one ``p x p`` Cholesky per block),
  for targets whose Hessian is small or splits by class (binary logistic, one-vs-rest SVM);
- :func:`lbfgs`: limited-memory BFGS with a batched two-loop recursion, for targets whose
  Hessian is large and dense (multinomial logistic: ``K (d + 1)`` parameters).

Both use Armijo backtracking per problem; a converged problem stops changing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ValueAndGradient = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``fn(theta [m, P], index [m]) -> (objective [m], gradient [m, P])`` for problems ``index``."""

HessianBlocks = Callable[[Tensor, Tensor], Tensor]
"""``fn(theta [m, P], index [m]) -> [m, B, p, p]``, the Hessian's diagonal blocks (``B p = P``)."""

_ARMIJO = 1e-4
_MAX_HALVINGS = 40


def _line_search(
    value_and_grad: ValueAndGradient, theta: Tensor, f: Tensor, g: Tensor, direction: Tensor, index: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backtracking from step 1 until each problem's Armijo condition holds; a problem whose step
    vanishes first keeps its point and is reported in ``failed`` (the last return value).

    The condition allows the objective's rounding error (a few ulps of ``|f|``): near the optimum
    the decrease is below what float64 resolves in ``f``, while the gradient still shrinks."""
    slope = (g * direction).sum(-1)
    slack = 8 * torch.finfo(f.dtype).eps * f.abs()
    step = torch.ones_like(f)
    new_theta = theta + direction
    new_f, new_g = value_and_grad(new_theta, index)

    def bad() -> Tensor:
        return ~(new_f <= f + _ARMIJO * step * slope + slack)

    for _ in range(_MAX_HALVINGS):
        rows = bad().nonzero().flatten()
        if rows.numel() == 0:
            break
        step[rows] = step[rows] / 2
        trial = theta[rows] + step[rows, None] * direction[rows]
        trial_f, trial_g = value_and_grad(trial, index[rows])
        new_theta[rows], new_f[rows], new_g[rows] = trial, trial_f, trial_g
    failed = bad()
    new_theta[failed], new_f[failed], new_g[failed] = theta[failed], f[failed], g[failed]
    return new_theta, new_f, new_g, failed


def newton(
    value_and_grad: ValueAndGradient,
    hessian_blocks: HessianBlocks,
    theta: Tensor,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> tuple[Tensor, Tensor]:
    """Damped Newton on ``m`` problems at once; returns ``(theta [m, P], converged [m])``.

    Only unconverged problems are computed in each iteration; a problem whose line search finds
    no decrease stops unconverged (the tolerance is below what float64 resolves).
    """
    m = theta.shape[0]
    index = torch.arange(m)
    theta = theta.clone()
    f, g = value_and_grad(theta, index)
    converged = g.norm(dim=-1) <= tol
    stalled = torch.zeros_like(converged)
    for _ in range(max_iter):
        active = (~converged & ~stalled).nonzero().flatten()
        if active.numel() == 0:
            break
        th, fa, ga = theta[active], f[active], g[active]
        blocks = hessian_blocks(th, active)  # [a, B, p, p]
        a, n_blocks, p, _ = blocks.shape
        chol, info = torch.linalg.cholesky_ex(blocks)
        if bool((info != 0).any()):  # not positive definite to working precision: add a ridge
            eye = torch.eye(p, dtype=blocks.dtype)
            chol = torch.linalg.cholesky(blocks + 1e-8 * blocks.diagonal(dim1=-2, dim2=-1).abs().amax(-1)[..., None, None] * eye)
        direction = -torch.cholesky_solve(ga.reshape(a, n_blocks, p, 1), chol).reshape(a, -1)
        th, fa, ga, failed = _line_search(value_and_grad, th, fa, ga, direction, active)
        theta[active], f[active], g[active] = th, fa, ga
        converged[active] = ga.norm(dim=-1) <= tol
        stalled[active] = failed & ~converged[active]  # no decrease left: tol is below precision
    return theta, converged


Preconditioner = Callable[[Tensor, Tensor], Tensor]
"""``fn(v [m, P], index [m]) -> M^{-1} v`` for a fixed positive definite ``M`` per problem."""


def lbfgs(
    value_and_grad: ValueAndGradient,
    theta: Tensor,
    tol: float = 1e-6,
    max_iter: int = 1000,
    history: int = 10,
    precondition: Preconditioner | None = None,
) -> tuple[Tensor, Tensor]:
    """L-BFGS on ``m`` problems at once; returns ``(theta [m, P], converged [m])``.

    Each problem keeps its own ``history`` curvature pairs (a pair with ``s.y <= 0``, which
    strong convexity rules out, is skipped as a zero pair that changes nothing). With
    ``precondition``, the initial inverse Hessian of the two-loop recursion is
    :math:`\gamma M^{-1}` (:math:`\gamma = s^\top y / y^\top M^{-1} y`) instead of
    :math:`\gamma I`, which cuts the iterations when ``M`` approximates the Hessian. A problem
    whose line search fails forgets its curvature pairs and retries; failing again, it stops
    unconverged.
    """
    if precondition is None:
        def precondition(v: Tensor, index: Tensor) -> Tensor:
            return v

    m, size = theta.shape
    index = torch.arange(m)
    theta = theta.clone()
    f, g = value_and_grad(theta, index)
    s_hist = theta.new_zeros(m, history, size)
    y_hist = theta.new_zeros(m, history, size)
    rho = theta.new_zeros(m, history)
    gamma = theta.new_ones(m)
    converged = g.norm(dim=-1) <= tol
    stalled = torch.zeros_like(converged)
    fresh = torch.ones_like(converged)  # no curvature pairs since the start or the last reset
    first = True
    for _ in range(max_iter):
        active = (~converged & ~stalled).nonzero().flatten()
        if active.numel() == 0:
            break
        th, fa, ga = theta[active], f[active], g[active]
        sa, ya, ra = s_hist[active], y_hist[active], rho[active]
        q = ga.clone()
        alphas = []
        for j in range(history - 1, -1, -1):  # newest pair last in the buffer
            alpha = ra[:, j] * (sa[:, j] * q).sum(-1)
            q = q - alpha[:, None] * ya[:, j]
            alphas.append(alpha)
        r = gamma[active, None] * precondition(q, active)
        for j, alpha in zip(range(history), reversed(alphas)):
            beta = ra[:, j] * (ya[:, j] * r).sum(-1)
            r = r + (alpha - beta)[:, None] * sa[:, j]
        direction = -r
        if first:  # no curvature yet: a preconditioned gradient step of length at most 1
            direction = -precondition(ga, active)
            direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1.0)
            first = False
        new_th, new_f, new_g, failed = _line_search(value_and_grad, th, fa, ga, direction, active)
        s, y = new_th - th, new_g - ga
        sy = (s * y).sum(-1)
        ok = sy > 1e-12 * s.norm(dim=-1) * y.norm(dim=-1)
        s_push = torch.where(ok[:, None], s, torch.zeros_like(s))
        y_push = torch.where(ok[:, None], y, torch.zeros_like(y))
        s_hist[active] = torch.cat([sa[:, 1:], s_push[:, None]], 1)
        y_hist[active] = torch.cat([ya[:, 1:], y_push[:, None]], 1)
        rho[active] = torch.cat([ra[:, 1:], torch.where(ok, 1.0 / sy.where(ok, torch.ones_like(sy)), torch.zeros_like(sy))[:, None]], 1)
        gamma[active] = torch.where(ok, sy / (y * precondition(y, active)).sum(-1).clamp_min(1e-300), gamma[active])
        theta[active], f[active], g[active] = new_th, new_f, new_g
        converged[active] = new_g.norm(dim=-1) <= tol
        # a failed line search: forget the curvature pairs and retry once; twice in a row: stop
        stalled[active] = failed & fresh[active] & ~converged[active]
        reset = active[failed]
        s_hist[reset], y_hist[reset], rho[reset] = 0.0, 0.0, 0.0
        fresh[active] = failed
    return theta, converged


__all__ = ["newton", "lbfgs", "ValueAndGradient", "HessianBlocks", "Preconditioner"]
