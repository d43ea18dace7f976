"""Data selection: greedily grow a subset of a given size by ModelPred's predicted utility.

At each step every remaining candidate is added in turn, all candidate subsets are predicted in
one call, and the one with the highest predicted validation utility is kept:

.. math::  S_{t+1} = S_t \\cup \\{\\arg\\max_{j \\notin S_t} U_{\\text{val}}(\\hat\\theta(S_t \\cup \\{j\\}))\\}.

The selected prefixes are then retrained exactly and scored on a separate test set, against
random subsets of the same sizes (also retrained exactly).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_tda.modelpred.utility import HeldOutUtility
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_tda.modelpred.modelpred import ModelPred


@dataclasses.dataclass(frozen=True)
class SelectionResult(AnalysisResult):
    """Greedy selection and its check.

    Attributes:
        selected: ``[k]`` chosen examples in the order they were added.
        predicted_utilities: ``[k]`` predicted validation utility after each addition.
        sizes: ``[c]`` checkpoint sizes at which both selections were retrained.
        greedy_test_utility, random_test_utility: ``[c]`` exact test utility of the greedy
            prefix and the mean over random subsets of that size.
        greedy_test_accuracy, random_test_accuracy: ``[c]`` the same for accuracy.
        seconds: wall time of the greedy selection itself.
    """

    selected: np.ndarray
    predicted_utilities: np.ndarray
    sizes: np.ndarray
    greedy_test_utility: np.ndarray
    random_test_utility: np.ndarray
    greedy_test_accuracy: np.ndarray
    random_test_accuracy: np.ndarray
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "size": self.sizes, "greedy_test_utility": self.greedy_test_utility, "random_test_utility": self.random_test_utility,
            "greedy_test_accuracy": self.greedy_test_accuracy, "random_test_accuracy": self.random_test_accuracy,
        })

    def summary(self) -> dict[str, float]:
        return {
            "greedy_test_accuracy": float(self.greedy_test_accuracy[-1]), "random_test_accuracy": float(self.random_test_accuracy[-1]),
            "greedy_test_utility": float(self.greedy_test_utility[-1]), "random_test_utility": float(self.random_test_utility[-1]),
            "seconds": self.seconds,
        }

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        ax.plot(self.sizes, self.greedy_test_accuracy, marker="o", label="greedy by ModelPred (retrained)")
        ax.plot(self.sizes, self.random_test_accuracy, marker="s", label="random subsets (retrained)")
        ax.set_xlabel("subset size")
        ax.set_ylabel("test accuracy")
        ax.set_title("Data selection")
        ax.legend(fontsize=8)
        return fig, ax


def greedy_selection(
    modelpred: "ModelPred",
    x_val: Any,
    y_val: Any,
    size: int,
    x_test: Any,
    y_test: Any,
    num_checkpoints: int = 8,
    num_random: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> SelectionResult:
    """Greedy selection of ``size`` examples by predicted utility on ``(x_val, y_val)``, checked
    by exact retraining on ``(x_test, y_test)`` against ``num_random`` random subsets."""
    target = modelpred.target
    n = target.n
    if not 1 <= size <= n:
        raise ValueError(f"size must be in [1, {n}], got {size}")
    if num_checkpoints < 1 or num_random < 1:
        raise ValueError("num_checkpoints and num_random must be >= 1")
    val = HeldOutUtility(target, x_val, y_val)
    test = HeldOutUtility(target, x_test, y_test)
    start = time.perf_counter()
    chosen = torch.zeros(n, dtype=torch.bool)
    selected: list[int] = []
    utilities: list[float] = []
    eye = torch.eye(n, dtype=torch.bool)
    for _ in tqdm(range(size), desc="greedy selection", disable=not progress, leave=False):
        candidates = (~chosen).nonzero().flatten()
        masks = chosen[None] | eye[candidates]
        u = val(modelpred.predict_params(masks))
        best = int(torch.argmax(u))
        chosen[candidates[best]] = True
        selected.append(int(candidates[best]))
        utilities.append(float(u[best]))
    seconds = time.perf_counter() - start
    sizes = np.unique(np.linspace(1, size, num_checkpoints).round().astype(int))
    order = np.array(selected)
    greedy_masks = np.zeros((len(sizes), n), dtype=bool)
    for j, s in enumerate(sizes):
        greedy_masks[j, order[:s]] = True
    rng = np.random.default_rng(seed)
    random_masks = np.zeros((len(sizes), num_random, n), dtype=bool)
    for j, s in enumerate(sizes):
        for r in range(num_random):
            random_masks[j, r, rng.choice(n, size=s, replace=False)] = True
    greedy_theta = target.solve(greedy_masks)
    random_theta = target.solve(random_masks.reshape(-1, n))
    shape = (len(sizes), num_random)
    settings: dict[str, Sequence[int] | int] = {"size": size, "num_random": num_random, "seed": seed}
    return SelectionResult(
        order, np.array(utilities), sizes,
        test(greedy_theta).numpy(), test(random_theta).numpy().reshape(shape).mean(1),
        test.accuracy(greedy_theta).numpy(), test.accuracy(random_theta).numpy().reshape(shape).mean(1),
        seconds, dict(settings),
    )


__all__ = ["SelectionResult", "greedy_selection"]
