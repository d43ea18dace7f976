"""Target models: the convex learners whose trained parameters ModelPred predicts.

A target holds the pool of training examples ``(x [n, d], y [n])`` and defines, for a weighted
subset (weights ``w [n]``: a 0/1 mask, or counts for a bootstrap sample), the objective

.. math::  F_w(\\theta) = \\tfrac12 \\|\\theta\\|_2^2 + C \\sum_i w_i\\, \\ell(\\theta; x_i, y_i)

over ``theta``: one row ``[W | b]`` of ``d + 1`` numbers per output (``K`` outputs for ``K > 2``
classes, one for two), flattened to ``P = outputs (d + 1)``. The intercept is penalised like the
weights, as liblinear does (scikit-learn's ``intercept_scaling=1``): this keeps every subset's
solution finite and unique, including subsets that miss a class, and the empty set's is zero.
Scikit-learn solves the same problem with ``fit_intercept=False`` on ``[x, 1]`` (tested).

- :class:`LogisticTarget`: L2-regularised multinomial logistic regression (binary: sigmoid).
- :class:`SquaredHingeSVMTarget`: linear SVM with squared hinge, one-vs-rest (scikit-learn's
  ``LinearSVC``).

Everything is batched over many parameter vectors: ``logits(theta [m, P], x) -> [m, n, K]``,
``solve(masks [m, n]) -> [m, P]`` (exact, see :mod:`~lightning_tda.modelpred.solvers`).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_tda.modelpred import solvers

Array = Tensor | np.ndarray


def as_features(x: Any, name: str = "x") -> Tensor:
    """``x`` as a float64 ``[n, d]`` tensor, refusing other shapes and non-finite values."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [examples, features], got shape {tuple(t.shape)}; flatten images first")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int64, torch.int32, torch.uint8)):
        raise TypeError(f"{name} must hold numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf); impute or drop them first")
    return t


def as_labels(y: Any, n: int | None = None, name: str = "y") -> Tensor:
    """``y`` as an int64 ``[n]`` tensor of class indices."""
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).detach().cpu()
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [examples], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        if not torch.equal(t, t.round()):
            raise TypeError(f"{name} must hold integer class labels, got non-integer floats")
    elif t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels 0..K-1, got booleans")
    t = t.to(torch.int64)
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels for {n} examples")
    return t


def data_fingerprint(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the training features (float64) and labels: which pool a model was fitted on."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x.numpy().astype(np.float64)).tobytes())
    h.update(np.ascontiguousarray(y.numpy().astype(np.int64)).tobytes())
    return h.hexdigest()


class Target(ABC):
    """A convex linear classifier on a fixed pool of training examples (see the module docstring).

    Args:
        x: training features ``[n, d]``.
        y: training labels ``[n]`` in ``0..num_classes-1``.
        num_classes: number of classes (default: ``max(y) + 1``, at least 2).
        C: inverse regularisation strength (scikit-learn's ``C``).
    """

    name: ClassVar[str]
    default_method: ClassVar[Literal["newton", "lbfgs"]]
    hessian_dtype: torch.dtype | None = None
    """Precision of the Newton solver's Hessian (None: that of theta); :meth:`hessian` is always
    in theta's precision."""

    def __init__(self, x: Array, y: Array, num_classes: int | None = None, C: float = 1.0) -> None:
        self.x = as_features(x)
        n, d = self.x.shape
        if n == 0:
            raise ValueError("the training pool is empty: pass at least one example")
        self.y = as_labels(y, n)
        if num_classes is None:
            num_classes = max(2, int(self.y.max()) + 1)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
            raise ValueError(f"C must be a positive number, got {C!r}")
        self.num_classes = int(num_classes)
        self.C = float(C)
        self.check_labels(self.y, "y")
        self.num_features = d
        self.num_outputs = 1 if self.num_classes == 2 else self.num_classes
        self.num_params = self.num_outputs * (d + 1)
        self.x_aug = torch.cat([self.x, torch.ones(n, 1, dtype=torch.float64)], 1)  # [n, d + 1]

    # ------------------------------------------------------------------ checks
    @property
    def n(self) -> int:
        return self.x.shape[0]

    def describe(self) -> dict[str, Any]:
        """What identifies the target (saved with a fitted ModelPred and checked on load)."""
        return {
            "target": self.name,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "C": self.C,
            "n_train": self.n,
            "data_sha256": data_fingerprint(self.x, self.y),
        }

    def check_labels(self, y: Tensor, name: str = "y") -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = torch.nonzero((y < 0) | (y >= self.num_classes)).flatten()[:5].tolist()
            raise ValueError(
                f"{name} has labels outside the target's classes 0..{self.num_classes - 1} at positions {bad} "
                f"(values {y[bad].tolist()}); relabel them or set num_classes"
            )

    def check_features(self, x: Any, name: str = "x") -> Tensor:
        t = as_features(x, name)
        if t.shape[1] != self.num_features:
            raise ValueError(
                f"{name} has {t.shape[1]} features but the {self.name} target was built on {self.num_features}; "
                "pass features of the same width (the same embedding layer or pixel count)"
            )
        return t

    def check_params(self, theta: Any) -> Tensor:
        t = torch.as_tensor(theta)
        if t.shape[-1] != self.num_params:
            raise ValueError(
                f"theta has {t.shape[-1]} parameters in its last axis but the {self.name} target has "
                f"{self.num_params} ({self.num_outputs} outputs x {self.num_features + 1})"
            )
        return t

    def check_weights(self, masks: Any, allow_empty: bool = False) -> Tensor:
        """Masks ``[m, n]`` (bool) or weights (non-negative counts) as float64 ``[m, n]``."""
        w = torch.as_tensor(np.asarray(masks) if not isinstance(masks, Tensor) else masks).detach().cpu()
        if w.ndim == 1:
            w = w[None]
        if w.ndim != 2 or w.shape[1] != self.n:
            raise ValueError(f"masks must be [subsets, {self.n}] (one column per training example), got shape {tuple(w.shape)}")
        if w.dtype != torch.bool:  # a bool mask has nothing negative or non-finite to refuse
            w = w.to(torch.float64)
            if (w < 0).any() or not torch.isfinite(w).all():
                raise ValueError("masks/weights must be finite and non-negative")
        if not allow_empty:
            empty = (~w.to(torch.bool).any(1)).nonzero().flatten()
            if empty.numel():
                raise ValueError(
                    f"subsets {empty[:5].tolist()} are empty; a model is trained on at least one example "
                    "(the empty set's exact solution is theta = 0)"
                )
        return w.to(torch.float64)

    # ------------------------------------------------------------------ model
    def _rows(self, theta: Tensor) -> Tensor:
        return theta.reshape(*theta.shape[:-1], self.num_outputs, self.num_features + 1)

    def scores(self, theta: Tensor, x_aug: Tensor) -> Tensor:
        """Raw outputs ``[..., n, outputs]`` of ``theta [..., P]`` on ``x_aug [n, d + 1]``
        (one matrix product for all models: ``[n, D] @ [D, models * outputs]``)."""
        lead = theta.shape[:-1]
        rows = theta.reshape(-1, self.num_features + 1)  # [models * outputs, D]
        z = torch.matmul(x_aug.to(device=theta.device, dtype=theta.dtype), rows.T)  # [n, models * outputs]
        # contiguous [..., n, outputs]: reductions over outputs run 2x faster than on the strided view
        return z.reshape(len(x_aug), *lead, self.num_outputs).movedim(0, -2).contiguous()

    def logits(self, theta: Array, x: Array) -> Tensor:
        """Class scores ``[..., n, K]`` of models ``theta [..., P]`` on ``x [n, d]``
        (binary: ``[0, z]``, so softmax and argmax read as for ``K`` outputs)."""
        theta = self.check_params(theta)
        xt = self.check_features(x)
        dtype = theta.dtype if theta.dtype.is_floating_point else torch.float64
        x_aug = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1).to(dtype)
        z = self.scores(theta.to(dtype), x_aug)
        if self.num_outputs == 1:
            z = torch.cat([torch.zeros_like(z), z], -1)
        return z

    @abstractmethod
    def score_losses(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example loss ``[...]`` from raw outputs ``z [..., outputs]``; the labels ``y`` broadcast
        against ``z.shape[:-1]`` (``[n]`` for ``z [..., n, outputs]``, ``[n, 1]`` for ``z [n, models, outputs]``)."""

    @abstractmethod
    def score_derivatives(self, z: Tensor, y: Tensor) -> Tensor:
        """d loss / d z, ``[..., n, outputs]``."""

    def example_losses(self, theta: Array, x: Array, y: Array) -> Tensor:
        """The target's own loss of each example ``[..., n]`` (cross-entropy; squared hinge)."""
        theta = self.check_params(theta)
        xt = self.check_features(x)
        yt = as_labels(y, len(xt))
        self.check_labels(yt)
        dtype = theta.dtype if theta.dtype.is_floating_point else torch.float64
        x_aug = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1).to(dtype)
        return self.score_losses(self.scores(theta.to(dtype), x_aug), yt)

    # ------------------------------------------------------------------ objective on subsets
    def objective(self, theta: Tensor, weights: Tensor) -> Tensor:
        """:math:`F_w(\\theta)` for each row: ``theta [m, P]``, ``weights [m, n]`` -> ``[m]``."""
        z = self.scores(theta, self.x_aug)
        return 0.5 * (theta * theta).sum(-1) + self.C * (weights.to(theta.dtype) * self.score_losses(z, self.y.to(theta.device))).sum(-1)

    def gradient(self, theta: Tensor, weights: Tensor) -> Tensor:
        """:math:`\\nabla F_w(\\theta)` ``[m, P]`` in closed form (differentiable in ``theta``)."""
        return self.value_and_gradient(theta, weights)[1]

    def value_and_gradient(self, theta: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        z = self.scores(theta, self.x_aug)  # [m, n, o]
        w = weights.to(theta.dtype)
        y = self.y.to(theta.device)
        value = 0.5 * (theta * theta).sum(-1) + self.C * (w * self.score_losses(z, y)).sum(-1)
        dz = self.score_derivatives(z, y) * w[..., None]  # [m, n, o]
        # sum_i dz[m, i, o] x_i for all (m, o) at once: [m * o, n] @ [n, D]
        flat = dz.movedim(-2, 0).reshape(self.n, -1).T
        grad = theta + self.C * torch.matmul(flat, self.x_aug.to(device=theta.device, dtype=theta.dtype)).reshape(theta.shape)
        return value, grad

    def training_loss(self, theta: Tensor, weights: Tensor) -> Tensor:
        """Mean loss of ``theta`` over its weighted subset ``[m]`` (no penalty): the utility the
        local regulariser matches."""
        z = self.scores(theta, self.x_aug)
        w = weights.to(theta.dtype)
        return (w * self.score_losses(z, self.y.to(theta.device))).sum(-1) / w.sum(-1).clamp_min(1e-12)

    def loss_gradients(self, theta: Tensor, x: Array | None = None, y: Array | None = None) -> Tensor:
        """Per-example loss gradients :math:`\\nabla_\\theta \\ell(\\theta; x_i, y_i)`, ``[n, P]``, at one
        ``theta [P]`` (the pool's examples unless ``x, y`` are given)."""
        if x is None:
            x_aug, yt = self.x_aug, self.y
        else:
            xt = self.check_features(x)
            yt = as_labels(y, len(xt))
            self.check_labels(yt)
            x_aug = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
        theta = self.check_params(theta).to(torch.float64)
        dz = self.score_derivatives(self.scores(theta, x_aug), yt)  # [n, o]
        return (dz[:, :, None] * x_aug[:, None, :]).reshape(len(x_aug), -1)

    @abstractmethod
    def hessian_blocks(self, theta: Tensor, weights: Tensor, low_precision: bool = False) -> Tensor:
        """Diagonal blocks ``[m, B, p, p]`` of :math:`\\nabla^2 F_w` (``B p = P``; off-block zero);
        ``low_precision``: sums in :attr:`hessian_dtype` (for a Newton direction)."""

    def hessian(self, theta: Tensor, weights: Tensor) -> Tensor:
        """Full Hessian ``[m, P, P]`` (block-diagonal targets are expanded)."""
        blocks = self.hessian_blocks(theta, weights)
        m, b, p, _ = blocks.shape
        if b == 1:
            return blocks[:, 0]
        return torch.stack([torch.block_diag(*blocks[i]) for i in range(m)])

    def preconditioner(self, weights: Tensor) -> solvers.Preconditioner | None:
        """A fixed approximation of each subset's Hessian for L-BFGS (None: plain L-BFGS)."""
        return None

    # ------------------------------------------------------------------ exact solver
    def solve(
        self,
        masks: Any,
        tol: float = 1e-6,
        max_iter: int | None = None,
        method: Literal["auto", "newton", "lbfgs"] = "auto",
        chunk_size: int = 256,
        progress: bool = False,
        allow_empty: bool = False,
        theta0: Tensor | None = None,
    ) -> Tensor:
        """Exact minimisers ``[m, P]`` (float64) of :math:`F_w` for each row of ``masks [m, n]``,
        to ``||theta - theta*||_2 <= tol``; ``chunk_size`` problems at a time, started from
        ``theta0 [m, P]`` (default zero; a nearby solution saves most iterations).

        Raises RuntimeError if a problem does not converge within ``max_iter``.
        """
        weights = self.check_weights(masks, allow_empty=allow_empty)
        method = self.default_method if method == "auto" else method
        if method not in ("newton", "lbfgs"):
            raise ValueError(f"method must be 'auto', 'newton' or 'lbfgs', got {method!r}")
        iters = max_iter if max_iter is not None else (100 if method == "newton" else 5000)
        out = torch.zeros(len(weights), self.num_params, dtype=torch.float64)
        starts = range(0, len(weights), chunk_size)
        for start in tqdm(starts, desc=f"exact {self.name} solves", disable=not progress, leave=False):
            w = weights[start : start + chunk_size]

            def value_and_grad(theta: Tensor, index: Tensor, w: Tensor = w) -> tuple[Tensor, Tensor]:
                return self.value_and_gradient(theta, w[index])

            if theta0 is None:
                start_theta = torch.zeros(len(w), self.num_params, dtype=torch.float64)
            else:
                start_theta = self.check_params(theta0).to(torch.float64).reshape(-1, self.num_params)[start : start + chunk_size]
                if len(start_theta) != len(w):
                    raise ValueError(f"theta0 must be [{len(weights)}, {self.num_params}], one start per subset")
            if method == "newton":
                theta, ok = solvers.newton(value_and_grad, lambda th, idx, w=w: self.hessian_blocks(th, w[idx], True), start_theta, tol, iters)
            else:
                theta, ok = solvers.lbfgs(value_and_grad, start_theta, tol, iters, precondition=self.preconditioner(w))
            if not bool(ok.all()):
                bad = (~ok).nonzero().flatten()[:5] + start
                raise RuntimeError(f"the {method} solver did not converge for subsets {bad.tolist()} in {iters} iterations; raise max_iter or tol")
            out[start : start + len(w)] = theta
        return out


class LogisticTarget(Target):
    """L2-regularised logistic regression: multinomial (softmax) for ``K > 2`` classes, sigmoid
    for two, with loss :math:`\\ell = -\\log p_\\theta(y \\mid x)`.

    Same solution as ``sklearn.linear_model.LogisticRegression(C=C, fit_intercept=False)`` on
    ``[x, 1]`` (tested). Solved by Newton up to 256 parameters, by L-BFGS above."""

    name = "logistic"

    @property
    def default_method(self) -> Literal["newton", "lbfgs"]:  # type: ignore[override]
        """Newton while the dense Hessian is small (binary, or few classes and features)."""
        return "newton" if self.num_params <= 256 else "lbfgs"

    hessian_dtype = torch.float32

    def preconditioner(self, weights: Tensor) -> solvers.Preconditioner | None:
        """Per subset :math:`M = I + \tfrac{C}{4} \sum_i w_i \tilde x_i \tilde x_i^\top`, applied to each
        class's row: the softmax curvature :math:`\mathrm{diag}(p) - p p^\top` bounded by a
        constant times the identity (Boehning's bound uses 1/2; 1/4 took fewer iterations on
        digits). Cuts L-BFGS iterations about in half; the solution is unchanged."""
        if self.num_outputs == 1:
            return None
        dim = self.num_features + 1
        eye = torch.eye(dim, dtype=torch.float64)
        factor = torch.linalg.cholesky(eye + 0.25 * self.C * _weighted_gram(self.x_aug, weights))

        def apply(v: Tensor, index: Tensor) -> Tensor:
            rows = v.reshape(len(index), self.num_outputs, dim).transpose(1, 2)
            return torch.cholesky_solve(rows, factor[index]).transpose(1, 2).reshape(v.shape)

        return apply

    def score_losses(self, z: Tensor, y: Tensor) -> Tensor:
        if self.num_outputs == 1:
            z = z[..., 0]
            return torch.nn.functional.softplus(z) - y.to(z.dtype) * z
        return torch.logsumexp(z, -1) - z.gather(-1, y.expand(*z.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def score_derivatives(self, z: Tensor, y: Tensor) -> Tensor:
        if self.num_outputs == 1:
            return torch.sigmoid(z) - y.to(z.dtype)[:, None]
        return softmax_last(z) - torch.nn.functional.one_hot(y, self.num_outputs).to(z.dtype)

    def hessian_blocks(self, theta: Tensor, weights: Tensor, low_precision: bool = False) -> Tensor:
        z = self.scores(theta, self.x_aug)  # [m, n, o]
        x = self.x_aug.to(theta.dtype)
        w = weights.to(theta.dtype)
        eye = torch.eye(self.num_params, dtype=theta.dtype)
        if self.num_outputs == 1:
            p = torch.sigmoid(z[..., 0])
            return (eye + self.C * _weighted_gram(x, w * p * (1 - p), self.hessian_dtype if low_precision else None))[:, None]
        # multinomial: sum_i w_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T, classes outer, features inner
        p = softmax_last(z)  # [m, n, K]
        m, n, k = p.shape
        dim = x.shape[1]
        u = (w.sqrt()[..., None, None] * p[..., None] * x[None, :, None, :]).reshape(m, n, k * dim)
        h = (-torch.matmul(u.transpose(1, 2), u)).reshape(m, k, dim, k, dim)
        for c in range(k):
            h[:, c, :, c, :] += _weighted_gram(x, w * p[..., c])
        return (eye + self.C * h.reshape(m, k * dim, k * dim))[:, None]


def softmax_last(z: Tensor) -> Tensor:
    """``torch.softmax(z, -1)``, written out: over a short last axis (the classes) torch's kernel
    is 3-4x slower than these four vectorised passes, and the solvers and the regularisers call
    it on every step. The subtracted maximum is detached (softmax does not depend on it)."""
    e = (z - z.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def _weighted_gram(x: Tensor, weights: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x^T diag(weights[j]) x`` for each row ``j`` of ``weights [m, n]``: ``[m, D, D]``,
    computed in ``dtype`` (float32 for a Newton direction: twice as fast, and the line search and
    the float64 gradient keep the solution exact)."""
    dtype = dtype or x.dtype
    xd = x.to(dtype)
    return torch.matmul(xd.T[None] * weights.to(dtype)[:, None, :], xd).to(x.dtype)


class SquaredHingeSVMTarget(Target):
    """Linear SVM with squared hinge, one-vs-rest: per output ``o`` with :math:`t_{io} = \\pm 1`,
    :math:`\\ell = \\sum_o \\max(0, 1 - t_{io} z_{io})^2`.

    Same solution as ``sklearn.svm.LinearSVC(C=C, loss="squared_hinge")`` (liblinear penalises
    the intercept; tested). The Hessian (generalised: the hinge's second derivative is 2 on the
    active margin) is block-diagonal by output, so Newton runs on ``K`` blocks of ``d + 1``."""

    name = "svm"
    default_method = "newton"
    hessian_dtype = torch.float32

    def _signs(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        if self.num_outputs == 1:
            return (2 * y - 1).to(dtype)[:, None]
        return 2 * torch.nn.functional.one_hot(y, self.num_outputs).to(dtype) - 1

    def score_losses(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.clamp(1 - self._signs(y, z.dtype) * z, min=0).square().sum(-1)

    def score_derivatives(self, z: Tensor, y: Tensor) -> Tensor:
        t = self._signs(y, z.dtype)
        return -2 * t * torch.clamp(1 - t * z, min=0)

    def hessian_blocks(self, theta: Tensor, weights: Tensor, low_precision: bool = False) -> Tensor:
        z = self.scores(theta, self.x_aug)  # [m, n, o]
        x = self.x_aug.to(theta.dtype)
        dtype = self.hessian_dtype if low_precision else None
        active = ((1 - self._signs(self.y, z.dtype) * z) > 0).to(z.dtype) * weights.to(z.dtype)[..., None]
        eye = torch.eye(x.shape[1], dtype=theta.dtype)
        return torch.stack([eye + self.C * _weighted_gram(x, 2 * active[..., o], dtype) for o in range(self.num_outputs)], 1)


TARGETS: dict[str, type[Target]] = {"logistic": LogisticTarget, "svm": SquaredHingeSVMTarget}


def make_target(name: str, x: Array, y: Array, num_classes: int | None = None, C: float = 1.0) -> Target:
    """The target called ``name`` ("logistic" or "svm") on the pool ``(x, y)``."""
    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
    return TARGETS[name](x, y, num_classes=num_classes, C=C)


__all__ = ["Target", "LogisticTarget", "SquaredHingeSVMTarget", "TARGETS", "make_target", "as_features", "as_labels", "data_fingerprint"]
