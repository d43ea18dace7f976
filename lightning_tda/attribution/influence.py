"""Influence functions on full parameters, for models small enough to hold a Hessian or to run
many Hessian-vector products: exact (explicit Hessian), conjugate gradient, and LiSSA.

With training loss :math:`L(\\theta) = \\tfrac1n \\sum_i \\ell_i(\\theta)` (plus weight decay) and
damping :math:`\\lambda` (added to the curvature of the *mean* loss: the convention of every
scorer, see :mod:`lightning_tda.attribution.scorers`), the influence of up-weighting training
example ``i`` by ``1/n`` on the test output :math:`f_j` is

.. math::  I_{ji} = -\\tfrac1n\\, \\nabla f_j^\\top (\\nabla^2 L + \\lambda I)^{-1} \\nabla \\ell_i

(positive: the example raises the test output; at a minimum with ``lambda = 0`` it is the
derivative of ``f_j`` after retraining with example ``i``'s weight raised by ``1/n``, tested
against retraining). The solvers differ only in how they apply the inverse:

- ``"exact"``: the explicit Hessian, solved.
- ``"cg"``: conjugate gradient on Hessian-vector products. It stops on a direction of
  non-positive curvature (``H + lambda I`` is not positive definite: raise the damping) instead
  of stepping along it, and reports its residual.
- ``"lissa"``: LiSSA (Agarwal et al. 2017), stochastic as defined: each step one Hessian-vector
  product on a random minibatch of training examples, ``v <- b + v - (H_B + lambda I) v / s``,
  ``depth`` steps, averaged over ``repeats`` runs; the scale ``s`` is 1.1 times the largest
  eigenvalue of ``H + lambda I`` from a power iteration on Hessian-vector products.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_tda.outputs import FROM_LOGITS, loss_from_logits


@dataclass
class InfluenceProblem:
    """A model at its trained parameters with its training set and test points (flat-vector view)."""

    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    output: str = "margin"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.output not in FROM_LOGITS:
            raise ValueError(f"output must be one of {sorted(FROM_LOGITS)}, got {self.output!r}")
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in self.model.named_parameters() if p.requires_grad]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in self.model.named_parameters() if p.requires_grad])
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        if self.theta.numel() > 50_000:
            raise ValueError(
                f"the model has {self.theta.numel()} parameters: full-parameter influence is for small "
                "models; use ProjectedInfluence or TRAK on recorded projected gradients instead"
            )

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            out[name] = theta[offset : offset + size].view(shape)
            offset += size
        return out

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, ({**self.unflatten(theta), **self.buffers}), (x,))

    def train_loss(self, theta: Tensor, indices: Tensor | None = None) -> Tensor:
        """Mean training loss (over ``indices`` when given) plus weight decay."""
        x, y = (self.x_train, self.y_train) if indices is None else (self.x_train[indices], self.y_train[indices])
        loss = loss_from_logits(self.logits(theta, x), y).mean()
        return loss + 0.5 * self.weight_decay * (theta * theta).sum()

    def per_example(self, kind: Literal["loss", "output"], x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients ``[n, p]`` of the training loss or of the output function."""

        def one(theta: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            logits = self.logits(theta, xi[None])
            if kind == "loss":
                return loss_from_logits(logits, yi[None])[0]
            return FROM_LOGITS[self.output](logits, yi[None])[0]

        return vmap(grad(one), in_dims=(None, 0, 0))(self.theta, x, y)

    def hvp(self, v: Tensor, indices: Tensor | None = None) -> Tensor:
        """Hessian of the training loss (over the minibatch ``indices`` when given) times ``v``
        (``[p]`` or ``[p, m]``)."""
        def loss(theta: Tensor) -> Tensor:
            return self.train_loss(theta, indices)

        def single(u: Tensor) -> Tensor:
            return torch.func.jvp(grad(loss), (self.theta,), (u,))[1]

        return single(v) if v.ndim == 1 else vmap(single, in_dims=1, out_dims=1)(v)

    def hessian(self) -> Tensor:
        return torch.func.hessian(self.train_loss)(self.theta)


Operator = Callable[[Tensor], Tensor]
_LISSA_MAX_DEPTH = 20_000


@dataclass(frozen=True)
class SolveResult:
    """An iterative solve of ``A x = b`` (columns of ``b`` at once).

    Attributes:
        solution: ``x`` ``[p, m]`` (or ``[p]``).
        converged: every column reached the tolerance.
        iterations: steps taken (LiSSA: depth times repeats).
        residual: the largest relative residual ``||A x - b|| / ||b||`` over columns.
        negative_curvature: CG met a direction ``p`` with ``p^T A p <= 0``: ``A`` is not positive
            definite (raise the damping); the columns concerned stopped there.
    """

    solution: Tensor
    converged: bool
    iterations: int
    residual: float
    negative_curvature: bool = False


def _relative_residual(apply: Operator, x: Tensor, b: Tensor) -> float:
    r = (apply(x) - b).reshape(b.shape[0], -1)
    return float((r.norm(dim=0) / b.reshape(b.shape[0], -1).norm(dim=0).clamp_min(1e-300)).max())


def conjugate_gradient(apply: Operator, b: Tensor, iters: int = 200, tol: float = 1e-10) -> SolveResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` (given as ``apply``), every column
    of ``b`` ``[p, m]`` at once. A column that meets ``p^T A p <= 0`` stops there and the result
    says so (``negative_curvature``): no step is taken along such a direction."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    target = tol * b.norm(dim=0).clamp_min(1e-300)
    active = rs.sqrt() > target
    negative = torch.zeros_like(active)
    steps = 0
    for steps in range(1, iters + 1):
        if not bool(active.any()):
            steps -= 1
            break
        ap = apply(p)
        curvature = (p * ap).sum(0)
        bad = active & (curvature <= 0)
        negative |= bad
        active &= ~bad
        alpha = torch.where(active, rs / torch.where(active, curvature, torch.ones_like(curvature)), torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(0)
        active &= rs_new.sqrt() > target
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    residual = _relative_residual(apply, x, b)  # the true residual (the recursive one drifts)
    converged = not bool(negative.any()) and residual <= 10 * tol
    return SolveResult(x, converged, steps, residual, bool(negative.any()))


def power_iteration(apply: Operator, dim: int, iters: int = 100, tol: float = 1e-4, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> float:
    """The largest eigenvalue (in magnitude) of a symmetric operator, by power iteration on
    ``apply`` from a seeded random start, stopped when it changes by less than ``tol`` (relative)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=gen, dtype=dtype)
    v /= v.norm()
    value = 0.0
    for _ in range(iters):
        w = apply(v)
        new = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new - value) <= tol * abs(new):
            return new
        value = new
    return value


def lissa(
    apply_batch: Callable[[Tensor, Tensor], Tensor],
    b: Tensor,
    scale: float,
    n_examples: int,
    batch_size: int,
    depth: int = 1000,
    repeats: int = 4,
    seed: int = 0,
    apply: Operator | None = None,
    tol: float = 1e-2,
) -> SolveResult:
    """LiSSA: ``A^-1 b`` by the stochastic Neumann series ``v <- b + v - A_B v / scale`` with a
    fresh random minibatch ``B`` of ``batch_size`` of ``n_examples`` in every step, ``depth`` steps,
    then ``v / scale``, averaged over ``repeats`` independent runs.

    Args:
        apply_batch: ``(v, indices) -> A_B v``, the operator on a minibatch (damping included).
        scale: above the largest eigenvalue of ``A`` (e.g. 1.1 x :func:`power_iteration`).
        apply: the full operator, to report the residual (None: not reported, ``converged`` False).
        tol: relative residual under which the solve counts as converged.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if not 1 <= batch_size <= n_examples:
        raise ValueError(f"batch_size must be in [1, {n_examples}], got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(b)
    for _ in range(repeats):
        v = b.clone()
        for _ in range(depth):
            indices = torch.randperm(n_examples, generator=gen)[:batch_size]
            v = b + v - apply_batch(v, indices) / scale
            if not bool(torch.isfinite(v).all()):
                raise FloatingPointError(
                    "LiSSA diverged (non-finite iterate): the operator is not positive definite or the "
                    "scale is below its largest eigenvalue; raise the damping or the scale"
                )
        total += v / scale
    x = total / repeats
    if apply is None:
        return SolveResult(x, False, depth * repeats, float("nan"))
    residual = _relative_residual(apply, x, b)
    return SolveResult(x, residual <= tol, depth * repeats, residual)


def influence_scores(
    problem: InfluenceProblem,
    damping: float = 1e-3,
    method: Literal["exact", "cg", "lissa"] = "exact",
    iters: int | None = None,
    lissa_scale: float | None = None,
    lissa_batch_size: int | None = None,
    lissa_repeats: int = 4,
    seed: int = 0,
    tol: float | None = None,
) -> Tensor:
    """Influence ``[n_test, n_train]`` of each training example on each test output.

    ``iters``: CG iterations (default ``10 p``) or LiSSA depth (default: enough for the series'
    error factor ``(1 - lambda_min / scale)^depth`` to reach 1e-4, with ``lambda_min`` from a
    power iteration; at most 20,000). ``lissa_batch_size``: training examples per
    Hessian-vector product (default a quarter of the training set, at least 1). ``tol``: CG's
    relative residual (default 1e-10; converged within 10x it) or LiSSA's (default 1e-2). Warns
    with the residual when CG or LiSSA did not converge; raises when CG finds ``H + damping I``
    is not positive definite."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    g_train = problem.per_example("loss", problem.x_train, problem.y_train)  # [n, p]
    g_test = problem.per_example("output", problem.x_test, problem.y_test)  # [m, p]
    n = g_train.shape[0]

    def apply(v: Tensor) -> Tensor:
        return problem.hvp(v) + damping * v

    rhs = g_test.T  # [p, m]
    if method == "exact":
        h = problem.hessian()
        h.diagonal().add_(damping)
        solved = torch.linalg.solve(h, rhs)
    elif method == "cg":
        cg_tol = 1e-10 if tol is None else tol
        result = conjugate_gradient(apply, rhs, iters=iters or 10 * rhs.shape[0], tol=cg_tol)
        if result.negative_curvature:
            raise ValueError(
                f"conjugate gradient met non-positive curvature: H + damping I (damping={damping}) is not "
                "positive definite at these parameters (a non-convex loss, or not at a minimum); raise the "
                "damping, or use method='exact' to see the spectrum"
            )
        _warn_unconverged("conjugate gradient", result, 10 * cg_tol)
        solved = result.solution
    elif method == "lissa":
        dim = rhs.shape[0]
        scale = lissa_scale or 1.1 * power_iteration(apply, dim, seed=seed, dtype=rhs.dtype)
        if scale <= 0:
            raise ValueError("LiSSA needs a positive definite H + damping I; raise the damping")
        if iters is None:  # enough steps for (1 - lambda_min / scale)^depth to fall to 1e-4
            smallest = scale - power_iteration(lambda v: scale * v - apply(v), dim, seed=seed + 1, dtype=rhs.dtype)
            if smallest <= 0:
                raise ValueError(
                    f"H + damping I (damping={damping}) is not positive definite (smallest eigenvalue about "
                    f"{smallest:.3g}): LiSSA's series would diverge; raise the damping"
                )
            iters = int(min(_LISSA_MAX_DEPTH, max(100, math.ceil(math.log(1e4) * scale / smallest))))
        batch = lissa_batch_size or max(1, n // 4)
        depth = iters
        result = lissa(
            lambda v, idx: problem.hvp(v, None if len(idx) == n else idx) + damping * v, rhs, scale, n, batch, depth,
            lissa_repeats, seed, apply=apply, tol=tol or 1e-2,
        )
        _warn_unconverged("LiSSA", result, tol or 1e-2)
        solved = result.solution
    else:
        raise ValueError(f"method must be 'exact', 'cg' or 'lissa', got {method!r}")
    return -(solved.T @ g_train.T) / n


def _warn_unconverged(what: str, result: SolveResult, tol: float) -> None:
    if not result.converged:
        warnings.warn(
            f"{what} did not converge in {result.iterations} steps: relative residual {result.residual:.3g} "
            f"(tolerance {tol:.3g}); raise the iterations or the damping",
            RuntimeWarning,
            stacklevel=3,
        )
