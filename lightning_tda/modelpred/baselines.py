"""Data-valuation peers ModelPred is compared with (OpenDataVal's and pyDVL's methods, written
here because neither installs with our pins: pyDVL 0.10 wants numpy < 2 and 0.9.2 fails on
import with numpy 2; OpenDataVal pins torch 2.1). Each is checked on a small exact case in
``tests/test_modelpred_peers.py``.

- :func:`tmc_shapley`: truncated Monte-Carlo Shapley by retraining (Ghorbani & Zou, 2019);
  :func:`tmc_shapley_budgets` gives it at several permutation counts from one run;
- :func:`knn_shapley`: exact Shapley values of the K-nearest-neighbour utility (Jia et al., 2019);
- :func:`data_oob`: out-of-bag accuracy of a bagged learner (Kwon & Zou, 2023);
- :func:`influence_values`: the influence function's first-order leave-one-out values (Koh &
  Liang, 2017) with the target's exact Hessian.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_tda.modelpred.targets import Target, as_features, as_labels
from lightning_tda.modelpred.utility import HeldOutUtility, UtilityOfMasks
from lightning_tda.modelpred.valuation import ValuationResult


def tmc_shapley(
    utility_of_masks: UtilityOfMasks,
    n: int,
    empty_utility: float,
    full_utility: float,
    num_permutations: int = 100,
    truncation_tolerance: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    method: str = "TMC Shapley (retraining)",
) -> ValuationResult:
    """Truncated Monte-Carlo Shapley: along each random ordering, retrain on each prefix until the
    previous prefix's utility is within ``truncation_tolerance * |U(D)|`` of :math:`U(D)`; the
    rest of that ordering's marginal contributions count as zero (Ghorbani & Zou's rule).
    ``truncation_tolerance=0`` retrains every prefix (plain permutation sampling)."""
    return tmc_shapley_budgets(utility_of_masks, n, empty_utility, full_utility, [num_permutations], truncation_tolerance, seed, progress, method)[0]


def tmc_shapley_budgets(
    utility_of_masks: UtilityOfMasks,
    n: int,
    empty_utility: float,
    full_utility: float,
    budgets: list[int],
    truncation_tolerance: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    method: str = "TMC Shapley (retraining)",
) -> list[ValuationResult]:
    """:func:`tmc_shapley` at several permutation counts from one run of ``max(budgets)``
    orderings: the result for budget ``b`` is the estimate after the first ``b`` orderings, with
    the wall time spent until then (each equal to :func:`tmc_shapley` with ``b`` permutations
    and the same seed). For convergence and cost curves without rerunning the retraining."""
    wanted = sorted({int(b) for b in budgets})
    if n < 1 or not wanted or wanted[0] < 1:
        raise ValueError(f"n and every budget must be >= 1, got n={n}, budgets={list(budgets)}")
    if truncation_tolerance < 0:
        raise ValueError(f"truncation_tolerance must be >= 0, got {truncation_tolerance}")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    contributions = np.zeros((wanted[-1], n))
    fits = 0
    results: dict[int, ValuationResult] = {}
    for t in tqdm(range(wanted[-1]), desc=method, disable=not progress, leave=False):
        order = rng.permutation(n)
        previous = empty_utility
        mask = np.zeros(n, dtype=bool)
        for position, i in enumerate(order):
            if truncation_tolerance > 0 and abs(full_utility - previous) < truncation_tolerance * abs(full_utility):
                break  # truncated: the remaining contributions stay zero
            mask[i] = True
            current = full_utility if position == n - 1 else float(utility_of_masks(torch.as_tensor(mask[None]))[0])
            fits += position < n - 1
            contributions[t, i] = current - previous
            previous = current
        if t + 1 in wanted:
            done = contributions[: t + 1]
            errors = done.std(0, ddof=1) / math.sqrt(t + 1) if t > 0 else np.full(n, np.nan)
            settings = {"num_permutations": t + 1, "truncation_tolerance": truncation_tolerance, "seed": seed, "retrainings": fits}
            results[t + 1] = ValuationResult(done.mean(0), errors, method, time.perf_counter() - start, settings)
    return [results[int(b)] for b in budgets]


def knn_utility(x_train: Any, y_train: Any, x_test: Any, y_test: Any, masks: Any, k: int = 5) -> torch.Tensor:
    """The K-nearest-neighbour utility of each subset (the one :func:`knn_shapley` values):
    :math:`U(S) = \\tfrac1{|T|} \\sum_t \\tfrac1K \\sum_{j \\le \\min(K, |S|)} 1[y_{\\alpha_j(S)} = y_t]`,
    :math:`\\alpha_j(S)` the ``j``-th nearest member of :math:`S` to test point ``t``."""
    xtr, xte = as_features(x_train), as_features(x_test, "x_test")
    ytr, yte = as_labels(y_train, len(xtr)), as_labels(y_test, len(xte), "y_test")
    order = torch.cdist(xte, xtr).argsort(dim=1, stable=True)  # [T, n]
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    out = torch.empty(len(masks), dtype=torch.float64)
    for s, mask in enumerate(masks):
        members = mask[order]  # [T, n] in distance order
        rank = members.cumsum(1)
        take = members & (rank <= k)
        out[s] = ((ytr[order] == yte[:, None]) & take).sum(1).to(torch.float64).mean() / k
    return out


def knn_shapley(x_train: Any, y_train: Any, x_test: Any, y_test: Any, k: int = 5) -> ValuationResult:
    """Exact Shapley values of :func:`knn_utility` by Jia et al.'s recursion, per test point
    (nearest first, :math:`\\alpha_1 .. \\alpha_N`):

    .. math::

        s_{\\alpha_N} = \\frac{1[y_{\\alpha_N} = y_t]}{N}, \\quad
        s_{\\alpha_i} = s_{\\alpha_{i+1}} + \\frac{1[y_{\\alpha_i} = y_t] - 1[y_{\\alpha_{i+1}} = y_t]}{K} \\frac{\\min(K, i)}{i},

    averaged over test points (the factor :math:`\min(K, N)/K` extends the paper's base case,
    which assumes :math:`N \ge K`, to small pools). ``O(T N log N)``, no model is trained."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    start = time.perf_counter()
    xtr, xte = as_features(x_train), as_features(x_test, "x_test")
    ytr, yte = as_labels(y_train, len(xtr)), as_labels(y_test, len(xte), "y_test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"x_train has {xtr.shape[1]} features but x_test has {xte.shape[1]}")
    n = len(xtr)
    order = torch.cdist(xte, xtr).argsort(dim=1, stable=True)  # [T, N]
    match = (ytr[order] == yte[:, None]).to(torch.float64)  # [T, N] in distance order
    i = torch.arange(1, n, dtype=torch.float64)  # 1-based positions 1 .. N-1
    steps = (match[:, :-1] - match[:, 1:]) / k * torch.clamp(i, max=k) / i  # s_i - s_{i+1}
    tail = torch.flip(torch.cumsum(torch.flip(steps, [1]), 1), [1])  # sum_{j >= i} steps_j
    s = torch.cat([tail, torch.zeros(len(xte), 1, dtype=torch.float64)], 1) + match[:, -1:] * min(k, n) / (n * k)
    values = torch.zeros(len(xte), n, dtype=torch.float64).scatter_(1, order, s).mean(0)
    return ValuationResult(values.numpy(), np.full(n, np.nan), f"KNN-Shapley (K={k})", time.perf_counter() - start, {"k": k})


def data_oob(
    x: Any,
    y: Any,
    num_models: int = 1000,
    learner: Literal["tree", "target"] = "tree",
    target: Target | None = None,
    seed: int = 0,
    progress: bool = False,
    max_features: str | int | float | None = None,
) -> ValuationResult:
    """Data-OOB: each example's mean accuracy under the bagged models whose bootstrap sample
    left it out. ``learner="tree"``: scikit-learn decision trees (the paper's random-forest
    setting; ``random_state`` of model ``b`` is ``seed + b``); ``learner="target"``: the target
    model, all bootstrap samples solved in one batched exact solve (sample counts as weights).
    ``max_features``: the trees' features per split (scikit-learn's; ``"sqrt"`` makes the bag a
    random forest; ``None``: all features)."""
    if num_models < 2:
        raise ValueError(f"num_models must be >= 2, got {num_models}")
    start = time.perf_counter()
    xt = as_features(x)
    yt = as_labels(y, len(xt))
    n = len(xt)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, n, size=(num_models, n))
    counts = np.zeros((num_models, n))
    np.add.at(counts, (np.arange(num_models)[:, None], samples), 1)
    if learner == "tree":
        from sklearn.tree import DecisionTreeClassifier

        correct = np.zeros((num_models, n), dtype=bool)
        for b in tqdm(range(num_models), desc="Data-OOB trees", disable=not progress, leave=False):
            tree = DecisionTreeClassifier(random_state=seed + b, max_features=max_features).fit(xt.numpy()[samples[b]], yt.numpy()[samples[b]])
            correct[b] = tree.predict(xt.numpy()) == yt.numpy()
    elif learner == "target":
        if target is None:
            raise ValueError("learner='target' needs target= (the model to bag)")
        if target.n != n:
            raise ValueError(f"the target's pool has {target.n} examples but x has {n}")
        thetas = target.solve(torch.as_tensor(counts), progress=progress)
        correct = (target.logits(thetas, xt).argmax(-1) == yt).numpy()
    else:
        raise ValueError(f"learner must be 'tree' or 'target', got {learner!r}")
    out_of_bag = counts == 0
    seen = out_of_bag.sum(0)
    values = np.where(seen > 0, (correct & out_of_bag).sum(0) / np.maximum(seen, 1), np.nan)
    values = np.nan_to_num(values, nan=float(np.nanmean(values)) if np.isfinite(values).any() else 0.0)
    kind = ("decision trees" + (f", max_features={max_features}" if max_features is not None else "")) if learner == "tree" else target.name + " models"  # type: ignore[union-attr]
    settings = {"num_models": num_models, "learner": learner, "seed": seed, "max_features": max_features}
    return ValuationResult(values, np.full(n, np.nan), f"Data-OOB ({num_models} {kind})", time.perf_counter() - start, settings)


def influence_values(target: Target, x_test: Any, y_test: Any, theta: torch.Tensor | None = None, damping: float = 0.0) -> ValuationResult:
    """First-order leave-one-out values from the influence function at the full-data solution:

    .. math::  v_i = C\\, \\nabla L_T(\\theta^*)^\\top H^{-1} \\nabla \\ell_i(\\theta^*) \\approx U(D) - U(D \\setminus \\{i\\}),

    :math:`H` the exact Hessian of the target objective on all of :math:`D`, :math:`L_T` the mean
    test loss (removing :math:`i` moves the solution by :math:`H^{-1} C \\nabla \\ell_i`).
    ``damping``: :math:`\\lambda` in :math:`H + \\lambda I` (Koh & Liang's damping; 0 by default,
    as the L2-regularised target's Hessian is positive definite)."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    start = time.perf_counter()
    utility = HeldOutUtility(target, x_test, y_test)
    ones = torch.ones(1, target.n, dtype=torch.float64)
    theta = target.solve(ones)[0] if theta is None else torch.as_tensor(theta, dtype=torch.float64)
    hessian = target.hessian(theta[None], ones)[0]
    hessian = hessian + damping * torch.eye(len(hessian), dtype=hessian.dtype)
    test_gradient = target.loss_gradients(theta, utility.x, utility.y).mean(0)
    direction = torch.linalg.solve(hessian, test_gradient)
    values = target.C * (target.loss_gradients(theta) @ direction)
    method = "influence function" + (f" (damping {damping})" if damping else "")
    return ValuationResult(values.numpy(), np.full(target.n, np.nan), method, time.perf_counter() - start, {"damping": damping})


__all__ = ["tmc_shapley", "tmc_shapley_budgets", "knn_utility", "knn_shapley", "data_oob", "influence_values"]
