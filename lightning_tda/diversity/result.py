"""``DiversityResult``: the pairwise diversity of a family of models, with its tables and plots."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lightning_tda.diversity.categories import SAME, category_intervals, pair_category
from lightning_tda.diversity.functional import PAIRWISE_METRICS
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DiversityResult", "category_colors"]

CATEGORY_METRICS = (
    "error_inconsistency",
    "ensemble_gain_mean",
    "ensemble_gain_best",
    "error_consistency",
    "disagreement",
    "conversion_rate",
    "ensemble_accuracy",
)
"""The metrics the per-category table summarises (mean and interval over pairs)."""


def category_colors(categories: list[str], order: tuple[str, ...]) -> dict[str, Any]:
    """One colour per category, fixed by its place in ``order`` (so figures agree)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    known = list(order) + [SAME]
    extra = sorted(set(categories) - set(known))
    return {c: palette[i % len(palette)] for i, c in enumerate(known + extra)}


def _figure(ax: "Axes | None", size: tuple[float, float]) -> tuple["Figure", "Axes"]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.add_subplot(1, 1, 1)


@dataclasses.dataclass(frozen=True)
class DiversityResult(AnalysisResult):
    """Pairwise diversity of M models on one evaluation split (after temperature scaling).

    Matrices are ``[M, M]`` (symmetric; the diagonal compares a model with itself); per-model
    arrays ``[M]``; ``predictions`` and ``correct_class_probability`` ``[M, n]`` on the
    evaluation split, ``target`` ``[n]``. ``nll_*`` are on the evaluation split, before and
    after temperature scaling (fitted on a held-out split of ``n_held_out`` examples).
    """

    names: tuple[str, ...]
    descriptions: tuple[dict, ...]
    category_order: tuple[str, ...]
    combine: str
    temperature_scaling: bool
    n_held_out: int
    accuracy: np.ndarray
    temperatures: np.ndarray
    nll_before: np.ndarray
    nll_after: np.ndarray
    held_out_nll_before: np.ndarray
    held_out_nll_after: np.ndarray
    error_inconsistency: np.ndarray
    error_consistency: np.ndarray
    error_correlation: np.ndarray
    disagreement: np.ndarray
    ensemble_accuracy: np.ndarray
    ensemble_gain_mean: np.ndarray
    ensemble_gain_best: np.ndarray
    conversion_rate: np.ndarray
    predictions: np.ndarray
    correct_class_probability: np.ndarray
    target: np.ndarray
    confidence_level: float = 0.95
    anchors: tuple[str, ...] = ()

    # ------------------------------------------------------------------ structure
    @property
    def num_models(self) -> int:
        return len(self.names)

    def pairs(self) -> list[tuple[int, int]]:
        """Every unordered pair ``(i, j)``, ``i < j``, in row order."""
        M = self.num_models
        return [(i, j) for i in range(M) for j in range(i + 1, M)]

    def pair_categories(self) -> list[str]:
        """The category of each pair of :meth:`pairs` (its most divergent differing factor)."""
        return [pair_category(self.descriptions[i], self.descriptions[j], self.category_order) for i, j in self.pairs()]

    # ------------------------------------------------------------------ tables
    def to_frame(self) -> "pd.DataFrame":
        """One row per pair: names, category, accuracies and every pairwise metric."""
        import pandas as pd

        rows = []
        for (i, j), category in zip(self.pairs(), self.pair_categories()):
            row = {
                "model_a": self.names[i],
                "model_b": self.names[j],
                "category": category,
                "accuracy_a": float(self.accuracy[i]),
                "accuracy_b": float(self.accuracy[j]),
            }
            row.update({name: float(getattr(self, name)[i, j]) for name in PAIRWISE_METRICS})
            rows.append(row)
        return pd.DataFrame(rows)

    def category_frame(self, level: float | None = None, anchors: Sequence[str] | None = None) -> "pd.DataFrame":
        """Per category (least to most divergent): pairs, and the mean and a Student-t interval
        over pairs of each metric of :data:`CATEGORY_METRICS` and of the pair's mean accuracy.

        ``anchors``: only the pairs that include one of these models (base models: each other
        model then differs from its base by one factor group)."""
        import pandas as pd

        frame = self.to_frame()
        if anchors:
            unknown = sorted(set(anchors) - set(self.names))
            if unknown:
                raise ValueError(f"anchors {unknown} are not model names")
            frame = frame[frame["model_a"].isin(anchors) | frame["model_b"].isin(anchors)]
        values = {name: frame[name].to_numpy() for name in CATEGORY_METRICS}
        values["member_accuracy"] = ((frame["accuracy_a"] + frame["accuracy_b"]) / 2).to_numpy()
        rows = category_intervals(
            frame["category"].tolist(), values, self.category_order, level or self.confidence_level
        )
        return pd.DataFrame(rows)

    def members_frame(self) -> "pd.DataFrame":
        """One row per model: its description, accuracy, temperature and NLL before/after."""
        import pandas as pd

        rows = []
        for m, name in enumerate(self.names):
            row: dict[str, Any] = {"model": name}
            row.update({k: str(v) for k, v in self.descriptions[m].items()})
            row.update(
                accuracy=float(self.accuracy[m]),
                temperature=float(self.temperatures[m]),
                nll_before=float(self.nll_before[m]),
                nll_after=float(self.nll_after[m]),
                held_out_nll_before=float(self.held_out_nll_before[m]),
                held_out_nll_after=float(self.held_out_nll_after[m]),
            )
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Mean/best member accuracy, the best pair's ensemble accuracy, mean error
        inconsistency and gains over all pairs, and per category."""
        frame = self.to_frame()
        out = {
            "mean_accuracy": float(np.mean(self.accuracy)),
            "best_accuracy": float(np.max(self.accuracy)),
            "best_pair_ensemble_accuracy": float(frame["ensemble_accuracy"].max()) if len(frame) else math.nan,
            "mean_error_inconsistency": float(frame["error_inconsistency"].mean()) if len(frame) else math.nan,
            "mean_ensemble_gain_mean": float(frame["ensemble_gain_mean"].mean()) if len(frame) else math.nan,
            "mean_ensemble_gain_best": float(frame["ensemble_gain_best"].mean()) if len(frame) else math.nan,
        }
        for key, anchors in (("", None), ("anchored/", self.anchors)):
            if key and not anchors:
                continue
            for row in self.category_frame(anchors=anchors).to_dict("records"):
                for name in ("error_inconsistency", "ensemble_gain_mean"):
                    out[f"{key}{name}/{row['category']}"] = row[f"{name}_mean"]
        return out

    # ------------------------------------------------------------------ figures
    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Error inconsistency against ensemble gain (over the members' mean), one point per
        pair, coloured by category."""
        fig, ax = _figure(ax, (6.0, 4.5))
        frame = self.to_frame()
        colors = category_colors(frame["category"].tolist(), self.category_order)
        for row in self.category_frame().to_dict("records"):
            sub = frame[frame["category"] == row["category"]]
            ax.scatter(
                sub["error_inconsistency"], 100 * sub["ensemble_gain_mean"], s=28, alpha=0.8,
                color=colors[row["category"]], label=f"{row['category']} ({len(sub)} pair{'s' if len(sub) != 1 else ''})", edgecolors="none",
            )
        ax.axhline(0, color="0.6", lw=0.8, zorder=0)
        ax.set_xlabel("error inconsistency (fraction of examples exactly one model gets right)")
        ax.set_ylabel("ensemble gain over the members' mean (points)")
        ax.set_title(f"Pairs of {self.num_models} models: divergence against ensemble gain")
        ax.legend(fontsize=8, title="pair differs by", title_fontsize=8, loc="best")
        return fig, ax

    def plot_heatmap(self, metric: str = "error_inconsistency", ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """The ``[M, M]`` matrix of ``metric`` with model names on both axes."""
        if metric not in PAIRWISE_METRICS:
            raise ValueError(f"metric must be one of {PAIRWISE_METRICS}, got {metric!r}")
        M = self.num_models
        size = min(4.0 + 0.35 * M, 14.0)
        fig, ax = _figure(ax, (size + 1.2, size))
        matrix = np.array(getattr(self, metric), dtype=np.float64)
        shown = matrix.copy()
        np.fill_diagonal(shown, np.nan)  # a model against itself says nothing
        image = ax.imshow(shown, cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=metric.replace("_", " "))
        fontsize = 8 if M <= 16 else 6
        ax.set_xticks(range(M), labels=self.names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(M), labels=self.names, fontsize=fontsize)
        if M <= 10:
            finite = shown[np.isfinite(shown)]
            middle = float(np.median(finite)) if finite.size else 0.0
            for i in range(M):
                for j in range(M):
                    if i != j and np.isfinite(shown[i, j]):
                        ax.text(j, i, f"{shown[i, j]:.3f}", ha="center", va="center", fontsize=7,
                                color="black" if shown[i, j] > middle else "white")
        ax.set_title(f"{metric.replace('_', ' ')} of every pair")
        return fig, ax

    def default_confidence_pair(self) -> tuple[int, int]:
        """The pair with the largest error inconsistency (ties: the first)."""
        pairs = self.pairs()
        if not pairs:
            raise ValueError("a confidence plot needs at least two models")
        return max(pairs, key=lambda p: float(self.error_inconsistency[p]))

    def plot_confidence(self, pair: tuple[int, int] | None = None, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Model 1's probability of the true class against model 2's, one point per evaluation
        example, coloured by which of the two is right (specialisation shows as the corners)."""
        i, j = self.default_confidence_pair() if pair is None else pair
        fig, ax = _figure(ax, (5.2, 5.0))
        right = self.predictions == self.target[None, :]
        groups = [
            ("both right", right[i] & right[j], "tab:green"),
            (f"only {self.names[i]} right", right[i] & ~right[j], "tab:blue"),
            (f"only {self.names[j]} right", ~right[i] & right[j], "tab:orange"),
            ("both wrong", ~right[i] & ~right[j], "tab:red"),
        ]
        p = self.correct_class_probability
        for label, mask, color in groups:
            ax.scatter(p[i][mask], p[j][mask], s=10, alpha=0.6, color=color, edgecolors="none",
                       label=f"{label} ({int(mask.sum())})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, zorder=0)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{self.names[i]}: probability of the true class")
        ax.set_ylabel(f"{self.names[j]}: probability of the true class")
        category = pair_category(self.descriptions[i], self.descriptions[j], self.category_order)
        ax.set_title(f"Confidence of two models ({category} pair)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        return fig, ax

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars; the pairs, categories and members tables; the scatter, heatmap and
        confidence figures (PNG/CSV always, W&B with a WandbLogger)."""
        super().log(reporter, prefix)  # scalars, the pairs table, the scatter
        reporter.log_frame(f"{prefix}_categories", self.category_frame())
        if self.anchors:
            reporter.log_frame(f"{prefix}_categories_anchored", self.category_frame(anchors=self.anchors))
        reporter.log_frame(f"{prefix}_members", self.members_frame())
        fig, _ = self.plot_heatmap()
        reporter.log_figure(f"{prefix}_heatmap", fig, close=True)
        if self.num_models >= 2:
            fig, _ = self.plot_confidence()
            reporter.log_figure(f"{prefix}_confidence", fig, close=True)

