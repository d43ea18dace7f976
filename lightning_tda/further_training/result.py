"""The gold standard's result: further-training scores over the amount of further training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def center_instances(values: np.ndarray) -> np.ndarray:
    """Subtract the mean over left-out instances (the last axis)."""
    return values - values.mean(axis=-1, keepdims=True)


def seed_statistics(per_seed: np.ndarray, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over seeds (axis 0) of per-seed scores, centred first when asked.
    With one seed the standard error is NaN (unknown)."""
    values = center_instances(per_seed) if center else per_seed
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])


@dataclass(frozen=True)
class FurtherTrainingResult(AnalysisResult):
    """Further-training sensitivity of test losses to training instances.

    .. math::

        \\tau_K(i, z) = \\operatorname{mean}_s \\big[\\ell(z; \\theta^{-i}_{K,s}) - \\ell(z; \\theta_{K,s})\\big]

    where ``theta_{K,s}`` is the final model further trained ``K`` steps on the full training set
    with seed ``s`` and ``theta^{-i}_{K,s}`` the same run without instance ``i`` (the same
    batches with ``i`` taken out). Subtracting the full run's loss, not the final model's, is the
    adjustment that cancels the effect of further training itself. Positive: removing ``i``
    raises the test loss (``i`` helped ``z``). In ``"upweight"`` mode ``theta^{-i}`` is the run
    that minimises ``(1/n) sum_j loss_j + eps * loss_i``; divide by ``eps`` for the derivative.

    Attributes:
        scores: ``[len(steps), n_test, len(instances)]`` mean over seeds (centred if ``centered``).
        sem: standard error over seeds, same shape (NaN with one seed).
        steps: further-training steps ``K`` of each row.
        instances: training positions of the columns.
        full_loss: ``[len(steps), n_test]`` the full run's test losses, mean over seeds.
        seeds: the seeds averaged over.
        centered: whether the mean over instances was subtracted (per step, test example, seed).
        settings: optimizer, lr, batch size, weight decay, momentum, mode, eps.
        n_train: size of the training set.
        per_seed: ``[n_seeds, len(steps), n_test, len(instances)]`` uncentred, when kept.
    """

    scores: np.ndarray
    sem: np.ndarray
    steps: tuple[int, ...]
    instances: np.ndarray
    full_loss: np.ndarray
    seeds: tuple[int, ...]
    centered: bool
    settings: dict[str, Any]
    n_train: int
    per_seed: np.ndarray | None = None

    @property
    def n_test(self) -> int:
        return int(self.scores.shape[1])

    def averaged(self, seeds: int | None = None, center: bool | None = None) -> "FurtherTrainingResult":
        """The result over the first ``seeds`` seeds and/or with centering switched (needs
        ``per_seed``, kept with ``keep_per_seed=True``)."""
        if self.per_seed is None:
            raise ValueError(
                "this result kept only the mean over seeds; rerun with keep_per_seed=True to re-average "
                "over fewer seeds or to switch centering"
            )
        count = len(self.seeds) if seeds is None else int(seeds)
        if not 1 <= count <= len(self.seeds):
            raise ValueError(f"seeds must be in [1, {len(self.seeds)}], got {seeds}")
        center = self.centered if center is None else bool(center)
        per_seed = self.per_seed[:count]
        mean, sem = seed_statistics(per_seed, center)
        return dataclasses.replace(
            self, scores=mean.astype(np.float32), sem=sem.astype(np.float32), seeds=self.seeds[:count],
            centered=center, per_seed=per_seed,
        )

    def to_frame(self) -> "pd.DataFrame":
        """One row per (step, test example, instance): ``score`` and its ``sem``."""
        import pandas as pd

        n_steps, n_test, m = self.scores.shape
        grid = np.meshgrid(np.asarray(self.steps), np.arange(n_test), np.asarray(self.instances), indexing="ij")
        return pd.DataFrame({
            "step": grid[0].ravel(), "test": grid[1].ravel(), "instance": grid[2].ravel(),
            "score": self.scores.ravel(), "sem": self.sem.ravel(),
        })

    def summary(self) -> dict[str, float]:
        last_abs = float(np.abs(self.scores[-1]).mean())
        out = {"n_seeds": float(len(self.seeds)), "mean_abs_score": last_abs, "steps": float(self.steps[-1])}
        if len(self.seeds) > 1:
            out["mean_sem"] = float(np.nanmean(self.sem[-1]))
            out["signal_to_noise"] = last_abs / max(out["mean_sem"], 1e-30)
        return out

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Mean ``|tau|`` and mean standard error over seeds against ``K`` (log axes)."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(5.5, 3.8))
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        steps = np.asarray(self.steps)
        ax.plot(steps, np.abs(self.scores).mean(axis=(1, 2)), marker="o", label="mean |score|")
        if len(self.seeds) > 1:
            ax.plot(steps, np.nanmean(self.sem, axis=(1, 2)), marker="s", linestyle="--",
                    label=f"mean SEM over {len(self.seeds)} seeds")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("further-training steps K")
        ax.set_ylabel("test-loss difference")
        mode = self.settings.get("mode", "remove")
        ax.set_title(f"further training ({mode}, {'centred' if self.centered else 'not centred'})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig, ax
