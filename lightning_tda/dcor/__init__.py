"""Distance correlation: the statistic, its metric and regulariser, and the recipes built on them.

Laid out as torchmetrics is:

- :mod:`~lightning_tda.dcor.functional`: dCor, bias-corrected dCor^2, partial dCor (torch alone);
- :mod:`~lightning_tda.dcor.metric`: :class:`DistanceCorrelation`, :class:`PartialDistanceCorrelation`
  (torchmetrics, DDP-synced);
- :mod:`~lightning_tda.dcor.penalty`: :class:`DistanceCorrelationLoss` and
  :class:`DistanceCorrelationPenalty` (a LightningModule wrapper that adds dCor to a loss).

Every public name is importable from here. The functional names are imported eagerly and need
torch alone; the others load their module (and Lightning, torchmetrics) on first use, so
``from lightning_tda.dcor import distance_correlation`` stays as light as the functional module.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tda.dcor.functional import (
    DEFAULT_BLOCK_SIZE,
    DENSE_MAX_N,
    PARTIAL_STATISTICS,
    STATISTICS,
    Method,
    check_method,
    distance_correlation,
    distance_correlation_sqr,
    distance_covariance,
    distance_covariance_sqr,
    distance_terms,
    partial_distance_correlation,
    partial_distance_covariance,
    resolve_statistic,
    semi_partial_distance_correlation,
    u_distance_correlation_sqr,
    u_distance_covariance_sqr,
)

_LAZY = {
    "DistanceCorrelation": "metric",
    "PartialDistanceCorrelation": "metric",
    "DistanceCorrelationLoss": "penalty",
    "DistanceCorrelationPenalty": "penalty",
    "linear_warmup": "penalty",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_tda.dcor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_tda.dcor.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DENSE_MAX_N",
    "Method",
    "PARTIAL_STATISTICS",
    "STATISTICS",
    "check_method",
    "distance_correlation",
    "distance_correlation_sqr",
    "distance_covariance",
    "distance_covariance_sqr",
    "distance_terms",
    "partial_distance_correlation",
    "partial_distance_covariance",
    "resolve_statistic",
    "semi_partial_distance_correlation",
    "u_distance_correlation_sqr",
    "u_distance_covariance_sqr",
    *_LAZY,
]
