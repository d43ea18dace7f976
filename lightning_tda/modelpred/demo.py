"""The ModelPred demo: data values and label cleaning on a digits subset, end to end.

:func:`run_demo` is what ``lightning-tda demo`` calls: it flips 10% of the labels of a digits
subset, fits ModelPred on the noisy subset, computes ModelPred Shapley values, and reports how
many flipped labels the lowest values find (with KNN-Shapley and the influence function beside
it, both cheap). ``fast=True`` takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_tda.modelpred.cleaning import CleaningResult, cleaning_study
from lightning_tda.modelpred.valuation import ValuationResult, modelpred_shapley


def digits_split(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded split of scikit-learn's digits: pixels scaled to [0, 1] (64 features)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n_train < 1 or n_test < 1 or n_train + n_test > len(digits.target):
        raise ValueError(f"need n_train, n_test >= 1 and n_train + n_test <= {len(digits.target)}")
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x, y = digits.data[order] / 16.0, digits.target[order]
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


FAST_SETTINGS: dict[str, Any] = {
    "num_permutations": 8, "prefixes_per_permutation": 16, "num_random_subsets": 256,
    "num_validation_subsets": 64, "max_epochs": 40, "patience": 8, "pooling": "sum",
}


def run_demo(
    fast: bool = True,
    seed: int = 0,
    progress: bool = False,
    n_train: int | None = None,
    settings: dict[str, Any] | None = None,
    permutations: int | None = None,
) -> tuple[ValuationResult, CleaningResult]:
    """ModelPred values of a digits subset with 10% flipped labels, and the cleaning result.

    Returns ``(values, cleaning)``: ModelPred Shapley values of the noisy subset, and the flipped
    labels found by ModelPred Shapley, KNN-Shapley and the influence function; both results have
    ``log(reporter, prefix)``. ``fast``: 150 training digits and small settings (well under a
    minute on 2 cores); otherwise 400 digits and the defaults (a few minutes). ``n_train``,
    ``settings`` (ModelPred settings) and ``permutations`` (of the Shapley values) override either.
    """
    n_train = n_train if n_train is not None else (150 if fast else 400)
    x, y, x_test, y_test = digits_split(n_train, 300, seed)
    settings = settings if settings is not None else (FAST_SETTINGS if fast else {})
    cleaning = cleaning_study(
        x, y, x_test, y_test, flip_fraction=0.1, methods=("modelpred_shapley", "knn_shapley", "influence"),
        num_classes=10, shapley_permutations=permutations or (200 if fast else 500), seed=seed, modelpred_settings=settings, progress=progress,
    )
    m = cleaning.methods.index("ModelPred Shapley")
    values = ValuationResult(cleaning.values[m], np.full(n_train, np.nan), "ModelPred Shapley (noisy digits)", float(cleaning.seconds[m]), dict(cleaning.settings))
    return values, cleaning


__all__ = ["run_demo", "digits_split", "modelpred_shapley"]
