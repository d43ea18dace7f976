"""Memorisation: how much a training example's own label depends on having trained on it.

.. math::  \\mathrm{mem}(i) = p_{\\theta(D)}(y_i \\mid x_i) - p_{\\theta(D \\setminus \\{i\\})}(y_i \\mid x_i)

(Feldman's leave-one-out memorisation, with one model instead of an average over training
runs, as the target's training is deterministic). With ModelPred, all ``n + 1`` models are
predicted in one call; ``method="exact"`` solves them instead (the reference).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_tda.modelpred.modelpred import ModelPred


@dataclasses.dataclass(frozen=True)
class MemorizationResult(AnalysisResult):
    """Per training example: own-label probability with and without it, and their difference.

    Attributes:
        scores: ``[n]`` memorisation (high: the label is learnt from the example itself).
        probability_with, probability_without: ``[n]`` own-label probabilities.
        labels: ``[n]`` the training labels.
        method: "ModelPred" or "exact".
        seconds: wall time.
    """

    scores: np.ndarray
    probability_with: np.ndarray
    probability_without: np.ndarray
    labels: np.ndarray
    method: str
    seconds: float

    def top(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` most memorised examples."""
        return np.argsort(-self.scores, kind="stable")[:k]

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "example": np.arange(len(self.scores)), "label": self.labels, "memorization": self.scores,
            "probability_with": self.probability_with, "probability_without": self.probability_without,
        }).sort_values("memorization", ascending=False, kind="stable")

    def summary(self) -> dict[str, float]:
        return {"memorization_mean": float(self.scores.mean()), "memorization_max": float(self.scores.max()), "seconds": self.seconds}

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        ax.hist(self.scores, bins=40, color="tab:purple", alpha=0.8)
        ax.set_xlabel("memorisation: own-label probability with minus without the example")
        ax.set_ylabel("training examples")
        ax.set_title(f"Memorisation ({self.method})")
        return fig, ax


def memorization(modelpred: "ModelPred", method: str = "modelpred") -> MemorizationResult:
    """Memorisation of every training example (see the module docstring);
    ``method`` is "modelpred" (predicted models) or "exact" (solved models)."""
    if method not in ("modelpred", "exact"):
        raise ValueError(f"method must be 'modelpred' or 'exact', got {method!r}")
    start = time.perf_counter()
    target = modelpred.target
    n = target.n
    if n < 2:
        raise ValueError("memorisation needs at least 2 training examples")
    masks = torch.cat([torch.ones(1, n, dtype=torch.bool), ~torch.eye(n, dtype=torch.bool)])
    thetas = modelpred.predict_params(masks).to(torch.float64) if method == "modelpred" else modelpred.solve(masks)
    full = torch.softmax(target.logits(thetas[0], target.x), -1)  # [n, K]
    idx = torch.arange(n)
    with_i = full[idx, target.y]
    # model without i, evaluated on example i only: scores of row i under theta_{-i}
    rows = target.logits(thetas[1:], target.x)[idx, idx]  # [n, K]
    without_i = torch.softmax(rows, -1)[idx, target.y]
    return MemorizationResult(
        (with_i - without_i).numpy(), with_i.numpy(), without_i.numpy(), target.y.numpy(),
        "ModelPred" if method == "modelpred" else "exact", time.perf_counter() - start,
    )


__all__ = ["MemorizationResult", "memorization"]
