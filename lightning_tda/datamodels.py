"""Datamodels and the linear datamodeling score (LDS).

Inputs are the records of a subset sweep: ``masks`` [n_models, n_train] says which training
examples each model was trained on, ``margins`` [n_models, n_test] is each model's output on each
test example.

- :func:`fit_datamodels`: per test example ``j``, an L1-regularised linear regression
  ``margins[:, j] ~ masks @ w_j + b_j`` (Ilyas et al., *Datamodels*, 2022). The weights ``w_j``
  (one row of ``weights`` [n_test, n_train]) are the datamodel scores of the training examples for
  test example ``j``. The L1 strength is chosen per test example on held-out models along a
  regularisation path.
- :func:`batched_lasso`: the solver behind it: FISTA with adaptive restart on all test examples
  at once (one matrix product per step serves every target), stopped on sklearn's duality-gap
  criterion, so it solves exactly the problem of ``sklearn.linear_model.Lasso`` (tested equal).
- :func:`lds`: the linear datamodeling score of any attribution scores, with a bootstrap
  confidence interval; :func:`spearman_correlation` and :func:`rankdata` are the batched rank
  statistics it uses (tested against scipy).

The Lasso objective, per target ``j`` over ``n`` models (the same as sklearn's ``Lasso(alpha=lambda_j)``):

.. math::
    \\min_{w_j, b_j} \\frac{1}{2n} \\lVert y_j - X w_j - b_j \\rVert_2^2 + \\lambda_j \\lVert w_j \\rVert_1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_tda.schema import TEST_ROLE, TRAIN_ROLE, TRAIN_SPLIT
from lightning_tda.store import RunStore, check_same_dataset, fingerprint_of

ArrayLike = Tensor | np.ndarray
Resample = Literal["examples", "models", "both"]

_MAX_EXACT_EIGEN = 4096  # above this many rows/columns the Lipschitz constant comes from power iteration


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        bad = torch.nonzero(~torch.isfinite(x))[:5].tolist()
        raise ValueError(f"{name} has non-finite values (NaN or inf), first at [row, column] {bad}")
    return x


def check_masks_margins(masks: ArrayLike, margins: ArrayLike) -> tuple[Tensor, Tensor]:
    """Validate ``masks`` [n_models, n_train] and ``margins`` [n_models, n_test]; return tensors."""
    masks = _as_tensor(masks, "masks")
    margins = _as_tensor(margins, "margins")
    if masks.shape[0] != margins.shape[0]:
        raise ValueError(
            f"masks and margins must have one row per model, but masks has {masks.shape[0]} models "
            f"and margins has {margins.shape[0]}; pass the masks and margins of the same subset sweep"
        )
    if masks.shape[0] < 3:
        raise ValueError(f"need at least 3 models (rows of masks and margins), got {masks.shape[0]}")
    return masks, margins


def rankdata(x: Tensor, dim: int = 0) -> Tensor:
    """Ranks 1..n along ``dim``, ties given their average rank (``scipy.stats.rankdata``'s default).

    Works on any shape; every slice along ``dim`` is ranked independently. Returns float64.
    """
    x = torch.movedim(torch.as_tensor(x), dim, 0)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    cols = flat.shape[1]
    order = torch.argsort(flat, dim=0, stable=True)
    ordered = flat.gather(0, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = starts.long().cumsum(0) - 1 + torch.arange(cols, device=x.device) * n  # unique per column
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)[:, None].expand(n, cols)
    sums = torch.zeros(n * cols, dtype=torch.float64, device=x.device)
    sums.scatter_add_(0, group.flatten(), positions.flatten())
    counts = torch.zeros(n * cols, dtype=torch.float64, device=x.device)
    counts.scatter_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    average = (sums / counts.clamp_min(1))[group]
    ranks = torch.empty_like(average).scatter_(0, order, average)
    return torch.movedim(ranks.reshape(x.shape), 0, dim)


def pearson_correlation(a: Tensor, b: Tensor, dim: int = 0) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``; NaN where either is constant."""
    a = a.double() - a.double().mean(dim, keepdim=True)
    b = b.double() - b.double().mean(dim, keepdim=True)
    denominator = torch.sqrt((a * a).sum(dim) * (b * b).sum(dim))
    out = (a * b).sum(dim) / denominator
    return torch.where(denominator > 0, out, torch.full_like(out, float("nan"))).clamp(-1.0, 1.0)


def spearman_correlation(a: Tensor, b: Tensor, dim: int = 0) -> Tensor:
    """Spearman rank correlation of ``a`` and ``b`` along ``dim`` (Pearson correlation of the
    average ranks, as ``scipy.stats.spearmanr``); NaN where either is constant."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return pearson_correlation(rankdata(a, dim), rankdata(b, dim), dim)


# --------------------------------------------------------------------------------------------
# Batched Lasso


class _CenteredDesign:
    """A design matrix, centred, with what FISTA needs: products with it and its Lipschitz constant.

    With ``n_features <= 2 * n_samples`` the Gram matrix ``Xc^T Xc`` is formed once and each
    step costs ``n_features^2`` per target; otherwise each step goes through ``Xc`` itself
    (``2 * n_samples * n_features`` per target).
    """

    def __init__(self, x: Tensor) -> None:
        self.n, self.p = x.shape
        self.mean = x.mean(0)
        self.xc = x - self.mean
        self.gram = self.xc.T @ self.xc if self.p <= 2 * self.n else None
        self.lipschitz = self._largest_eigenvalue() / self.n

    def _largest_eigenvalue(self) -> float:
        small = min(self.n, self.p)
        if small <= _MAX_EXACT_EIGEN:
            g = self.gram if self.gram is not None and self.p == small else None
            if g is None:
                g = self.xc @ self.xc.T if self.n == small else self.xc.T @ self.xc
            return float(torch.linalg.eigvalsh(g.double())[-1].clamp_min(1e-30))
        # Power iteration: the Rayleigh quotient never exceeds the top eigenvalue, so add a margin.
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.p, 1, generator=gen, dtype=self.xc.dtype).to(self.xc.device)
        estimate = 0.0
        for _ in range(100):
            w = self.xc.T @ (self.xc @ v)
            estimate = float(w.norm())
            v = w / max(estimate, 1e-30)
        return 1.1 * max(estimate, 1e-30)

    def xt_residual(self, w: Tensor, xty: Tensor, yc: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``Xc^T (yc - Xc w)`` and, without a Gram matrix, the residual itself (else ``Gw``)."""
        if self.gram is not None:
            gw = self.gram @ w
            return xty - gw, None, gw
        r = yc - self.xc @ w
        return self.xc.T @ r, r, None


def _soft_threshold(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


def _duality_gap(
    design: _CenteredDesign, w: Tensor, lam: Tensor, xty: Tensor, yc: Tensor, yy: Tensor
) -> Tensor:
    """sklearn's coordinate-descent duality gap of ``0.5 ||yc - Xc w||^2 + n lam ||w||_1``."""
    xtr, r, gw = design.xt_residual(w, xty, yc)
    if r is not None:
        r_norm2, r_dot_y = (r * r).sum(0), (r * yc).sum(0)
    else:
        w_xty = (w * xty).sum(0)
        r_norm2 = (yy - 2 * w_xty + (w * gw).sum(0)).clamp_min(0)
        r_dot_y = yy - w_xty
    scaled = design.n * lam
    dual_norm = xtr.abs().amax(0)
    const = torch.where(dual_norm > scaled, scaled / dual_norm.clamp_min(1e-30), torch.ones_like(lam))
    return 0.5 * r_norm2 * (1 + const**2) + scaled * w.abs().sum(0) - const * r_dot_y


def _fista(
    design: _CenteredDesign,
    yc: Tensor,
    xty: Tensor,
    lam: Tensor,
    w0: Tensor,
    tol: float,
    max_iter: int,
    check_every: int = 10,
) -> tuple[Tensor, Tensor, int]:
    """Solve every column's Lasso from ``w0``; columns leave the working set once converged.

    Returns the weights [p, T], a bool [T] of converged columns and the iterations run.
    """
    out = w0.clone()
    converged = torch.zeros(lam.shape[0], dtype=torch.bool, device=lam.device)
    idx = torch.arange(lam.shape[0], device=lam.device)
    yy = (yc * yc).sum(0)
    step = 1.0 / design.lipschitz
    w, z = w0.clone(), w0.clone()
    t = torch.ones_like(lam)
    it = 0
    for it in range(1, max_iter + 1):
        if (it - 1) % check_every == 0:
            gap = _duality_gap(design, w, lam[idx], xty[:, idx], yc[:, idx], yy[idx])
            done = gap <= tol * yy[idx]
            if bool(done.any()):
                out[:, idx[done]] = w[:, done]
                converged[idx[done]] = True
                keep = ~done
                idx, w, z, t = idx[keep], w[:, keep], z[:, keep], t[keep]
            if idx.numel() == 0:
                break
        xtr, _, _ = design.xt_residual(z, xty[:, idx], yc[:, idx])
        w_new = _soft_threshold(z + step * xtr / design.n, step * lam[idx])
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        # Adaptive restart (O'Donoghue & Candes): drop the momentum of a column going uphill.
        restart = ((z - w_new) * (w_new - w)).sum(0) > 0
        beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        z = w_new + beta * (w_new - w)
        w = w_new
    out[:, idx] = w
    return out, converged, it


def _prepare(
    x: Tensor, y: Tensor, device: torch.device | str | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    device = torch.device(device) if device is not None else y.device
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def batched_lasso(
    x: ArrayLike,
    y: ArrayLike,
    lambdas: float | ArrayLike,
    *,
    tol: float = 1e-4,
    max_iter: int = 10_000,
    init: ArrayLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lasso with intercept for many targets at once, each with its own ``lambda``.

    Solves, per column ``j`` of ``y``, sklearn's ``Lasso(alpha=lambdas[j], tol=tol)`` problem
    (intercept unpenalised; stop once the duality gap is at most ``tol * ||y_j - mean(y_j)||^2``).

    Args:
        x: design [n_samples, n_features] (bool masks are fine).
        y: targets [n_samples, n_targets].
        lambdas: one L1 strength for all targets, or one per target [n_targets].
        init: warm start [n_targets, n_features].

    Returns:
        ``(weights [n_targets, n_features], intercepts [n_targets], converged [n_targets] bool)``.
    """
    x = _as_tensor(x, "x")
    y = _as_tensor(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    x, y = _prepare(x, y, device, dtype)
    lam = torch.as_tensor(lambdas, dtype=dtype, device=y.device).flatten()
    if lam.numel() == 1:
        lam = lam.expand(y.shape[1]).clone()
    if lam.shape[0] != y.shape[1] or bool((lam < 0).any()):
        raise ValueError(f"lambdas must be one value or {y.shape[1]} values, all >= 0")
    design = _CenteredDesign(x)
    y_mean = y.mean(0)
    yc = y - y_mean
    xty = design.xc.T @ yc
    w0 = torch.zeros(x.shape[1], y.shape[1], dtype=dtype, device=y.device)
    if init is not None:
        w0 = torch.as_tensor(init).to(device=y.device, dtype=dtype).T.contiguous()
    w, converged, _ = _fista(design, yc, xty, lam, w0, tol, max_iter)
    return w.T.cpu(), (y_mean - design.mean @ w).cpu(), converged.cpu()


# --------------------------------------------------------------------------------------------
# Datamodels


@dataclass
class DatamodelsResult:
    """Fitted datamodels, one per test example.

    Attributes:
        weights: [n_test, n_train] the datamodel scores: ``weights[j, i]`` is the effect of training
            example ``i`` on test example ``j``'s margin.
        biases: [n_test] intercepts.
        lambdas: [n_test] the L1 strength chosen for each test example.
        lambda_path: [n_lambdas, n_test] the path each test example was fitted along (descending).
        val_mse_path: [n_lambdas, n_test] held-out mean squared error along the path.
        val_mse: [n_test] held-out mean squared error at the chosen lambda.
        val_spearman: [n_test] Spearman correlation on the held-out models between predicted and
            actual margins at the chosen lambda (NaN where the prediction is constant).
        val_models: indices of the models held out to choose lambda.
        converged: [n_test] whether the final fit met the tolerance within ``max_iter``.
    """

    weights: Tensor
    biases: Tensor
    lambdas: Tensor
    lambda_path: Tensor
    val_mse_path: Tensor
    val_mse: Tensor
    val_spearman: Tensor
    val_models: Tensor
    converged: Tensor

    @property
    def n_nonzero(self) -> Tensor:
        """[n_test] number of training examples with a nonzero weight."""
        return (self.weights != 0).sum(1)

    def predict(self, masks: ArrayLike) -> Tensor:
        """Predicted margins [n_models, n_test] of models trained on ``masks`` [n_models, n_train]."""
        masks = _as_tensor(masks, "masks")
        if masks.shape[1] != self.weights.shape[1]:
            raise ValueError(
                f"masks have {masks.shape[1]} training examples, the datamodels {self.weights.shape[1]}"
            )
        return masks.to(self.weights.dtype) @ self.weights.T + self.biases


def _lambda_path(
    masks: Tensor,
    margins: Tensor,
    n_lambdas: int,
    lambda_min_ratio: float,
    lambdas: Sequence[float] | ArrayLike | None,
) -> Tensor:
    """The path [n_lambdas, n_test], descending: the given ``lambdas`` for every test example, or
    ``lambda_max * geomspace(1, lambda_min_ratio)`` with each example's ``lambda_max``."""
    if lambdas is not None:
        values = torch.as_tensor(np.asarray(lambdas, dtype=np.float64)).flatten()
        if values.numel() == 0 or bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
            raise ValueError("lambdas must be a non-empty sequence of finite values >= 0")
        return values.sort(descending=True).values[:, None].expand(-1, margins.shape[1]).clone()
    if n_lambdas < 1:
        raise ValueError(f"n_lambdas must be >= 1, got {n_lambdas}")
    if not 0 < lambda_min_ratio <= 1:
        raise ValueError(f"lambda_min_ratio must be in (0, 1], got {lambda_min_ratio}")
    x, y = masks.double(), margins.double()
    lambda_max = ((x - x.mean(0)).T @ (y - y.mean(0))).abs().amax(0).cpu() / x.shape[0]
    ratios = torch.as_tensor(np.geomspace(1.0, lambda_min_ratio, n_lambdas))
    return ratios[:, None] * lambda_max[None, :]


@dataclass(frozen=True)
class _Fit:
    """What one fit needs besides the data: the held-out split, the path and the solver settings."""

    fit_models: Tensor
    val_models: Tensor
    path: Tensor  # [n_lambdas, n_test] float64 on the CPU
    refit: bool
    patience: int | None
    tol: float
    max_iter: int
    progress: bool


def fit_datamodels(
    masks: ArrayLike,
    margins: ArrayLike,
    *,
    n_lambdas: int = 20,
    lambda_min_ratio: float = 1e-3,
    lambdas: Sequence[float] | ArrayLike | None = None,
    val_fraction: float = 0.1,
    refit: bool = True,
    patience: int | None = None,
    solver: Literal["torch", "sklearn"] = "torch",
    tol: float = 1e-4,
    max_iter: int = 5_000,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: bool = True,
) -> DatamodelsResult:
    """Fit one L1-regularised linear datamodel per test example.

    The models are split at random (``seed``) into a fitting set and ``val_fraction`` held-out
    models. Along a regularisation path (``n_lambdas`` values from each test example's
    ``lambda_max`` on the fitting set, the smallest lambda giving all-zero weights, down to
    ``lambda_min_ratio * lambda_max``; or the given absolute ``lambdas`` for every example), each
    test example's Lasso is fitted on the fitting set, warm-started from the previous lambda, and
    the lambda with the lowest held-out MSE is chosen per test example. With ``refit`` the final
    weights are refitted on all models at the chosen lambda; otherwise the fitting-set weights are
    returned.

    Args:
        masks: [n_models, n_train] bool (or 0/1) masks of the training subsets.
        margins: [n_models, n_test] each model's margin on each test example.
        patience: torch solver only: stop a test example's path once its held-out error has not
            improved for ``patience`` consecutive lambdas (its remaining ``val_mse_path`` entries
            are NaN). Saves the slowest, least regularised end of the path; ``None`` (default)
            runs the whole path, exactly as the sklearn reference.
        solver: ``"torch"`` (:func:`batched_lasso`'s solver: all test examples at once, CPU or
            GPU) or ``"sklearn"`` (``sklearn.linear_model.lasso_path`` and ``Lasso``, one test
            example at a time: the reference).
        tol, max_iter: the solvers' stopping rule (sklearn's duality gap, relative to
            ``||y - mean(y)||^2``) and iteration cap per lambda.
        chunk_size: test examples solved together by the torch solver (all by default); lower it
            when ``n_train * n_test`` floats do not fit in memory several times over.
        device, dtype: where and in what precision the torch solver runs (default: margins'
            device, float32).
        progress: show a tqdm bar.

    Returns:
        A :class:`DatamodelsResult` (tensors on the CPU).
    """
    masks, margins = check_masks_margins(masks, margins)
    n_models = masks.shape[0]
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(val_fraction * n_models)))
    if n_models - n_val < 2:
        raise ValueError(f"{n_models} models leave fewer than 2 to fit after holding out {n_val}")
    if solver not in ("torch", "sklearn"):
        raise ValueError(f"solver must be 'torch' or 'sklearn', got {solver!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    perm = torch.randperm(n_models, generator=torch.Generator().manual_seed(seed))
    val_models, fit_models = perm[:n_val].sort().values, perm[n_val:].sort().values
    path = _lambda_path(masks[fit_models], margins[fit_models], n_lambdas, lambda_min_ratio, lambdas)
    fit = _Fit(fit_models, val_models, path, refit, patience, tol, max_iter, progress)
    if solver == "sklearn":
        return _fit_sklearn(masks.double().numpy(), margins.double().cpu().numpy(), fit)

    x, y = _prepare(masks, margins, device, dtype)
    fit_design = _CenteredDesign(x[fit_models.to(x.device)])
    full_design = _CenteredDesign(x) if refit else None
    n_test = y.shape[1]
    chunk = n_test if chunk_size is None else chunk_size
    bar = tqdm(total=math.ceil(n_test / chunk) * path.shape[0], desc="datamodels: lambda path",
               disable=not progress, leave=False)
    parts = []
    for start in range(0, n_test, chunk):
        cols = slice(start, start + chunk)
        parts.append(_fit_torch_chunk(x, y[:, cols], fit_design, full_design, fit, cols, bar))
    bar.close()
    weights, biases, chosen, mse_path, best_mse, val_rho, converged = (
        torch.cat(p, dim=-1) for p in zip(*parts)
    )
    return DatamodelsResult(
        weights=weights.T.contiguous(), biases=biases, lambdas=chosen,
        lambda_path=path.to(weights.dtype), val_mse_path=mse_path, val_mse=best_mse,
        val_spearman=val_rho, val_models=val_models, converged=converged,
    )


def _fit_torch_chunk(
    x: Tensor,
    y: Tensor,
    fit_design: _CenteredDesign,
    full_design: _CenteredDesign | None,
    fit: _Fit,
    cols: slice,
    bar: tqdm,
) -> tuple[Tensor, ...]:
    """The path, the held-out choice and the refit for the test examples ``cols`` (``y``'s columns)."""
    fit_rows, val_rows = fit.fit_models.to(x.device), fit.val_models.to(x.device)
    y_fit, x_val, y_val = y[fit_rows], x[val_rows], y[val_rows]
    path = fit.path[:, cols].to(device=y.device, dtype=y.dtype)
    y_mean = y_fit.mean(0)
    yc = y_fit - y_mean
    xty = fit_design.xc.T @ yc
    n_test = y.shape[1]
    w = torch.zeros(fit_design.p, n_test, dtype=y.dtype, device=y.device)
    best_w = w.clone()
    best_mse = torch.full((n_test,), float("inf"), dtype=y.dtype, device=y.device)
    best_pred = torch.zeros_like(y_val)
    best_lam = path[0].clone()
    converged = torch.ones(n_test, dtype=torch.bool, device=y.device)
    mse_path = torch.full_like(path, float("nan"))
    since_best = torch.zeros(n_test, dtype=torch.long, device=y.device)
    for k in range(path.shape[0]):
        # Columns whose held-out error has not improved for `patience` steps leave the path.
        act = torch.arange(n_test, device=y.device)
        if fit.patience is not None:
            act = act[since_best < fit.patience]
            if act.numel() == 0:
                bar.update(path.shape[0] - k)
                break
        w_act, conv, iters = _fista(
            fit_design, yc[:, act], xty[:, act], path[k, act], w[:, act], fit.tol, fit.max_iter
        )
        w[:, act] = w_act
        converged[act] &= conv
        pred = x_val @ w_act + (y_mean[act] - fit_design.mean @ w_act)
        mse = ((pred - y_val[:, act]) ** 2).mean(0)
        mse_path[k, act] = mse
        better = mse < best_mse[act]
        since_best[act] = torch.where(better, 0, since_best[act] + 1)
        improved = act[better]
        best_mse[improved] = mse[better]
        best_lam[improved] = path[k, improved]
        best_w[:, improved] = w_act[:, better]
        best_pred[:, improved] = pred[:, better]
        bar.update(1)
        bar.set_postfix(iterations=iters, active=int(act.numel()))
    val_rho = spearman_correlation(best_pred, y_val).to(y.dtype)
    if full_design is not None:
        y_all_mean = y.mean(0)
        yc_all = y - y_all_mean
        xty_all = full_design.xc.T @ yc_all
        best_w, converged, _ = _fista(full_design, yc_all, xty_all, best_lam, best_w, fit.tol, fit.max_iter)
        biases = y_all_mean - full_design.mean @ best_w
    else:
        biases = y_mean - fit_design.mean @ best_w
    return tuple(t.cpu() for t in (best_w, biases, best_lam, mse_path, best_mse, val_rho, converged))


def _fit_sklearn(x: np.ndarray, y: np.ndarray, fit: _Fit) -> DatamodelsResult:
    """The reference: sklearn's coordinate descent, one test example at a time, same path and split."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso, lasso_path

    x_fit, y_fit = x[fit.fit_models.numpy()], y[fit.fit_models.numpy()]
    x_val, y_val = x[fit.val_models.numpy()], y[fit.val_models.numpy()]
    x_mean, y_mean = x_fit.mean(0), y_fit.mean(0)
    path = fit.path.numpy()
    n_test = y.shape[1]
    weights = np.zeros((n_test, x.shape[1]))
    biases, chosen, best_mse, val_rho = np.zeros(n_test), np.zeros(n_test), np.zeros(n_test), np.zeros(n_test)
    mse_path = np.zeros(path.shape)
    converged = np.ones(n_test, dtype=bool)
    for j in tqdm(range(n_test), desc="datamodels (sklearn)", disable=not fit.progress, leave=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            _, coefs, _ = lasso_path(x_fit - x_mean, y_fit[:, j] - y_mean[j], alphas=path[:, j], tol=fit.tol,
                                     max_iter=fit.max_iter)
            pred = x_val @ coefs + (y_mean[j] - x_mean @ coefs)[None, :]
            mse_path[:, j] = ((pred - y_val[:, j : j + 1]) ** 2).mean(0)
            k = int(np.argmin(mse_path[:, j]))
            chosen[j], best_mse[j] = path[k, j], mse_path[k, j]
            rho = spearman_correlation(torch.from_numpy(pred[:, k]), torch.from_numpy(y_val[:, j]))
            val_rho[j] = float(rho)
            if fit.refit:
                model = Lasso(alpha=chosen[j], tol=fit.tol, max_iter=fit.max_iter).fit(x, y[:, j])
                weights[j], biases[j] = model.coef_, model.intercept_
            else:
                weights[j], biases[j] = coefs[:, k], y_mean[j] - x_mean @ coefs[:, k]
        converged[j] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    as_tensor = torch.from_numpy
    return DatamodelsResult(
        weights=as_tensor(weights), biases=as_tensor(biases), lambdas=as_tensor(chosen), lambda_path=fit.path,
        val_mse_path=as_tensor(mse_path), val_mse=as_tensor(best_mse), val_spearman=as_tensor(val_rho),
        val_models=fit.val_models, converged=as_tensor(converged),
    )


# --------------------------------------------------------------------------------------------
# Linear datamodeling score


@dataclass
class LDSResult:
    """The linear datamodeling score of one set of attribution scores.

    Attributes:
        value: mean over test examples of the per-example Spearman correlation (undefined
            correlations, see ``per_example``, count as 0).
        ci_low, ci_high: percentile bootstrap confidence interval of ``value`` (NaN when
            ``n_bootstrap == 0``).
        per_example: [n_test] Spearman correlation across models between predicted and actual
            margins; NaN where it is undefined (the predicted or actual margins are constant across
            models, e.g. an all-zero row of scores).
        confidence, n_bootstrap, resample: how the interval was made.
    """

    value: float
    ci_low: float
    ci_high: float
    per_example: Tensor
    confidence: float
    n_bootstrap: int
    resample: Resample

    @property
    def n_undefined(self) -> int:
        """Test examples whose correlation is undefined (counted as 0 in ``value``)."""
        return int(torch.isnan(self.per_example).sum())

    def __str__(self) -> str:
        level = f"{100 * self.confidence:.0f}%"
        return (
            f"LDS {self.value:.3f} ({level} CI [{self.ci_low:.3f}, {self.ci_high:.3f}], bootstrap over "
            f"{self.resample}; {len(self.per_example)} test examples, {self.n_undefined} undefined)"
        )

    def __float__(self) -> float:
        return self.value


def _sweep_inputs(
    scores: Any, sweep: RunStore, split: str | None, train_split: str, sources: Sequence[RunStore]
) -> tuple[Tensor, Tensor]:
    """Masks and margins of ``split`` from a sweep store, after checking it holds the datasets the
    scores were computed on (the scores' own record when they are stored, and every source)."""
    from lightning_tda.sweep import read_sweep

    if split is None:
        raise ValueError("give split= (the sweep's split the scores' test examples are) with a sweep store")
    here = f"the sweep store at {sweep.path}"
    recorded = getattr(scores, "fingerprints", None) or {}
    for role, name in ((TRAIN_ROLE, train_split), (TEST_ROLE, split)):
        entries = [(here, fingerprint_of(sweep, name))]
        if role in recorded:
            entries.append((f"the scores in {scores.store.path}", recorded[role]))
        entries += [(f"the RunStore at {s.path}", fingerprint_of(s, name)) for s in sources]
        check_same_dataset(entries, f"{role} split {name!r}")
    masks, margins = read_sweep(sweep, split)
    return torch.from_numpy(masks), torch.from_numpy(margins)


def _predict(scores: Any, masks: Tensor) -> Tensor:
    """``masks @ scores^T`` ``[n_models, n_test]``, reading stored scores one row block at a time."""
    if hasattr(scores, "iter_row_blocks"):
        columns = []
        for _, block in scores.iter_row_blocks():
            columns.append(masks.to(torch.float32) @ _as_tensor(block, "scores").to(torch.float32).T)
        return torch.cat(columns, dim=1)
    tensor = _as_tensor(scores, "scores")
    dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.float32
    return masks.to(device=tensor.device, dtype=dtype) @ tensor.to(dtype).T


def lds(
    scores: ArrayLike | Any,
    masks: ArrayLike | RunStore | None = None,
    margins: ArrayLike | None = None,
    *,
    split: str | None = None,
    train_split: str = TRAIN_SPLIT,
    sources: Sequence[RunStore] = (),
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    resample: Resample = "examples",
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score (Park et al., *TRAK*, 2023) of attribution ``scores``.

    For each test example ``j`` the scores predict model ``m``'s margin as the sum of the scores of
    the training examples in its subset, ``sum_{i in S_m} scores[j, i]``; the LDS of ``j`` is the
    Spearman correlation across models between these predictions and the actual ``margins[m, j]``;
    the LDS is the mean over test examples.

    .. math::
        \\mathrm{LDS} = \\frac{1}{n_{test}} \\sum_j \\rho_s\\big( (\\textstyle\\sum_{i \\in S_m}
        \\tau_{ji})_m,\\; (f_m(z_j))_m \\big)

    The confidence interval is a percentile bootstrap of that mean with ``n_bootstrap``
    resamples (with replacement) of ``resample``:

    - ``"examples"`` (default): the test examples, with the models fixed: how much the score
      depends on which test examples were measured;
    - ``"models"``: the models, recomputing every correlation: how much it depends on which subset
      models were trained;
    - ``"both"``: both at once (the widest interval).

    Args:
        scores: [n_test, n_train] attribution scores (e.g. ``DatamodelsResult.weights``), or a
            :class:`~lightning_tda.attribution.StoredScores` (read one row block at a time).
        masks: [n_models, n_train] training subsets of the evaluation models; or the sweep's
            RunStore, whose masks and ``split`` margins are read after checking that it holds the
            same train and test datasets (fingerprints) as the stored scores and every store in
            ``sources`` (an error names both stores when not).
        margins: [n_models, n_test] their margins (None with a sweep store).
        split, train_split: the sweep's split of the test examples, and of the training set.
        sources: the gradient stores the scores were computed from (checked with a sweep store).

    Returns:
        An :class:`LDSResult`.
    """
    if isinstance(masks, RunStore):
        if margins is not None:
            raise ValueError("give a sweep store or masks and margins, not both")
        masks, margins = _sweep_inputs(scores, masks, split, train_split, sources)
    elif masks is None or margins is None:
        raise ValueError("give masks and margins, or a sweep store (masks=RunStore, split=...)")
    masks, margins = check_masks_margins(masks, margins)
    if not hasattr(scores, "iter_row_blocks"):
        scores = _as_tensor(scores, "scores")
    shape = tuple(scores.shape)
    if shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores cover {shape[1]} training examples (columns) but masks have {masks.shape[1]}; "
            "scores must be [n_test, n_train] for the same training set as the masks"
        )
    if shape[0] != margins.shape[1]:
        raise ValueError(
            f"scores cover {shape[0]} test examples (rows) but margins have {margins.shape[1]}; "
            "scores must be [n_test, n_train] for the same test set as the margins"
        )
    if resample not in ("examples", "models", "both"):
        raise ValueError(f"resample must be 'examples', 'models' or 'both', got {resample!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")

    predicted = _predict(scores, masks)
    margins = margins.to(device=predicted.device)
    per_example = spearman_correlation(predicted, margins)
    filled = torch.nan_to_num(per_example, nan=0.0)
    value = float(filled.mean())

    ci_low = ci_high = float("nan")
    if n_bootstrap > 0:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n_models, n_test = margins.shape
        if resample == "examples":
            idx = torch.randint(n_test, (n_bootstrap, n_test), generator=gen).to(filled.device)
            stats = filled[idx].mean(1)
        else:
            stats = torch.empty(n_bootstrap, dtype=torch.float64)
            for b in range(n_bootstrap):
                rows = torch.randint(n_models, (n_models,), generator=gen).to(filled.device)
                rho = torch.nan_to_num(spearman_correlation(predicted[rows], margins[rows]), nan=0.0)
                if resample == "both":
                    rho = rho[torch.randint(n_test, (n_test,), generator=gen).to(filled.device)]
                stats[b] = rho.mean()
        q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
        ci_low, ci_high = (float(v) for v in torch.quantile(stats.double().cpu(), q))
    return LDSResult(
        value=value, ci_low=ci_low, ci_high=ci_high, per_example=per_example.cpu(),
        confidence=confidence, n_bootstrap=n_bootstrap, resample=resample,
    )
