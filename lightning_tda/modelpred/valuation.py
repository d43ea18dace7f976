"""Data valuation: Shapley values and leave-one-out values of training examples.

For a utility :math:`U` of subsets (see :mod:`~lightning_tda.modelpred.utility`), the Shapley
value of example :math:`i` among :math:`n` is its mean marginal contribution over uniformly random
orderings :math:`\\pi`,

.. math::  \\phi_i = \\mathbb{E}_\\pi \\big[ U(P_i^\\pi \\cup \\{i\\}) - U(P_i^\\pi) \\big],

:math:`P_i^\\pi` the examples before :math:`i` in :math:`\\pi`; the leave-one-out value is
:math:`U(D) - U(D \\setminus \\{i\\})`. With ModelPred every prefix of every sampled permutation is
predicted in one batched call, so a permutation costs one matrix product instead of ``n``
retrainings.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_tda.modelpred.utility import HeldOutUtility, UtilityOfMasks, predicted_utility
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_tda.modelpred.modelpred import ModelPred


@dataclasses.dataclass(frozen=True)
class ValuationResult(AnalysisResult):
    """Values of the ``n`` training examples by one method.

    Attributes:
        values: ``[n]``, higher is more valuable.
        standard_errors: ``[n]`` Monte-Carlo standard errors (NaN for deterministic methods).
        method: how the values were computed.
        seconds: wall time of the computation.
        settings: the settings that made it.
    """

    values: np.ndarray
    standard_errors: np.ndarray
    method: str
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        order = np.argsort(-self.values, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        return pd.DataFrame({"example": np.arange(len(self.values)), "value": self.values, "standard_error": self.standard_errors, "rank": rank})

    def summary(self) -> dict[str, float]:
        return {
            "num_examples": float(len(self.values)),
            "sum_of_values": float(np.sum(self.values)),
            "mean_standard_error": float(np.nanmean(self.standard_errors)) if np.isfinite(self.standard_errors).any() else float("nan"),
            "seconds": float(self.seconds),
        }

    def lowest(self, k: int) -> np.ndarray:
        """Indices of the ``k`` lowest-valued examples (the likeliest harmful ones)."""
        return np.argsort(self.values, kind="stable")[:k]

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.5)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        order = np.argsort(self.values)
        ranks = np.arange(len(order))
        ax.plot(ranks, self.values[order], lw=1.5, label=self.method)
        if np.isfinite(self.standard_errors).any():
            se = np.nan_to_num(self.standard_errors[order])
            ax.fill_between(ranks, self.values[order] - se, self.values[order] + se, alpha=0.3, label="± 1 standard error")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("training examples, sorted by value")
        ax.set_ylabel("value")
        ax.set_title(f"{self.method} ({self.seconds:.2g} s)")
        ax.legend(loc="upper left", fontsize=8)
        return fig, ax


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")


def permutation_shapley(
    utility_of_masks: UtilityOfMasks,
    n: int,
    empty_utility: float,
    num_permutations: int = 200,
    seed: int = 0,
    permutations: np.ndarray | None = None,
    permutations_per_call: int | None = None,
    method: str = "permutation Shapley",
    progress: bool = False,
    truncation_tolerance: float = 0.0,
) -> ValuationResult:
    """Monte-Carlo permutation Shapley values: every prefix of ``permutations_per_call``
    permutations is evaluated in one call of ``utility_of_masks``.

    ``truncation_tolerance > 0`` applies truncated Monte-Carlo's rule (Ghorbani & Zou; the same
    estimator as :func:`~lightning_tda.modelpred.baselines.tmc_shapley`, tested equal to it):
    along each ordering, once a prefix's utility is within ``truncation_tolerance * |U(D)|`` of
    :math:`U(D)` (the ordering's last prefix), the later marginal contributions count as zero.
    Here it saves no work (every prefix is evaluated in the one call) but lowers the variance the
    same way: the truncated contributions are mostly noise.

    Args:
        utility_of_masks: ``fn(masks [m, n]) -> [m]`` utilities of non-empty subsets.
        n: number of training examples.
        empty_utility: :math:`U(\\emptyset)`.
        num_permutations: sampled orderings (ignored when ``permutations`` is given).
        permutations: explicit orderings ``[T, n]`` (all ``n!`` of them give the exact values).
        permutations_per_call: orderings per call (default: about 4,096 subsets a call).
        truncation_tolerance: 0 (plain permutation sampling) or TMC's truncation (above).
    """
    _check_n(n)
    if not truncation_tolerance >= 0:
        raise ValueError(f"truncation_tolerance must be >= 0, got {truncation_tolerance}")
    start = time.perf_counter()
    if permutations is None:
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        rng = np.random.default_rng(seed)
        permutations = np.stack([rng.permutation(n) for _ in range(num_permutations)])
    permutations = np.asarray(permutations, dtype=np.int64)
    if permutations.ndim != 2 or permutations.shape[1] != n or not (np.sort(permutations, 1) == np.arange(n)).all():
        raise ValueError(f"permutations must be [T, {n}], each row a permutation of 0..{n - 1}")
    per_call = permutations_per_call or max(1, 4096 // n)
    contributions = np.zeros((len(permutations), n))
    tril = torch.tril(torch.ones(n, n, dtype=torch.bool))  # row k: the first k + 1 of an ordering
    for block in tqdm(range(0, len(permutations), per_call), desc=method, disable=not progress, leave=False):
        perms = torch.as_tensor(permutations[block : block + per_call])
        masks = torch.zeros(len(perms), n, n, dtype=torch.bool)
        masks.scatter_(2, perms[:, None, :].expand(-1, n, -1), tril.expand(len(perms), -1, -1))
        utilities = utility_of_masks(masks.reshape(-1, n)).reshape(len(perms), n).to(torch.float64).numpy()
        before = np.concatenate([np.full((len(perms), 1), empty_utility), utilities[:, :-1]], 1)  # U of the prefix before each position
        marginal = utilities - before
        if truncation_tolerance > 0:
            full = utilities[:, -1:]
            marginal[np.logical_or.accumulate(np.abs(full - before) < truncation_tolerance * np.abs(full), axis=1)] = 0.0
        rows = np.arange(len(perms))[:, None]
        contributions[block + rows, perms.numpy()] = marginal
    values = contributions.mean(0)
    errors = contributions.std(0, ddof=1) / math.sqrt(len(permutations)) if len(permutations) > 1 else np.full(n, np.nan)
    settings = {"num_permutations": int(len(permutations)), "seed": int(seed), "truncation_tolerance": float(truncation_tolerance)}
    return ValuationResult(values, errors, method, time.perf_counter() - start, settings)


def leave_one_out_values(utility_of_masks: UtilityOfMasks, n: int, method: str = "leave-one-out") -> ValuationResult:
    """:math:`U(D) - U(D \\setminus \\{i\\})` for every ``i`` (``n + 1`` subsets in one call)."""
    _check_n(n)
    if n < 2:
        raise ValueError("leave-one-out needs at least 2 examples (the rest would be empty)")
    start = time.perf_counter()
    masks = torch.cat([torch.ones(1, n, dtype=torch.bool), ~torch.eye(n, dtype=torch.bool)])
    u = utility_of_masks(masks).to(torch.float64).numpy()
    return ValuationResult(u[0] - u[1:], np.full(n, np.nan), method, time.perf_counter() - start, {})


def exact_shapley(utility_of_masks: UtilityOfMasks, n: int, empty_utility: float, max_n: int = 16) -> np.ndarray:
    """Shapley values by enumerating all :math:`2^n` subsets (a reference for small ``n``):
    :math:`\\phi_i = \\sum_{S \\not\\ni i} \\frac{|S|!\\,(n - |S| - 1)!}{n!} (U(S \\cup i) - U(S))`."""
    _check_n(n)
    if n > max_n:
        raise ValueError(f"exact Shapley enumerates 2^n subsets; n = {n} is above max_n = {max_n}")
    codes = np.arange(1, 2**n)
    masks = ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
    u = np.empty(2**n)
    u[0] = empty_utility
    u[1:] = utility_of_masks(torch.as_tensor(masks)).to(torch.float64).numpy()
    sizes = np.array([bin(c).count("1") for c in range(2**n)])
    values = np.zeros(n)
    for i in range(n):
        without = np.array([c for c in range(2**n) if not (c >> i) & 1])
        weight = np.array([math.factorial(s) * math.factorial(n - s - 1) for s in sizes[without]]) / math.factorial(n)
        values[i] = (weight * (u[without | (1 << i)] - u[without])).sum()
    return values


def all_permutations(n: int) -> np.ndarray:
    """All ``n!`` orderings of ``0..n-1`` (for exact Shapley through :func:`permutation_shapley`)."""
    from itertools import permutations

    return np.array(list(permutations(range(n))), dtype=np.int64)


def modelpred_shapley(
    modelpred: "ModelPred", x_test: Any, y_test: Any, num_permutations: int = 500, seed: int = 0, progress: bool = False,
    truncation_tolerance: float = 0.0,
) -> ValuationResult:
    """Permutation Shapley values with :math:`U(S) = -` test loss of ModelPred's predicted model;
    ``truncation_tolerance > 0``: TMC's truncation rule on the predicted utilities
    (:func:`permutation_shapley`), the estimator of TMC Shapley by retraining."""
    start = time.perf_counter()
    utility = HeldOutUtility(modelpred.target, x_test, y_test)
    method = "ModelPred Shapley" if truncation_tolerance == 0 else f"ModelPred TMC Shapley (tolerance {truncation_tolerance:g})"
    result = permutation_shapley(predicted_utility(modelpred, utility), modelpred.target.n, utility.empty(), num_permutations, seed, method=method,
                                 progress=progress, truncation_tolerance=truncation_tolerance)
    return dataclasses.replace(result, seconds=time.perf_counter() - start)


def modelpred_leave_one_out(modelpred: "ModelPred", x_test: Any, y_test: Any) -> ValuationResult:
    """Leave-one-out values with ModelPred's predicted models."""
    start = time.perf_counter()
    utility = HeldOutUtility(modelpred.target, x_test, y_test)
    result = leave_one_out_values(predicted_utility(modelpred, utility), modelpred.target.n, method="ModelPred leave-one-out")
    return dataclasses.replace(result, seconds=time.perf_counter() - start)


__all__ = [
    "ValuationResult", "permutation_shapley", "leave_one_out_values", "exact_shapley", "all_permutations",
    "modelpred_shapley", "modelpred_leave_one_out",
]
