"""Each cleaning peer at its default setting and at its best one, the best chosen on held-out data.

A fair peer comparison runs each peer as a careful user would: once at its library / paper
default, and once at the best setting of a small grid. The best setting is chosen by precision at
the flip rate on a *tuning* problem (another split seed and another flip seed than the reported
figure), so the reported figure never chooses its own settings.

Defaults and grids (:data:`DEFAULTS`, :data:`GRIDS`):

- TMC Shapley: truncation tolerance 0.01 (Ghorbani & Zou's ``tolerance`` in their code) at the
  study's permutation budget; grid 0.01 / 0.05 / 0.1 / 0.2. All tolerances of the grid are
  read off one pass at the smallest (:func:`tmc_tolerance_sweep`, the same permutations).
- KNN-Shapley: K = 5 (scikit-learn's ``KNeighborsClassifier`` default, which pyDVL's KNN-Shapley
  uses); grid K = 1, 3, 5, 10, 20.
- Data-OOB with trees: 1000 fully grown trees on all features (Kwon & Zou's B = 1000); grid 200 /
  1000 trees on all features and 1000 trees on sqrt(d) features per split (a random forest).
- Data-OOB with the target (logistic) model: 200 bagged models; grid 50 / 200 / 1000.
- Influence function: no damping (the L2-regularised target's Hessian is positive definite);
  grid damping 0 / 0.01 / 0.1 / 1 / 10 added to the Hessian's diagonal (its eigenvalues are >= 1).
- Leave-one-out by retraining has no setting of its own (the target's C defines the utility that
  every method values), so its default is its best.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from lightning_tda.modelpred.baselines import data_oob, influence_values, knn_shapley, tmc_shapley
from lightning_tda.modelpred.cleaning import precision_at_flip_rate
from lightning_tda.modelpred.targets import Target
from lightning_tda.modelpred.utility import HeldOutUtility, UtilityOfMasks, exact_utility, sklearn_utility
from lightning_tda.modelpred.valuation import ValuationResult, leave_one_out_values

TUNED_METHODS = ("tmc_shapley", "knn_shapley", "data_oob", "data_oob_target", "influence")
DEFAULTS: dict[str, dict[str, Any]] = {
    "leave_one_out": {},
    "tmc_shapley": {"truncation_tolerance": 0.01},
    "knn_shapley": {"k": 5},
    "data_oob": {"num_models": 1000, "max_features": None},
    "data_oob_target": {"num_models": 200},
    "influence": {"damping": 0.0},
}
GRIDS: dict[str, list[dict[str, Any]]] = {
    "tmc_shapley": [{"truncation_tolerance": t} for t in (0.01, 0.05, 0.1, 0.2)],
    "knn_shapley": [{"k": k} for k in (1, 3, 5, 10, 20)],
    "data_oob": [{"num_models": 200, "max_features": None}, {"num_models": 1000, "max_features": None}, {"num_models": 1000, "max_features": "sqrt"}],
    "data_oob_target": [{"num_models": m} for m in (50, 200, 1000)],
    "influence": [{"damping": d} for d in (0.0, 0.01, 0.1, 1.0, 10.0)],
}


def describe(setting: dict[str, Any]) -> str:
    """``{"k": 5}`` -> ``"k=5"``."""
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "no setting"


def tmc_tolerance_sweep(
    utility_of_masks: UtilityOfMasks, n: int, empty_utility: float, full_utility: float, num_permutations: int, tolerances: list[float], seed: int = 0,
) -> dict[float, ValuationResult]:
    """TMC Shapley at several truncation tolerances from one pass over the same permutations.

    The pass truncates at the smallest tolerance; a larger tolerance truncates each permutation
    at the same place or earlier, so its marginal contributions are a prefix of the recorded ones.
    Equal, tolerance by tolerance, to :func:`tmc_shapley` with the same seed. Each result's
    ``seconds`` is the pass's time per retraining times the retrainings that tolerance needs alone.
    """
    if min(tolerances) <= 0:
        raise ValueError("tolerances must be > 0 (tolerance 0 never truncates: run tmc_shapley)")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    low = min(tolerances)
    orders, utilities = [], []  # per permutation: order, utilities after each prefix (until truncation at `low`)
    fits = 0
    for _ in range(num_permutations):
        order = rng.permutation(n)
        previous, mask, seen = empty_utility, np.zeros(n, dtype=bool), []
        for position, i in enumerate(order):
            if abs(full_utility - previous) < low * abs(full_utility):
                break
            mask[i] = True
            previous = full_utility if position == n - 1 else float(utility_of_masks(torch.as_tensor(mask[None]))[0])
            fits += position < n - 1
            seen.append(previous)
        orders.append(order)
        utilities.append(seen)
    per_fit = (time.perf_counter() - start) / max(fits, 1)
    out = {}
    for tolerance in tolerances:
        contributions = np.zeros((num_permutations, n))
        retrainings = 0
        for t, (order, seen) in enumerate(zip(orders, utilities)):
            previous = empty_utility
            for position, current in enumerate(seen):
                if abs(full_utility - previous) < tolerance * abs(full_utility):
                    break
                retrainings += position < n - 1
                contributions[t, order[position]] = current - previous
                previous = current
        errors = contributions.std(0, ddof=1) / math.sqrt(num_permutations) if num_permutations > 1 else np.full(n, np.nan)
        settings = {"num_permutations": num_permutations, "truncation_tolerance": tolerance, "seed": seed, "retrainings": retrainings}
        out[tolerance] = ValuationResult(contributions.mean(0), errors, "TMC Shapley (retraining)", per_fit * retrainings, settings)
    return out


def run_peer(method: str, setting: dict[str, Any], target: Target, x: torch.Tensor, noisy: torch.Tensor, utility: HeldOutUtility,
             tmc_permutations: int, seed: int) -> ValuationResult:
    """Values of the noisy pool by one peer at one setting (its time measured here)."""
    start = time.perf_counter()
    if method == "leave_one_out":
        result = leave_one_out_values(sklearn_utility(target, utility), target.n, method="leave-one-out (retraining)")
    elif method == "tmc_shapley":
        full = float(exact_utility(target, utility)(np.ones((1, target.n), dtype=bool))[0])
        result = tmc_shapley(sklearn_utility(target, utility), target.n, utility.empty(), full, tmc_permutations, setting["truncation_tolerance"], seed)
    elif method == "knn_shapley":
        result = knn_shapley(x, noisy, utility.x, utility.y, setting["k"])
    elif method == "data_oob":
        result = data_oob(x, noisy, setting["num_models"], "tree", seed=seed, max_features=setting["max_features"])
    elif method == "data_oob_target":
        result = data_oob(x, noisy, setting["num_models"], "target", target=target, seed=seed)
    elif method == "influence":
        result = influence_values(target, utility.x, utility.y, damping=setting["damping"])
    else:
        raise ValueError(f"unknown peer {method!r}; peers: {tuple(DEFAULTS)}")
    return dataclasses.replace(result, seconds=time.perf_counter() - start, settings={**result.settings, **setting})


def tune_peer(method: str, target: Target, x: torch.Tensor, noisy: torch.Tensor, flipped: np.ndarray, utility: HeldOutUtility,
              tmc_permutations: int, seed: int, grid: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Precision at the flip rate of every setting of ``method``'s grid on a tuning problem, and the
    best (ties go to the default, then to the grid's order)."""
    grid = GRIDS[method] if grid is None else grid
    if method == "tmc_shapley":
        full = float(exact_utility(target, utility)(np.ones((1, target.n), dtype=bool))[0])
        sweep = tmc_tolerance_sweep(sklearn_utility(target, utility), target.n, utility.empty(), full, tmc_permutations,
                                    [s["truncation_tolerance"] for s in grid], seed)
        results = [sweep[s["truncation_tolerance"]] for s in grid]
    else:
        results = [run_peer(method, s, target, x, noisy, utility, tmc_permutations, seed) for s in grid]
    precision = [precision_at_flip_rate(r.values, flipped) for r in results]
    best = max(precision)
    ties = [i for i, p in enumerate(precision) if p == best]
    default = next((i for i in ties if grid[i] == DEFAULTS[method]), ties[0])
    return {"grid": grid, "precision": precision, "seconds": [r.seconds for r in results], "best": grid[default]}


def tune_peers(methods: list[str], target: Target, x: torch.Tensor, noisy: torch.Tensor, flipped: np.ndarray, utility: HeldOutUtility,
               tmc_permutations: int, seed: int, grids: dict[str, list[dict[str, Any]]] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`tune_peer` for each of ``methods`` (leave-one-out has no grid: its default is kept)."""
    out = {}
    for method in methods:
        if method not in GRIDS:
            out[method] = {"grid": [DEFAULTS[method]], "precision": [], "seconds": [], "best": DEFAULTS[method]}
            continue
        out[method] = tune_peer(method, target, x, noisy, flipped, utility, tmc_permutations, seed, (grids or {}).get(method))
        if log:
            log(f"tuned {method}: {out[method]['precision']} -> {describe(out[method]['best'])}")
    return out


__all__ = ["DEFAULTS", "GRIDS", "TUNED_METHODS", "describe", "run_peer", "tune_peer", "tune_peers", "tmc_tolerance_sweep"]
