"""How well gradient methods approximate the further-training gold standard, as further training
grows: :func:`compare` and its :class:`ComparisonResult`.

Per amount of further training ``K`` and per test example ``z``, a method's scores over the
left-out instances are compared with the gold standard's by cosine similarity (as the seed paper
does) and by Spearman rank correlation; both are averaged over test examples with their standard
error. Both ignore a positive factor per test example, so only the *sign convention* of a method
must match the gold standard's (:mod:`~lightning_tda.further_training.methods`), not its scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from scipy.stats import rankdata

from lightning_tda.further_training.methods import method_label
from lightning_tda.further_training.order import steps_per_epoch
from lightning_tda.further_training.result import FurtherTrainingResult
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; NaN where a row is all zeros."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), np.nan)


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching rows (average ranks for ties); NaN for a constant row."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    return row_cosine(ra, rb)


def _mean_sem(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean and standard error over the last axis."""
    count = np.isfinite(values).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(count[..., None] > 0, values, 0.0), axis=-1)
        mean = np.where(count > 0, mean, np.nan)
        centred = np.where(np.isfinite(values), values - mean[..., None], 0.0)
        var = (centred**2).sum(-1) / np.maximum(count - 1, 1)
        sem = np.where(count > 1, np.sqrt(var / np.maximum(count, 1)), np.nan)
    return mean, sem


@dataclass(frozen=True)
class ComparisonResult(AnalysisResult):
    """Agreement of each method with the gold standard over ``K`` (module docstring).

    Attributes:
        methods: method keys; ``labels`` their readable names.
        steps: further-training steps ``K``; ``steps_per_epoch`` converts them to epochs.
        cosine, spearman: ``[n_methods, n_steps, n_test]`` per test example (NaN where undefined:
            an all-zero or constant row).
        n_seeds, centered, settings: of the gold standard.
    """

    methods: tuple[str, ...]
    labels: tuple[str, ...]
    steps: tuple[int, ...]
    steps_per_epoch: int
    cosine: np.ndarray
    spearman: np.ndarray
    n_seeds: int
    centered: bool
    settings: dict[str, Any]

    def statistic(self, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error over test examples, ``[n_methods, n_steps]`` each."""
        if metric not in ("cosine", "spearman"):
            raise ValueError(f"metric must be 'cosine' or 'spearman', got {metric!r}")
        return _mean_sem(getattr(self, metric))

    def to_frame(self) -> "pd.DataFrame":
        """One row per (method, K): mean and SEM of the cosine and Spearman correlations."""
        import pandas as pd

        cos_mean, cos_sem = self.statistic("cosine")
        sp_mean, sp_sem = self.statistic("spearman")
        rows = []
        for a, (method, label) in enumerate(zip(self.methods, self.labels)):
            for k, step in enumerate(self.steps):
                rows.append({
                    "method": method, "label": label, "step": step, "epoch": step / self.steps_per_epoch,
                    "cosine": cos_mean[a, k], "cosine_sem": cos_sem[a, k],
                    "spearman": sp_mean[a, k], "spearman_sem": sp_sem[a, k],
                    "n_test": int(np.isfinite(self.cosine[a, k]).sum()),
                })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Mean cosine and Spearman at the first and the last ``K`` of each method."""
        cos_mean, _ = self.statistic("cosine")
        sp_mean, _ = self.statistic("spearman")
        out: dict[str, float] = {}
        for a, method in enumerate(self.methods):
            for k, where in ((0, "first"), (-1, "last")):
                out[f"{method}/cosine_{where}_K"] = float(cos_mean[a, k])
                out[f"{method}/spearman_{where}_K"] = float(sp_mean[a, k])
        return out

    def plot(self, ax: "Axes | None" = None, metric: str = "cosine", epochs: bool | None = None) -> tuple["Figure", "Axes"]:
        """``metric`` against the amount of further training, one line per method (SEM bars).
        ``epochs``: x in epochs (default: when every ``K`` is a whole number of epochs)."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(9.0, 4.6))
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        mean, sem = self.statistic(metric)
        per = self.steps_per_epoch
        if epochs is None:
            epochs = per > 1 and all(step % per == 0 for step in self.steps)
        x = np.asarray(self.steps, dtype=float) / (per if epochs else 1)
        markers = "osD^v<>phX*"
        for a, label in enumerate(self.labels):
            ax.errorbar(x, mean[a], yerr=np.nan_to_num(sem[a]), marker=markers[a % len(markers)], markersize=4,
                        capsize=2, linewidth=1.3, label=label)
        if len(x) > 1 and x[-1] / max(x[0], 1e-12) > 100:
            ax.set_xscale("log")
            from matplotlib.ticker import ScalarFormatter

            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xlabel("further-training epochs" if epochs else "further-training steps K")
        ax.set_ylabel(f"{metric} with further training (mean over test)")
        s = self.settings
        ax.set_title(
            f"{metric}: gradient methods vs further training ({self.n_seeds} seeds, "
            f"{'centred' if self.centered else 'not centred'}, {s.get('optimizer')} lr={s.get('lr')})", fontsize=9,
        )
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        return fig, ax

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, the table, and both figures (cosine, Spearman)."""
        super().log(reporter, prefix)
        fig, _ = self.plot(metric="spearman")
        reporter.log_figure(f"{prefix}_spearman", fig, close=True)


def compare(gold: FurtherTrainingResult, methods: Mapping[str, np.ndarray]) -> ComparisonResult:
    """Compare method scores with the gold standard at every ``K`` of ``gold.steps``.

    Args:
        gold: from :func:`~lightning_tda.further_training.further_training_scores`.
        methods: ``name -> scores`` in the gold standard's sign (positive: removing the instance
            raises the test loss; :func:`~lightning_tda.further_training.final_model_scores`
            gives them), ``[n_test, len(gold.instances)]`` in the gold's column order, or
            ``[n_test, n_train]`` (the instances' columns are taken).
    """
    if not methods:
        raise ValueError("no methods to compare: pass name -> scores (e.g. from final_model_scores)")
    m, n_test = len(gold.instances), gold.n_test
    aligned: dict[str, np.ndarray] = {}
    for name, scores in methods.items():
        values = np.asarray(scores, dtype=np.float64)
        if values.ndim == 2 and values.shape == (n_test, gold.n_train) and values.shape[1] != m:
            values = values[:, gold.instances]
        if values.shape != (n_test, m):
            raise ValueError(
                f"method {name!r} has scores of shape {values.shape}; the gold standard needs [n_test={n_test}, "
                f"len(instances)={m}] (columns in gold.instances order) or [n_test, n_train={gold.n_train}]"
            )
        if not np.isfinite(values).all():
            raise ValueError(f"method {name!r} has non-finite scores")
        aligned[name] = values
    gold_scores = gold.scores.astype(np.float64)
    cosine = np.stack([[row_cosine(g, v) for g in gold_scores] for v in aligned.values()])
    spearman = np.stack([[row_spearman(g, v) for g in gold_scores] for v in aligned.values()])
    return ComparisonResult(
        methods=tuple(aligned), labels=tuple(method_label(k) for k in aligned), steps=tuple(gold.steps),
        steps_per_epoch=steps_per_epoch(gold.n_train, gold.settings.get("batch_size")),
        cosine=cosine, spearman=spearman, n_seeds=len(gold.seeds), centered=gold.centered,
        settings=dict(gold.settings),
    )
