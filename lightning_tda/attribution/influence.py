"""Influence functions on full parameters, for models small enough to hold a Hessian or to run
many Hessian-vector products: exact (explicit Hessian), conjugate gradient, and LiSSA.

With training loss :math:`L(\\theta) = \\tfrac1n \\sum_i \\ell_i(\\theta)` and damping
:math:`\\lambda`, the influence of up-weighting training example ``i`` by ``1/n`` on the test
output :math:`f_j` is

.. math::  I_{ji} = -\\tfrac1n\\, \\nabla f_j^\\top (\\nabla^2 L + \\lambda I)^{-1} \\nabla \\ell_i

(positive: the example raises the test output). The three solvers differ only in how they apply
the inverse Hessian; the tests hold them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

    def train_loss(self, theta: Tensor) -> Tensor:
        loss = loss_from_logits(self.logits(theta, self.x_train), self.y_train).mean()
        return loss + 0.5 * self.weight_decay * (theta * theta).sum()

    def per_example(self, kind: Literal["loss", "output"], x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients ``[n, p]`` of the training loss or of the output function."""

        def one(theta: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            logits = self.logits(theta, xi[None])
            if kind == "loss":
                return loss_from_logits(logits, yi[None])[0]
            return FROM_LOGITS[self.output](logits, yi[None])[0]

        return vmap(grad(one), in_dims=(None, 0, 0))(self.theta, x, y)

    def hvp(self, v: Tensor) -> Tensor:
        """Hessian of the training loss times ``v`` (``[p]`` or ``[p, m]``)."""
        def single(u: Tensor) -> Tensor:
            return torch.func.jvp(grad(self.train_loss), (self.theta,), (u,))[1]

        return single(v) if v.ndim == 1 else vmap(single, in_dims=1, out_dims=1)(v)

    def hessian(self) -> Tensor:
        return torch.func.hessian(self.train_loss)(self.theta)


def conjugate_gradient(apply: callable, b: Tensor, iters: int = 200, tol: float = 1e-10) -> Tensor:  # type: ignore[valid-type]
    """Solve ``A x = b`` for symmetric positive definite ``A`` (given as ``apply``), every column
    of ``b`` ``[p, m]`` at once."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    for _ in range(iters):
        ap = apply(p)
        alpha = rs / (p * ap).sum(0).clamp_min(torch.finfo(b.dtype).tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(0)
        if bool((rs_new.sqrt() <= tol * b.norm(dim=0).clamp_min(1e-30)).all()):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def lissa(apply: callable, b: Tensor, scale: float, iters: int = 2000, tol: float = 1e-10) -> Tensor:  # type: ignore[valid-type]
    """LiSSA: ``A^-1 b`` by the Neumann series ``v <- b + (I - A/scale) v``, then ``v / scale``
    (``scale`` must exceed the largest eigenvalue of ``A``)."""
    v = b.clone()
    for _ in range(iters):
        new = b + v - apply(v) / scale
        if bool(((new - v).norm(dim=0) <= tol * new.norm(dim=0).clamp_min(1e-30)).all()):
            v = new
            break
        v = new
    return v / scale


def influence_scores(
    problem: InfluenceProblem,
    damping: float = 1e-3,
    method: Literal["exact", "cg", "lissa"] = "exact",
    iters: int | None = None,
    lissa_scale: float | None = None,
) -> Tensor:
    """Influence ``[n_test, n_train]`` of each training example on each test output."""
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
        solved = conjugate_gradient(apply, rhs, iters=iters or 10 * rhs.shape[0])
    elif method == "lissa":
        if lissa_scale is None:
            h = problem.hessian()
            lissa_scale = 1.05 * float(torch.linalg.eigvalsh(h).max() + damping)
        solved = lissa(apply, rhs, lissa_scale, iters=iters or 5000)
    else:
        raise ValueError(f"method must be 'exact', 'cg' or 'lissa', got {method!r}")
    return -(solved.T @ g_train.T) / n
