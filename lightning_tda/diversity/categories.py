"""What two models differ by: each pair's category, and per-category means with intervals.

The seed paper orders training methodologies by how far they diverge, from least to most:
initialisation, hyper-parameters, architecture, framework, dataset. Each model is described by a
mapping of those factors (``{"seed": 0, "hyperparameters": "lr=0.05", "architecture": "cnn",
...}``) and a pair is labelled by the **most divergent factor whose values differ**: two models
that differ in seed and architecture are an "architecture" pair. A pair that differs in nothing
listed is "same".
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_CATEGORY_ORDER", "SAME", "category_intervals", "check_descriptions", "pair_category"]

DEFAULT_CATEGORY_ORDER: tuple[str, ...] = (
    "seed",
    "hyperparameters",
    "architecture",
    "augmentation",
    "algorithm",
    "data",
)
"""Least to most divergent. ``augmentation`` and ``algorithm`` (a store's algorithm label: the
seed paper's training *framework*, e.g. supervised against contrastive) sit between architecture
and data, as the seed's "framework" level does."""

SAME = "same"


def check_descriptions(
    descriptions: Sequence[Mapping[str, Any]], num_models: int, order: Sequence[str] = DEFAULT_CATEGORY_ORDER
) -> list[dict[str, Any]]:
    """Validate one description per model; every key must be a factor of ``order``."""
    if len(order) == 0 or len(set(order)) != len(order):
        raise ValueError(f"category_order must be non-empty factor names without repeats, got {tuple(order)}")
    if len(descriptions) != num_models:
        raise ValueError(f"got {len(descriptions)} model descriptions for {num_models} models; pass one per model")
    out = []
    for m, description in enumerate(descriptions):
        if not isinstance(description, Mapping):
            raise TypeError(f"description {m} must be a mapping of factor -> value, got {type(description).__name__}")
        unknown = sorted(set(map(str, description)) - set(order))
        if unknown:
            raise ValueError(
                f"description {m} has factors {unknown} that category_order {tuple(order)} does not "
                "rank; add them to category_order (least to most divergent) or drop them"
            )
        out.append({str(k): v for k, v in description.items()})
    return out


def pair_category(a: Mapping[str, Any], b: Mapping[str, Any], order: Sequence[str] = DEFAULT_CATEGORY_ORDER) -> str:
    """The most divergent factor of ``order`` on which ``a`` and ``b`` differ (a missing factor
    differs from a present one), or ``"same"``.

    Example:
        >>> pair_category({"seed": 0, "architecture": "cnn"}, {"seed": 1, "architecture": "mlp"})
        'architecture'
        >>> pair_category({"seed": 0}, {"seed": 0})
        'same'
    """
    for factor in reversed(tuple(order)):
        if a.get(factor) != b.get(factor):
            return factor
    return SAME


def _t_quantile(dof: int, level: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def category_intervals(
    categories: Sequence[str],
    values: Mapping[str, Sequence[float]],
    order: Sequence[str] = DEFAULT_CATEGORY_ORDER,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Per category (in ``order``, then "same" and any others): the number of pairs and, per
    metric, the mean and a Student-t ``level`` interval over pairs.

    The pairs of one family share models, so they are not independent; the interval describes
    the spread over pairs, not a sampling guarantee. NaN values (a metric undefined for a pair)
    are left out of that metric's mean. Rows: ``{"category", "pairs", "<metric>_mean",
    "<metric>_low", "<metric>_high"}``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    cats = list(categories)
    present = [c for c in order if c in cats] + [SAME] * (SAME in cats and SAME not in order)
    present += sorted(set(cats) - set(present))
    rows = []
    for category in present:
        mask = np.array([c == category for c in cats])
        row: dict[str, Any] = {"category": category, "pairs": int(mask.sum())}
        for name, column in values.items():
            v = np.asarray(column, dtype=np.float64)[mask]
            v = v[np.isfinite(v)]
            mean = float(v.mean()) if v.size else math.nan
            half = _t_quantile(v.size - 1, level) * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else math.nan
            row[f"{name}_mean"], row[f"{name}_low"], row[f"{name}_high"] = mean, mean - half, mean + half
        rows.append(row)
    return rows
