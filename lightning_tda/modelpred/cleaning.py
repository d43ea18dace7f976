"""Cleaning: flip a known fraction of training labels and see how many the lowest values find.

The values of the noisy training set are computed by each method; the ``k`` lowest-valued
examples, ``k`` the number of flipped labels, are inspected. Precision at the flip rate is the
share of them that were flipped; with ``k`` equal to the number flipped, recall at the flip rate
is the same number (every method inspects as many as were flipped).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lightning_tda.modelpred.targets import as_features, as_labels, make_target
from lightning_tda.modelpred.utility import HeldOutUtility, exact_utility, sklearn_utility
from lightning_tda.modelpred.valuation import ValuationResult, leave_one_out_values, modelpred_leave_one_out, modelpred_shapley
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ALL_METHODS = ("modelpred_shapley", "modelpred_shapley_tmc_budget", "modelpred_leave_one_out", "leave_one_out", "tmc_shapley", "knn_shapley", "data_oob", "data_oob_target", "influence")


def flip_labels(y: Any, fraction: float, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Give ``round(fraction n)`` random examples a uniformly random *other* label;
    returns ``(noisy labels, flipped mask)``."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = as_labels(y).numpy().copy()
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    chosen = rng.choice(len(labels), size=max(1, int(round(fraction * len(labels)))), replace=False)
    flipped[chosen] = True
    labels[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return labels, flipped


def precision_at_flip_rate(values: np.ndarray, flipped: np.ndarray) -> float:
    """Share of flipped examples among the ``flipped.sum()`` lowest values."""
    k = int(flipped.sum())
    return float(flipped[np.argsort(values, kind="stable")[:k]].mean())


@dataclasses.dataclass(frozen=True)
class CleaningResult(AnalysisResult):
    """Per method: values of the noisy set, flipped examples found, wall time.

    Attributes:
        methods: method names ``[M]``.
        values: ``[M, n]`` values (low: likely mislabelled).
        flipped: ``[n]`` which labels were flipped.
        found: ``[M]`` flipped examples among the ``flipped.sum()`` lowest values.
        seconds: ``[M]`` wall time of each method (ModelPred's includes fitting it, once:
            ``settings["modelpred_fit_seconds"]``).
    """

    methods: tuple[str, ...]
    values: np.ndarray
    flipped: np.ndarray
    found: np.ndarray
    seconds: np.ndarray
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def precision(self) -> np.ndarray:
        """Precision at the flip rate ``[M]`` (equal to recall at the flip rate)."""
        return self.found / max(1, int(self.flipped.sum()))

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "method": list(self.methods), "precision_at_flip_rate": self.precision, "recall_at_flip_rate": self.precision,
            "flipped_found": self.found, "num_flipped": int(self.flipped.sum()), "seconds": self.seconds,
        })

    def summary(self) -> dict[str, float]:
        out = {"num_flipped": float(self.flipped.sum())}
        for method, p in zip(self.methods, self.precision):
            out[f"{method.replace(' ', '_')}/precision_at_flip_rate"] = float(p)
        return out

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 4.5)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        n, k = len(self.flipped), int(self.flipped.sum())
        inspected = np.arange(1, n + 1) / n
        for method, values in zip(self.methods, self.values):
            found = np.cumsum(self.flipped[np.argsort(values, kind="stable")]) / max(k, 1)
            ax.plot(inspected, found, lw=1.4, label=method)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="random")
        ax.axvline(k / n, color="grey", lw=0.8)
        ax.set_xlabel("fraction of training data inspected (lowest values first)")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(f"Cleaning: {k} of {n} labels flipped")
        ax.legend(fontsize=7, loc="lower right")
        return fig, ax


def cleaning_study(
    x: Any,
    y: Any,
    x_test: Any,
    y_test: Any,
    flip_fraction: float = 0.1,
    target: str = "logistic",
    methods: Sequence[str] = ALL_METHODS,
    num_classes: int | None = None,
    C: float = 1.0,
    shapley_permutations: int = 500,
    tmc_permutations: int = 50,
    tmc_truncation: float = 0.01,
    knn_k: int = 5,
    oob_models: int = 1000,
    seed: int = 0,
    modelpred_settings: dict[str, Any] | None = None,
    progress: bool = False,
) -> CleaningResult:
    """Flip ``flip_fraction`` of the labels of ``(x, y)``, value the noisy set with each of
    ``methods`` (any of :data:`ALL_METHODS`) and count the flipped labels the lowest values find.

    ModelPred is fitted on the noisy set once (each ModelPred method's time includes the fit);
    ``modelpred_shapley`` uses ``shapley_permutations``, ``modelpred_shapley_tmc_budget`` TMC's
    ``tmc_permutations`` (the two Shapley estimates at the same Monte-Carlo budget, so their
    precision and time compare directly); leave-one-out and TMC Shapley retrain with
    scikit-learn; Data-OOB bags decision trees (``data_oob``) or the target
    (``data_oob_target``); the influence function uses the exact Hessian.
    """
    from lightning_tda.modelpred.baselines import data_oob, influence_values, knn_shapley, tmc_shapley
    from lightning_tda.modelpred.modelpred import ModelPred

    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty selection of {ALL_METHODS}; unknown: {unknown}")
    xt = as_features(x)
    yt = as_labels(y, len(xt))
    k = num_classes or max(2, int(yt.max()) + 1, int(as_labels(y_test).max()) + 1)
    noisy, flipped = flip_labels(yt, flip_fraction, k, seed)
    tgt = make_target(target, xt, noisy, num_classes=k, C=C)
    utility = HeldOutUtility(tgt, x_test, y_test)
    results: list[ValuationResult] = []
    fit_seconds = float("nan")
    modelpred = None
    for method in methods:
        start = time.perf_counter()
        extra = 0.0  # ModelPred's fit, counted in each ModelPred method's time
        if method.startswith("modelpred"):
            if modelpred is None:
                modelpred = ModelPred.fit(xt, noisy, target=target, seed=seed, progress=progress, num_classes=k, C=C, **(modelpred_settings or {}))
                fit_seconds = time.perf_counter() - start
            else:
                extra = fit_seconds
            if method == "modelpred_shapley":
                result = modelpred_shapley(modelpred, utility.x, utility.y, shapley_permutations, seed, progress)
            elif method == "modelpred_shapley_tmc_budget":
                result = modelpred_shapley(modelpred, utility.x, utility.y, tmc_permutations, seed, progress)
                result = dataclasses.replace(result, method=f"ModelPred Shapley at TMC's budget ({tmc_permutations} permutations)")
            else:
                result = modelpred_leave_one_out(modelpred, utility.x, utility.y)
        elif method == "leave_one_out":
            result = leave_one_out_values(sklearn_utility(tgt, utility), tgt.n, method="leave-one-out (retraining)")
        elif method == "tmc_shapley":
            full = float(exact_utility(tgt, utility)(np.ones((1, tgt.n), dtype=bool))[0])
            result = tmc_shapley(sklearn_utility(tgt, utility), tgt.n, utility.empty(), full, tmc_permutations, tmc_truncation, seed, progress)
        elif method == "knn_shapley":
            result = knn_shapley(xt, noisy, utility.x, utility.y, knn_k)
        elif method == "data_oob":
            result = data_oob(xt, noisy, oob_models, "tree", seed=seed, progress=progress)
        elif method == "data_oob_target":
            result = data_oob(xt, noisy, max(2, oob_models // 5), "target", target=tgt, seed=seed, progress=progress)
        else:
            result = influence_values(tgt, utility.x, utility.y)
        results.append(dataclasses.replace(result, seconds=time.perf_counter() - start + extra))
    values = np.stack([r.values for r in results])
    found = np.array([int(flipped[np.argsort(v, kind="stable")[: int(flipped.sum())]].sum()) for v in values])
    settings = {
        "flip_fraction": flip_fraction, "target": target, "n": tgt.n, "num_classes": k, "seed": seed,
        "shapley_permutations": shapley_permutations, "tmc_permutations": tmc_permutations, "tmc_truncation": tmc_truncation,
        "knn_k": knn_k, "oob_models": oob_models, "modelpred_fit_seconds": fit_seconds,
    }
    return CleaningResult(tuple(r.method for r in results), values, flipped, found, np.array([r.seconds for r in results]), settings)


__all__ = ["CleaningResult", "cleaning_study", "flip_labels", "precision_at_flip_rate", "ALL_METHODS"]
