"""Deletion and addition: the model after removing or adding a set of training points, by
ModelPred, by the closed-form influence function, and by retraining.

From a base subset :math:`B` (solution :math:`\\theta_B`) to a new subset :math:`S`, the influence
function takes one Newton step with the base Hessian:

.. math::  \\theta_S \\approx \\theta_B - H_B^{-1}\\, C \\sum_i (w^S_i - w^B_i)\\, \\nabla \\ell_i(\\theta_B)

(deletion of :math:`R`: :math:`+H^{-1} C \\sum_{i \\in R} \\nabla \\ell_i`). ModelPred predicts
:math:`\\theta_S` directly; retraining solves it exactly (the reference). Errors are relative
parameter errors :math:`\\|\\theta - \\theta_S^*\\| / \\|\\theta_S^*\\|`; the "no update" row keeps
:math:`\\theta_B` and shows how far the change moved the model, and "scikit-learn refit" shows
retraining's own error at scikit-learn's default tolerance.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tda.modelpred.utility import HeldOutUtility, sklearn_fit
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_tda.modelpred.modelpred import ModelPred
    from lightning_tda.modelpred.targets import Target

METHODS = ("ModelPred", "influence function", "no update", "scikit-learn refit")


def influence_update(target: "Target", base: Tensor, new: Tensor) -> Tensor:
    """The influence function's estimate ``[m, P]`` of the solutions of subsets ``new [m, n]``
    from the exact solutions of ``base [m, n]`` (one Newton step with the base Hessian)."""
    base_w = target.check_weights(base)
    new_w = target.check_weights(new)
    theta = target.solve(base_w)
    out = torch.empty_like(theta)
    for j in range(len(theta)):
        hessian = target.hessian(theta[j : j + 1], base_w[j : j + 1])[0]
        change = target.C * ((new_w[j] - base_w[j]) @ target.loss_gradients(theta[j]))
        out[j] = theta[j] - torch.linalg.solve(hessian, change)
    return out


def _relative(theta: Tensor, reference: Tensor) -> np.ndarray:
    return ((theta.to(torch.float64) - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)).numpy()


@dataclasses.dataclass(frozen=True)
class CounterfactualResult(AnalysisResult):
    """Relative parameter errors ``errors[method][fraction, trial]`` against exact retraining.

    Attributes:
        mode: "deletion" or "addition".
        fractions: fraction of the pool removed (or added) ``[F]``.
        methods: names of the rows of ``errors``.
        errors: ``[M, F, trials]`` relative parameter errors.
        accuracy_gaps: ``[M, F, trials]`` absolute test-accuracy differences to retraining (NaN
            without a test set).
        seconds: ``[M]`` wall time of each method over all trials.
    """

    mode: str
    fractions: np.ndarray
    methods: tuple[str, ...]
    errors: np.ndarray
    accuracy_gaps: np.ndarray
    seconds: np.ndarray
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = []
        for m, method in enumerate(self.methods):
            for f, fraction in enumerate(self.fractions):
                rows.append({
                    "method": method, "fraction": float(fraction),
                    "relative_error_mean": float(self.errors[m, f].mean()), "relative_error_std": float(self.errors[m, f].std()),
                    "accuracy_gap_mean": float(np.mean(self.accuracy_gaps[m, f])), "seconds": float(self.seconds[m]),
                })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        out = {}
        for m, method in enumerate(self.methods):
            key = method.replace(" ", "_").replace("-", "_")
            out[f"{key}/relative_error"] = float(self.errors[m].mean())
        return out

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        for m, method in enumerate(self.methods):  # bars: the trials' 16th-84th percentiles (stay positive on a log axis)
            mean = self.errors[m].mean(1)
            low, high = np.percentile(self.errors[m], [16, 84], axis=1)
            bars = np.stack([np.clip(mean - low, 0, None), np.clip(high - mean, 0, None)])
            ax.errorbar(100 * self.fractions, mean, yerr=bars, marker="o", capsize=3, label=method)
        ax.set_yscale("log")
        ax.set_xlabel(f"% of training data {'removed' if self.mode == 'deletion' else 'added'}")
        ax.set_ylabel("relative parameter error vs retraining")
        ax.set_title(f"{self.mode.capitalize()}: predicted vs retrained models")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig, ax


def counterfactual_study(
    modelpred: "ModelPred",
    mode: str = "deletion",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    num_trials: int = 8,
    base_fraction: float = 0.5,
    x_test: Any = None,
    y_test: Any = None,
    include_sklearn: bool = True,
    seed: int = 0,
) -> CounterfactualResult:
    """Remove (``mode="deletion"``, from the whole pool) or add (``mode="addition"``, to a random
    base of ``base_fraction`` of the pool) random sets of each fraction of the pool, and compare
    ModelPred, the influence function, no update and scikit-learn's refit with exact retraining."""
    if mode not in ("deletion", "addition"):
        raise ValueError(f"mode must be 'deletion' or 'addition', got {mode!r}")
    fractions_np = np.asarray(fractions, dtype=np.float64)
    if num_trials < 1 or fractions_np.size == 0 or (fractions_np <= 0).any() or (fractions_np >= 1).any():
        raise ValueError("fractions must be in (0, 1) and num_trials >= 1")
    if mode == "addition" and (not 0 < base_fraction < 1 or (fractions_np > 1 - base_fraction + 1e-9).any()):
        raise ValueError(f"addition needs 0 < base_fraction < 1 and every fraction <= 1 - base_fraction ({1 - base_fraction})")
    target = modelpred.target
    n = target.n
    rng = np.random.default_rng(seed)
    base = np.zeros((len(fractions_np), num_trials, n), dtype=bool)
    new = np.zeros_like(base)
    for f, fraction in enumerate(fractions_np):
        for t in range(num_trials):
            order = rng.permutation(n)
            k = max(1, int(round(fraction * n)))
            if mode == "deletion":
                base[f, t] = True
                new[f, t] = True
                new[f, t, order[:k]] = False
            else:
                b = max(1, int(round(base_fraction * n)))
                base[f, t, order[:b]] = True
                new[f, t, order[: b + k]] = True
    base_t, new_t = torch.as_tensor(base.reshape(-1, n)), torch.as_tensor(new.reshape(-1, n))
    exact = target.solve(new_t)
    seconds = np.zeros(len(METHODS))
    estimates = []
    start = time.perf_counter()
    estimates.append(modelpred.predict_params(new_t).to(torch.float64))
    seconds[0] = time.perf_counter() - start
    start = time.perf_counter()
    estimates.append(influence_update(target, base_t, new_t))
    seconds[1] = time.perf_counter() - start
    start = time.perf_counter()
    estimates.append(target.solve(base_t))
    seconds[2] = time.perf_counter() - start
    methods = list(METHODS[:3])
    if include_sklearn:
        start = time.perf_counter()
        estimates.append(torch.stack([sklearn_fit(target, m) for m in new_t.numpy()]))
        seconds[3] = time.perf_counter() - start
        methods.append(METHODS[3])
    shape = (len(fractions_np), num_trials)
    errors = np.stack([_relative(e, exact).reshape(shape) for e in estimates])
    gaps = np.full_like(errors, np.nan)
    if x_test is not None:
        utility = HeldOutUtility(target, x_test, y_test)
        truth = utility.accuracy(exact).numpy()
        gaps = np.stack([np.abs(utility.accuracy(e).numpy() - truth).reshape(shape) for e in estimates])
    settings = {"num_trials": num_trials, "base_fraction": base_fraction if mode == "addition" else 1.0, "seed": seed, "n": n, "target": target.name}
    return CounterfactualResult(mode, fractions_np, tuple(methods), errors, gaps, seconds[: len(methods)], settings)


@dataclasses.dataclass(frozen=True)
class PredictionAccuracyResult(AnalysisResult):
    """How well predicted models match exactly solved ones on held-out subsets.

    Attributes:
        sizes: ``[m]`` subset sizes.
        relative_errors: ``[m]`` :math:`\\|\\hat\\theta - \\theta^*\\| / \\|\\theta^*\\|`.
        accuracy_predicted, accuracy_exact: ``[m]`` test accuracies of both models.
        label: what was evaluated (e.g. the ablation variant).
    """

    sizes: np.ndarray
    relative_errors: np.ndarray
    accuracy_predicted: np.ndarray
    accuracy_exact: np.ndarray
    label: str = "ModelPred"
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        gap = np.abs(self.accuracy_predicted - self.accuracy_exact)
        return {
            "relative_error_mean": float(self.relative_errors.mean()),
            "relative_error_median": float(np.median(self.relative_errors)),
            "accuracy_gap_mean": float(gap.mean()),
            "accuracy_exact_mean": float(self.accuracy_exact.mean()),
            "accuracy_predicted_mean": float(self.accuracy_predicted.mean()),
        }

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "size": self.sizes, "relative_error": self.relative_errors,
            "accuracy_predicted": self.accuracy_predicted, "accuracy_exact": self.accuracy_exact,
        })

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        ax.scatter(self.sizes, self.relative_errors, s=10, alpha=0.6, label=self.label)
        ax.set_yscale("log")
        ax.set_xlabel("subset size")
        ax.set_ylabel("relative parameter error")
        s = self.summary()
        ax.set_title(f"{self.label}: mean error {s['relative_error_mean']:.3f}, accuracy gap {s['accuracy_gap_mean']:.3f}")
        return fig, ax


def prediction_accuracy(modelpred: "ModelPred", masks: Any, x_test: Any, y_test: Any, thetas: Tensor | None = None, label: str = "ModelPred") -> PredictionAccuracyResult:
    """Compare predicted with exactly solved models on subsets ``masks`` (held out from training);
    ``thetas`` are their exact solutions when already known."""
    weights = modelpred.check_masks(masks)
    exact = modelpred.solve(weights) if thetas is None else torch.as_tensor(thetas, dtype=torch.float64)
    predicted = modelpred.predict_params(weights).to(torch.float64)
    utility = HeldOutUtility(modelpred.target, x_test, y_test)
    return PredictionAccuracyResult(
        weights.sum(1).numpy(), _relative(predicted, exact), utility.accuracy(predicted).numpy(), utility.accuracy(exact).numpy(), label,
    )


__all__ = ["CounterfactualResult", "PredictionAccuracyResult", "counterfactual_study", "influence_update", "prediction_accuracy"]
