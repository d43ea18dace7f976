"""torchmetrics faces of :mod:`lightning_tda.diversity.functional`.

Every diversity metric is a function of a few counts over examples (how many each model gets
right, both get right, the pair agrees on, the pair's ensemble gets right, ...). The metrics keep
those counts as ``sum`` states, so under DDP each rank counts its own examples and the states
add up before ``compute``: the value equals one process's on all examples. (A
``DistributedSampler`` that pads with repeated examples counts those twice, as for any metric:
evaluate on a split the world size divides, or unpadded.)

Two-model metrics take ``update(preds_a, preds_b, target)`` and compute a scalar;
:class:`PairwiseDiversity` takes ``update(preds [M, b, ...], target)`` and computes every metric
as ``[M, M]`` matrices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_tda.diversity.functional import (
    REFERENCES,
    PairCounts,
    Reference,
    _accuracy,
    _all_compute,
    _conversion_rate_compute,
    _disagreement_compute,
    _ensemble_gain_compute,
    _error_consistency_compute,
    _error_correlation_compute,
    _error_inconsistency_compute,
    _pair_counts_update,
)
from lightning_tda.diversity.inputs import COMBINES, Combine, PredictionsLike, stack_predictions

__all__ = [
    "ConversionRate",
    "Disagreement",
    "EnsembleGain",
    "ErrorConsistency",
    "ErrorCorrelation",
    "ErrorInconsistency",
    "PairwiseDiversity",
]


class _PairCountsMetric(Metric):
    """Sum states of :class:`~lightning_tda.diversity.functional.PairCounts` for M models."""

    is_differentiable = False
    full_state_update = False
    _needs_ensemble = False
    _needs_target = True

    def __init__(self, num_models: int = 2, combine: Combine = "probabilities", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
            raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.num_models = num_models
        self.combine = combine
        M = num_models
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros(M, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("both_correct", "agree", "ensemble_correct", "converted"):
            self.add_state(name, default=torch.zeros(M, M, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("ensemble_total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _update_stacked(self, stacked: Tensor, target: Tensor | None) -> None:
        if stacked.shape[0] != self.num_models:
            raise ValueError(f"this metric was built for num_models={self.num_models}, got predictions of {stacked.shape[0]} models")
        combine = self.combine if stacked.is_floating_point() else None
        if self._needs_ensemble and combine is None:
            raise ValueError(
                f"{type(self).__name__} ensembles the models, so it needs probabilities or logits "
                "([batch, num_classes] per model), not predicted labels"
            )
        counts = _pair_counts_update(stacked.to(self.device), target, combine, need_target=self._needs_target)
        self.total += counts.total.to(self.device)
        self.correct += counts.correct.to(self.device)
        self.both_correct += counts.both_correct.to(self.device)
        self.agree += counts.agree.to(self.device)
        if counts.ensemble_correct is not None and counts.converted is not None:
            self.ensemble_correct += counts.ensemble_correct.to(self.device)
            self.converted += counts.converted.to(self.device)
            self.ensemble_total += counts.total.to(self.device)

    def _counts(self) -> PairCounts:
        if int(self.total) == 0:
            raise ValueError(f"{type(self).__name__}.compute() before any update with examples")
        has_ensemble = int(self.ensemble_total) == int(self.total)
        return PairCounts(
            self.total.cpu(), self.correct.cpu(), self.both_correct.cpu(), self.agree.cpu(),
            self.ensemble_correct.cpu() if has_ensemble else None,
            self.converted.cpu() if has_ensemble else None,
        )


class _TwoModelMetric(_PairCountsMetric):
    """``update(preds_a, preds_b, target)``; ``compute()`` a scalar."""

    def __init__(self, combine: Combine = "probabilities", **kwargs: Any) -> None:
        super().__init__(num_models=2, combine=combine, **kwargs)

    def update(self, preds_a: Tensor, preds_b: Tensor, target: Tensor | None = None) -> None:
        """Add a batch: both models' labels ``[b]`` or probabilities/logits ``[b, C]``, and the
        labels ``[b]``."""
        stacked = stack_predictions([preds_a, preds_b], "preds")
        if target is None and self._needs_target:
            raise ValueError(f"{type(self).__name__}.update needs target (the true labels, [batch])")
        self._update_stacked(stacked, target)

    def _value(self, counts: PairCounts) -> Tensor:
        raise NotImplementedError

    def compute(self) -> Tensor:
        return self._value(self._counts())[0, 1].to(torch.get_default_dtype())


class ErrorInconsistency(_TwoModelMetric):
    r"""The fraction of examples where exactly one of two models is right
    (:func:`~lightning_tda.diversity.functional.error_inconsistency`).

    Example:
        >>> metric = ErrorInconsistency()
        >>> metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor([0, 0]))
        >>> float(metric.compute())  # one inconsistent example in each batch
        0.5
    """

    higher_is_better = None

    def _value(self, counts: PairCounts) -> Tensor:
        return _error_inconsistency_compute(counts)


class ErrorConsistency(_TwoModelMetric):
    """Geirhos et al.'s error consistency (kappa of the correctness indicators)
    (:func:`~lightning_tda.diversity.functional.error_consistency`)."""

    higher_is_better = None

    def _value(self, counts: PairCounts) -> Tensor:
        return _error_consistency_compute(counts)


class ErrorCorrelation(_TwoModelMetric):
    """Pearson correlation of the two models' error indicators
    (:func:`~lightning_tda.diversity.functional.error_correlation`)."""

    higher_is_better = None

    def _value(self, counts: PairCounts) -> Tensor:
        return _error_correlation_compute(counts)


class Disagreement(_TwoModelMetric):
    """The fraction of examples whose predicted labels differ
    (:func:`~lightning_tda.diversity.functional.disagreement`); ``target`` may be omitted."""

    higher_is_better = None
    _needs_target = False

    def _value(self, counts: PairCounts) -> Tensor:
        return _disagreement_compute(counts)


class EnsembleGain(_TwoModelMetric):
    """Accuracy of the two-model ensemble minus the members' mean (``reference="mean"``) or the
    better member's (``"best"``) (:func:`~lightning_tda.diversity.functional.ensemble_gain`).

    Example:
        >>> metric = EnsembleGain(reference="best")
        >>> pa = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
        >>> pb = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
        >>> metric.update(pa, pb, torch.tensor([0, 1, 0]))
        >>> float(metric.compute())
        0.0
    """

    higher_is_better = True
    _needs_ensemble = True

    def __init__(self, reference: Reference = "mean", combine: Combine = "probabilities", **kwargs: Any) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        super().__init__(combine=combine, **kwargs)
        self.reference = reference

    def _value(self, counts: PairCounts) -> Tensor:
        return _ensemble_gain_compute(counts, self.reference)


class ConversionRate(_TwoModelMetric):
    """The share of inconsistent examples the ensemble gets right
    (:func:`~lightning_tda.diversity.functional.conversion_rate`)."""

    higher_is_better = True
    _needs_ensemble = True

    def _value(self, counts: PairCounts) -> Tensor:
        return _conversion_rate_compute(counts)


class PairwiseDiversity(_PairCountsMetric):
    """Every diversity metric for every pair of ``num_models`` models, accumulated over batches.

    ``update(preds, target)`` with ``preds`` ``[M, batch]`` labels or ``[M, batch, C]``
    probabilities/logits (or a sequence of M per-model arrays); ``compute()`` returns
    ``{name: [M, M]}`` (:data:`~lightning_tda.diversity.functional.PAIRWISE_METRICS`, the
    ensemble ones for float inputs) and ``"accuracy"`` ``[M]``.

    Example:
        >>> metric = PairwiseDiversity(num_models=3)
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]], [[1.0, 0.0]]])  # 3 models, 1 example
        >>> metric.update(logits, torch.tensor([0]))
        >>> metric.compute()["error_inconsistency"]
        tensor([[0., 1., 0.],
                [1., 0., 1.],
                [0., 1., 0.]])
    """

    higher_is_better = None

    def update(self, preds: PredictionsLike, target: Tensor) -> None:
        """Add a batch of M models' predictions and the labels ``[batch]``."""
        self._update_stacked(stack_predictions(preds, "preds"), target)

    def compute(self) -> dict[str, Tensor]:
        counts = self._counts()
        dtype = torch.get_default_dtype()
        out = {k: v.to(dtype) for k, v in _all_compute(counts).items()}
        out["accuracy"] = _accuracy(counts).to(dtype)
        return out
