"""Greedy ensemble selection from a pool (Caruana et al., 2004, without replacement).

Start from the most accurate model on a selection split, then repeatedly add the pool member
whose addition most improves the ensemble's accuracy there; stop when no member improves it (or
at ``max_size``). The seed paper's finding to check: the members picked after the first are
often **not** the next most accurate models but divergent ones, even low-accuracy ones. The
result reports each pick's own accuracy rank in the pool and whether any pick is below the
pool's median accuracy. Accuracies are also given on an evaluation split the selection did not
see, since picking on the selection split overfits it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tda.diversity.categories import DEFAULT_CATEGORY_ORDER, pair_category
from lightning_tda.diversity.inputs import Combine, check_target, ensemble_scores, stack_predictions
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["SelectionResult", "greedy_ensemble_selection"]


def _accuracy(scores_sum: Tensor, y: Tensor) -> float:
    return float((scores_sum.argmax(-1) == y).double().mean())


@dataclasses.dataclass(frozen=True)
class SelectionResult(AnalysisResult):
    """The greedy picks in order (``members``: pool indices) with, per step, the member's own
    selection accuracy and rank in the pool (1 = best), its error inconsistency with the ensemble
    before it joined, the pair category against the first pick, and the ensemble's accuracy on
    the selection and evaluation splits after it joined."""

    pool_names: tuple[str, ...]
    pool_accuracy: np.ndarray
    pool_evaluation_accuracy: np.ndarray
    members: np.ndarray
    member_rank: np.ndarray
    inconsistency_with_ensemble: np.ndarray
    selection_accuracy: np.ndarray
    evaluation_accuracy: np.ndarray
    categories: tuple[str, ...]
    combine: str
    max_size: int
    n_selection: int
    n_evaluation: int

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "step": np.arange(1, len(self.members) + 1),
            "member": [self.pool_names[m] for m in self.members],
            "category_vs_first": list(self.categories),
            "member_accuracy": self.pool_accuracy[self.members],
            "member_rank": self.member_rank,
            "inconsistency_with_ensemble": self.inconsistency_with_ensemble,
            "ensemble_selection_accuracy": self.selection_accuracy,
            "ensemble_evaluation_accuracy": self.evaluation_accuracy,
        })

    def low_accuracy_picks(self) -> list[str]:
        """Members picked after the first whose own selection accuracy is below the pool median."""
        median = float(np.median(self.pool_accuracy))
        return [self.pool_names[m] for m in self.members[1:] if self.pool_accuracy[m] < median]

    def summary(self) -> dict[str, float]:
        first = int(self.members[0])
        return {
            "size": float(len(self.members)),
            "best_single_selection_accuracy": float(self.pool_accuracy[first]),
            "best_single_evaluation_accuracy": float(self.pool_evaluation_accuracy[first]),
            "ensemble_selection_accuracy": float(self.selection_accuracy[-1]),
            "ensemble_evaluation_accuracy": float(self.evaluation_accuracy[-1]),
            "low_accuracy_picks": float(len(self.low_accuracy_picks())),
        }

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Ensemble accuracy (selection and evaluation splits) as members join, each step
        labelled with the member and its accuracy rank in the pool."""
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(6.5, 4.2))
            ax = fig.add_subplot(1, 1, 1)
        fig = ax.figure
        steps = np.arange(1, len(self.members) + 1)
        ax.plot(steps, 100 * self.selection_accuracy, "o-", label=f"selection split ({self.n_selection})")
        if self.n_evaluation:
            ax.plot(steps, 100 * self.evaluation_accuracy, "s--", label=f"evaluation split ({self.n_evaluation})")
        for k, m in enumerate(self.members):
            ax.annotate(
                f"{self.pool_names[m]}\n(rank {self.member_rank[k]})", (steps[k], 100 * self.selection_accuracy[k]),
                textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7,
            )
        ax.set_xticks(steps)
        ax.set_xlabel("ensemble size (greedy picks)")
        ax.set_ylabel("ensemble accuracy (%)")
        ax.set_title(f"Greedy selection from a pool of {len(self.pool_names)} models", fontsize=10)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.15 * (high - low))  # room for the labels
        ax.legend(fontsize=8, loc="lower right")
        return fig, ax


def greedy_ensemble_selection(
    selection_scores: Tensor,
    selection_target: Tensor,
    evaluation_scores: Tensor | None = None,
    evaluation_target: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    descriptions: Sequence[Mapping[str, Any]] | None = None,
    category_order: Sequence[str] = DEFAULT_CATEGORY_ORDER,
    max_size: int | None = None,
    combine: Combine = "probabilities",
) -> SelectionResult:
    """Pick an ensemble greedily (module docstring).

    Args:
        selection_scores: ``[M, h, C]`` (temperature-scaled) logits or probabilities on the
            selection split (a held-out split no model trained on).
        selection_target: ``[h]`` its labels.
        evaluation_scores, evaluation_target: the same on an evaluation split (optional).
        names, descriptions: of the pool's models (descriptions label each pick's category
            against the first pick).
        max_size: most members (default: the pool's size).
        combine: average probabilities or logits.

    Ties (equal accuracy) go to the lower pool index.
    """
    sel = ensemble_scores(stack_predictions(selection_scores, "selection_scores"), combine)
    M = sel.shape[0]
    y = check_target(torch.as_tensor(selection_target), sel.shape[1], sel.shape[2])
    if evaluation_scores is not None:
        ev = ensemble_scores(stack_predictions(evaluation_scores, "evaluation_scores"), combine)
        if ev.shape[0] != M or ev.shape[2] != sel.shape[2]:
            raise ValueError(f"evaluation scores {tuple(ev.shape)} do not match the selection scores {tuple(sel.shape)}")
        ey = check_target(torch.as_tensor(evaluation_target), ev.shape[1], ev.shape[2])
    else:
        ev, ey = sel[:, :0], y[:0]
    max_size = M if max_size is None else max_size
    if isinstance(max_size, bool) or not isinstance(max_size, int) or not 1 <= max_size <= M:
        raise ValueError(f"max_size must be an integer in [1, {M}], got {max_size!r}")
    names = tuple(names) if names is not None else tuple(f"model_{m}" for m in range(M))
    descriptions = list(descriptions) if descriptions is not None else [{} for _ in range(M)]
    if len(names) != M or len(descriptions) != M:
        raise ValueError(f"got {len(names)} names and {len(descriptions)} descriptions for {M} models")

    correct = sel.argmax(-1) == y[None]
    pool_acc = correct.double().mean(1).numpy()
    pool_eval = (ev.argmax(-1) == ey[None]).double().mean(1).numpy() if ev.shape[1] else np.full(M, np.nan)
    order = sorted(range(M), key=lambda m: (-pool_acc[m], m))
    rank = {m: r + 1 for r, m in enumerate(order)}
    chosen = [order[0]]
    total, total_eval = sel[order[0]].clone(), ev[order[0]].clone()
    current = _accuracy(total, y)
    steps = [(order[0], float("nan"), current, _accuracy(total_eval, ey) if ev.shape[1] else float("nan"))]
    while len(chosen) < max_size:
        candidates = [m for m in range(M) if m not in chosen]
        gains = [_accuracy(total + sel[m], y) for m in candidates]
        best = max(range(len(candidates)), key=lambda k: (gains[k], -candidates[k]))
        if gains[best] <= current:
            break
        m = candidates[best]
        ensemble_right = total.argmax(-1) == y
        inconsistency = float((ensemble_right ^ correct[m]).double().mean())
        chosen.append(m)
        total, total_eval, current = total + sel[m], total_eval + ev[m], gains[best]
        steps.append((m, inconsistency, current, _accuracy(total_eval, ey) if ev.shape[1] else float("nan")))
    first = descriptions[chosen[0]]
    return SelectionResult(
        pool_names=names,
        pool_accuracy=pool_acc,
        pool_evaluation_accuracy=pool_eval,
        members=np.array(chosen, dtype=np.int64),
        member_rank=np.array([rank[m] for m in chosen], dtype=np.int64),
        inconsistency_with_ensemble=np.array([s[1] for s in steps]),
        selection_accuracy=np.array([s[2] for s in steps]),
        evaluation_accuracy=np.array([s[3] for s in steps]),
        categories=tuple("first" if k == 0 else pair_category(first, descriptions[m], category_order) for k, m in enumerate(chosen)),
        combine=combine,
        max_size=max_size,
        n_selection=int(sel.shape[1]),
        n_evaluation=int(ev.shape[1]),
    )
