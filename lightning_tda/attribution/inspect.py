"""Looking at scores: top-k helpful/harmful training examples, self-influence, image grids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_tda import schema
from lightning_tda.attribution.scorers import TRAK, Scorer
from lightning_tda.images import to_uint8_image
from lightning_tda.store import RunStore


@dataclass(frozen=True)
class TopExamples:
    """Per test example, the ``k`` most helpful (highest score) and most harmful (lowest)
    training examples, with their scores."""

    helpful: np.ndarray
    helpful_scores: np.ndarray
    harmful: np.ndarray
    harmful_scores: np.ndarray


def top_k(scores: np.ndarray, k: int = 5) -> TopExamples:
    """Top-``k`` helpful and harmful training examples of every test row of ``scores``."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_test, n_train], got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    order = np.argsort(-scores, axis=1, kind="stable")
    helpful, harmful = order[:, :k], order[:, ::-1][:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    return TopExamples(helpful, scores[rows, helpful], harmful, scores[rows, harmful])


def self_influence(
    stores: RunStore | Sequence[RunStore],
    split: str = schema.TRAIN_SPLIT,
    checkpoints: Sequence[str] | int | None = None,
    damping: float | None = None,
    relative_damping: float | None = None,
    scorer: Scorer | None = None,
) -> np.ndarray:
    """Self-influence ``S_ii`` of every example of ``split``: the diagonal of the scores of
    ``split`` against itself, computed the way the scorer computes every score (for TRAK, the
    default: the kernel averaged over checkpoints and runs, times the averaged ``q_i``). High
    values flag memorised or mislabelled examples.

    Args:
        scorer: the scorer whose diagonal to take (default ``TRAK(damping, relative_damping)``
            on ``checkpoints``).
    """
    if scorer is None:
        scorer = TRAK(damping=damping, relative_damping=relative_damping, checkpoints=checkpoints, progress=False)
    return scorer.self_scores(stores, split)


def example_grid(
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    top: TopExamples,
    test_indices: Sequence[int],
    k: int = 5,
    test_labels: Sequence[int] | None = None,
    train_labels: Sequence[int] | None = None,
) -> Figure:
    """A figure with one row per test example: the test image, its ``k`` most helpful and its
    ``k`` most harmful training images, titled with scores (and labels when given)."""
    rows = len(test_indices)
    fig = Figure(figsize=(1.3 * (2 * k + 1), 1.5 * rows))
    axes = fig.subplots(rows, 2 * k + 1, squeeze=False)
    for r, j in enumerate(test_indices):
        cells = [(test_images[j], f"test {j}" + (f"\ny={test_labels[j]}" if test_labels is not None else ""))]
        for kind, idx, sc in (("+", top.helpful[j], top.helpful_scores[j]), ("-", top.harmful[j], top.harmful_scores[j])):
            for i, s in zip(idx[:k], sc[:k]):
                label = f"\ny={train_labels[i]}" if train_labels is not None else ""
                cells.append((train_images[i], f"{kind}{i} {s:.2g}{label}"))
        for ax, (img, title) in zip(axes[r], cells):
            ax.imshow(to_uint8_image(img), cmap="gray")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("test example | most helpful (+) | most harmful (-) training examples", fontsize=9)
    fig.tight_layout()
    return fig
