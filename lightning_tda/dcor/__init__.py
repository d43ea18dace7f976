"""Distance correlation: the statistic, its metric and regulariser, and the recipes built on them.

Laid out as torchmetrics is:

- :mod:`~lightning_tda.dcor.functional`: dCor, bias-corrected dCor^2, partial dCor (torch alone);
- :mod:`~lightning_tda.dcor.metric`: :class:`DistanceCorrelation`, :class:`PartialDistanceCorrelation`
  (torchmetrics, DDP-synced);
- :mod:`~lightning_tda.dcor.loss`: :class:`DistanceCorrelationLoss`, a loss term for any loop;
- :mod:`~lightning_tda.dcor.penalty`: :class:`DistanceCorrelationPenalty`, a LightningModule
  wrapper that adds dCor (or partial dCor with a signal) to an unmodified module's loss;
- the recipes of Zhen et al. (ECCV 2022), one module each:
  :mod:`~lightning_tda.dcor.transfer_attacks` (diverse models against transfer attacks, with
  :mod:`~lightning_tda.dcor.attacks`: FGSM and PGD),
  :mod:`~lightning_tda.dcor.layers` (layer-by-layer comparison of two networks),
  :mod:`~lightning_tda.dcor.conditioning` (train a model on what another does not capture).

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
    correlations_from_terms,
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
    "DistanceCorrelationLoss": "loss",
    "DistanceCorrelationPenalty": "penalty",
    "linear_warmup": "loss",
    "LayerComparison": "layers",
    "compare_layers": "layers",
    "default_layers": "layers",
    "demo_layer_comparison": "layers",
    "layer_activations": "layers",
    "linear_cka": "layers",
    "DiverseFamily": "transfer_attacks",
    "TransferAttackResult": "transfer_attacks",
    "diverse_models_against_transfer_attacks": "transfer_attacks",
    "evaluate_transfer": "transfer_attacks",
    "fgsm": "attacks",
    "pgd": "attacks",
    "train_diverse_family": "transfer_attacks",
    "ConditioningResult": "conditioning",
    "condition_on_model": "conditioning",
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
    "correlations_from_terms",
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
