r"""Diversity metrics between classifiers, in functional form (the torchmetrics split: the
``Metric`` classes in :mod:`lightning_tda.diversity.metrics` call the same update/compute pair).

Every metric is a function of a few counts over examples, so both forms share one update,
:func:`_pair_counts_update`, which turns predictions into sums (DDP-reducible), and one compute
per metric. For models :math:`a, b` with correctness indicators :math:`c_a, c_b \in \{0, 1\}^n`:

- **error inconsistency** (Gontijo-Lopes et al., 2022): the fraction of examples where exactly
  one of the two models is right, :math:`\frac1n \sum_i [c_{a,i} \ne c_{b,i}]`;
- **error consistency** (Geirhos et al., 2020): Cohen's kappa of the correctness indicators,
  :math:`\kappa = (c_{obs} - c_{exp}) / (1 - c_{exp})` with :math:`c_{obs}` the fraction where
  both are right or both wrong and :math:`c_{exp} = p_a p_b + (1 - p_a)(1 - p_b)` its chance
  level from the accuracies; NaN when :math:`c_{exp} = 1` (both all-correct or both all-wrong);
- **error correlation**: the Pearson (phi) correlation of the error indicators; NaN when one
  model is all-correct or all-wrong;
- **disagreement**: the fraction of examples whose predicted labels differ (no labels needed);
- **ensemble gain**: the accuracy of the two-model ensemble minus the members' mean accuracy
  (``reference="mean"``) or the better member's (``reference="best"``);
- **conversion rate**: the share of the inconsistent examples (one model right) that the
  ensemble gets right; NaN when there are none.

Predictions are labels (integers, ``[n]``), probabilities or logits (floats, ``[n, C]``); for
pairwise matrices, ``[M, n]`` / ``[M, n, C]`` or a sequence of M such arrays. Float inputs whose
rows are distributions (in [0, 1], summing to 1) are read as probabilities, others as logits (the
torchmetrics convention). A predicted label is the argmax; ties go to the lowest class index (as
``torch.argmax``). The ensemble averages probabilities (``combine="probabilities"``, default) or
logits (``combine="logits"``; probabilities enter as log-probabilities); it needs float inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_tda.diversity.inputs import (
    COMBINES,
    Combine,
    PredictionsLike,
    check_target,
    ensemble_scores,
    stack_predictions,
)

Reference = Literal["mean", "best"]
REFERENCES = ("mean", "best")
PAIRWISE_METRICS = (
    "error_inconsistency",
    "error_consistency",
    "error_correlation",
    "disagreement",
    "ensemble_accuracy",
    "ensemble_gain_mean",
    "ensemble_gain_best",
    "conversion_rate",
)
"""The matrices :func:`pairwise_diversity` returns (ensemble ones only for float inputs)."""

__all__ = [
    "COMBINES",
    "PAIRWISE_METRICS",
    "PairCounts",
    "conversion_rate",
    "disagreement",
    "ensemble_accuracy",
    "ensemble_gain",
    "ensemble_scores",
    "error_consistency",
    "error_correlation",
    "error_inconsistency",
    "pairwise_conversion_rate",
    "pairwise_disagreement",
    "pairwise_diversity",
    "pairwise_ensemble_gain",
    "pairwise_error_consistency",
    "pairwise_error_correlation",
    "pairwise_error_inconsistency",
    "stack_predictions",
]


# ---------------------------------------------------------------------------------- helpers


def _pair(preds_a: Tensor, preds_b: Tensor) -> Tensor:
    return stack_predictions([preds_a, preds_b], "preds")


def _num_classes(stacked: Tensor) -> int | None:
    return int(stacked.shape[-1]) if stacked.is_floating_point() else None


def _labels(stacked: Tensor) -> Tensor:
    """``[M, n]`` predicted labels (argmax, ties to the lowest index)."""
    return stacked.argmax(-1) if stacked.is_floating_point() else stacked


# ---------------------------------------------------------------------------------- update


@dataclass
class PairCounts:
    """Sums over examples from which every metric is computed (all add up across batches and
    ranks). ``M`` models; ensemble counts are None for label inputs."""

    total: Tensor  # [] examples
    correct: Tensor  # [M] examples model m gets right
    both_correct: Tensor  # [M, M] examples both get right
    agree: Tensor  # [M, M] examples with the same predicted label
    ensemble_correct: Tensor | None = None  # [M, M] examples the pair's ensemble gets right
    converted: Tensor | None = None  # [M, M] examples exactly one gets right and the ensemble does


def _pair_counts_update(
    stacked: Tensor, target: Tensor | None, combine: Combine | None = "probabilities", need_target: bool = True
) -> PairCounts:
    """Counts of one batch: ``stacked`` from :func:`stack_predictions`, ``target [n]``.

    ``combine=None`` skips the ensemble counts. Without a target (``need_target=False``) only
    ``total`` and ``agree`` are meaningful."""
    M, n, device = stacked.shape[0], stacked.shape[1], stacked.device
    labels = _labels(stacked)
    agree = torch.stack([(labels[i][None] == labels).sum(1) for i in range(M)])
    if target is None and not need_target:
        zeros = torch.zeros(M, M, dtype=torch.int64, device=device)
        return PairCounts(torch.tensor(n, device=device), torch.zeros(M, dtype=torch.int64, device=device), zeros, agree)
    target = check_target(target, n, _num_classes(stacked)).to(device)
    correct = labels == target[None]
    c = correct.double()
    counts = PairCounts(torch.tensor(n, device=device), correct.sum(1), (c @ c.T).round().long(), agree)
    if combine is not None:
        scores = ensemble_scores(stacked, combine)
        ens = torch.empty(M, M, dtype=torch.int64, device=device)
        conv = torch.empty(M, M, dtype=torch.int64, device=device)
        for i in range(M):
            ok = ((scores[i][None] + scores) / 2).argmax(-1) == target[None]  # [M, n]
            ens[i] = ok.sum(1)
            conv[i] = ((correct[i][None] ^ correct) & ok).sum(1)
        counts.ensemble_correct, counts.converted = ens, conv
    return counts


# ---------------------------------------------------------------------------------- compute


def _nan_div(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.full_like(num, float("nan")))


def _accuracy(counts: PairCounts) -> Tensor:
    return _nan_div(counts.correct, counts.total.expand_as(counts.correct))


def _error_inconsistency_compute(counts: PairCounts) -> Tensor:
    c = counts.correct.double()
    inconsistent = c[:, None] + c[None, :] - 2 * counts.both_correct.double()
    return inconsistent / counts.total.double()


def _error_consistency_compute(counts: PairCounts) -> Tensor:
    n, c, both = counts.total.double(), counts.correct.double(), counts.both_correct.double()
    both_wrong = n - c[:, None] - c[None, :] + both
    observed = (both + both_wrong) / n
    p = c / n
    expected = p[:, None] * p[None, :] + (1 - p[:, None]) * (1 - p[None, :])
    # c_exp = 1 exactly when both accuracies are 0 or 1 (computed from integer counts)
    degenerate = ((c == 0) | (c == n))[:, None] & ((c == 0) | (c == n))[None, :] & (expected > 0.5)
    kappa = (observed - expected) / torch.where(degenerate, torch.ones_like(expected), 1 - expected)
    return torch.where(degenerate, torch.full_like(kappa, float("nan")), kappa)


def _error_correlation_compute(counts: PairCounts) -> Tensor:
    n, c, both = counts.total.double(), counts.correct.double(), counts.both_correct.double()
    num = n * both - c[:, None] * c[None, :]
    var = c * (n - c)
    return _nan_div(num, (var[:, None] * var[None, :]).sqrt())


def _disagreement_compute(counts: PairCounts) -> Tensor:
    return 1 - counts.agree.double() / counts.total.double()


def _require_ensemble(counts: PairCounts) -> tuple[Tensor, Tensor]:
    if counts.ensemble_correct is None or counts.converted is None:
        raise ValueError("ensemble metrics need probabilities or logits, not predicted labels")
    return counts.ensemble_correct, counts.converted


def _ensemble_accuracy_compute(counts: PairCounts) -> Tensor:
    ens, _ = _require_ensemble(counts)
    return ens.double() / counts.total.double()


def _ensemble_gain_compute(counts: PairCounts, reference: Reference = "mean") -> Tensor:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    acc = counts.correct.double() / counts.total.double()
    if reference == "mean":
        base = (acc[:, None] + acc[None, :]) / 2
    else:
        base = torch.maximum(acc[:, None], acc[None, :])
    return _ensemble_accuracy_compute(counts) - base


def _conversion_rate_compute(counts: PairCounts) -> Tensor:
    _, converted = _require_ensemble(counts)
    c = counts.correct.double()
    inconsistent = c[:, None] + c[None, :] - 2 * counts.both_correct.double()
    return _nan_div(converted, inconsistent)


def _all_compute(counts: PairCounts) -> dict[str, Tensor]:
    out = {
        "error_inconsistency": _error_inconsistency_compute(counts),
        "error_consistency": _error_consistency_compute(counts),
        "error_correlation": _error_correlation_compute(counts),
        "disagreement": _disagreement_compute(counts),
    }
    if counts.ensemble_correct is not None:
        out["ensemble_accuracy"] = _ensemble_accuracy_compute(counts)
        out["ensemble_gain_mean"] = _ensemble_gain_compute(counts, "mean")
        out["ensemble_gain_best"] = _ensemble_gain_compute(counts, "best")
        out["conversion_rate"] = _conversion_rate_compute(counts)
    return out


def _check_nonempty(stacked: Tensor) -> None:
    if stacked.shape[1] == 0:
        raise ValueError("the predictions hold no examples; pass at least one example per model")


def _two(fn, preds_a, preds_b, target, combine: Combine | None, need_target: bool = True) -> Tensor:
    stacked = _pair(preds_a, preds_b)
    _check_nonempty(stacked)
    counts = _pair_counts_update(stacked, target, combine, need_target)
    return fn(counts)[0, 1].to(torch.get_default_dtype())


def _many(fn, preds, target, combine: Combine | None, need_target: bool = True) -> Tensor:
    stacked = stack_predictions(preds)
    _check_nonempty(stacked)
    counts = _pair_counts_update(stacked, target, combine, need_target)
    return fn(counts).to(torch.get_default_dtype())


# ---------------------------------------------------------------------------------- two models


def error_inconsistency(preds_a: Tensor, preds_b: Tensor, target: Tensor) -> Tensor:
    r"""The fraction of examples where exactly one of two models is right (the seed paper's
    measure of how differently two models err).

    .. math::

        \mathrm{EI}(a, b) = \frac{1}{n} \sum_{i=1}^n [\hat y_{a,i} = y_i] \oplus [\hat y_{b,i} = y_i]

    Args:
        preds_a, preds_b: labels ``[n]``, or probabilities/logits ``[n, C]``.
        target: true labels ``[n]``.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> float(error_inconsistency(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), y))
        0.5
    """
    return _two(_error_inconsistency_compute, preds_a, preds_b, target, None)


def error_consistency(preds_a: Tensor, preds_b: Tensor, target: Tensor) -> Tensor:
    r"""Geirhos et al.'s error consistency: Cohen's kappa of the two models' correctness.

    .. math::

        \kappa = \frac{c_{obs} - c_{exp}}{1 - c_{exp}}, \quad
        c_{exp} = p_a p_b + (1 - p_a)(1 - p_b)

    :math:`c_{obs}`: the fraction of examples both get right or both get wrong; :math:`p`: the
    accuracies. 1: the same errors; 0: as many shared errors as chance; NaN when both models are
    all-correct or both all-wrong (:math:`c_{exp} = 1`).

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> float(error_consistency(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 0]), y))
        0.5
    """
    return _two(_error_consistency_compute, preds_a, preds_b, target, None)


def error_correlation(preds_a: Tensor, preds_b: Tensor, target: Tensor) -> Tensor:
    r"""Pearson (phi) correlation of the two models' error indicators over examples.

    .. math::

        \rho = \frac{n\, n_{11} - n_a n_b}{\sqrt{n_a (n - n_a)\, n_b (n - n_b)}}

    with :math:`n_a, n_b` the models' correct counts and :math:`n_{11}` the examples both get
    right (the same value as for the errors). NaN when a model is all-correct or all-wrong.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> float(error_correlation(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), y))
        1.0
    """
    return _two(_error_correlation_compute, preds_a, preds_b, target, None)


def disagreement(preds_a: Tensor, preds_b: Tensor) -> Tensor:
    r"""The fraction of examples whose predicted labels differ (needs no true labels).

    .. math::

        \mathrm{D}(a, b) = \frac{1}{n} \sum_{i=1}^n [\hat y_{a,i} \ne \hat y_{b,i}]

    Example:
        >>> float(disagreement(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 0])))
        0.5
    """
    return _two(_disagreement_compute, preds_a, preds_b, None, None, need_target=False)


def ensemble_accuracy(preds_a: Tensor, preds_b: Tensor, target: Tensor, combine: Combine = "probabilities") -> Tensor:
    r"""Accuracy of the two-model ensemble: argmax of the averaged probabilities (or logits).

    .. math::

        \hat y_i = \arg\max_k \tfrac12 \left(p_{a,ik} + p_{b,ik}\right)

    Example:
        >>> pa = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
        >>> pb = torch.tensor([[0.3, 0.7], [0.8, 0.2]])
        >>> float(ensemble_accuracy(pa, pb, torch.tensor([0, 1])))
        0.5
    """
    return _two(_ensemble_accuracy_compute, preds_a, preds_b, target, combine)


def ensemble_gain(
    preds_a: Tensor,
    preds_b: Tensor,
    target: Tensor,
    reference: Reference = "mean",
    combine: Combine = "probabilities",
) -> Tensor:
    r"""What the two-model ensemble gains in accuracy over its members.

    .. math::

        G_{mean} = \mathrm{acc}(a \oplus b) - \tfrac12(\mathrm{acc}(a) + \mathrm{acc}(b)), \quad
        G_{best} = \mathrm{acc}(a \oplus b) - \max(\mathrm{acc}(a), \mathrm{acc}(b))

    Args:
        reference: ``"mean"`` (over the members' mean accuracy) or ``"best"`` (over the better one).
        combine: ``"probabilities"`` (average the probabilities) or ``"logits"``.

    Example:
        >>> pa = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
        >>> pb = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
        >>> round(float(ensemble_gain(pa, pb, torch.tensor([0, 1, 0]))), 4)  # 2/3 - (2/3 + 1/3) / 2
        0.1667
    """
    return _two(lambda c: _ensemble_gain_compute(c, reference), preds_a, preds_b, target, combine)


def conversion_rate(preds_a: Tensor, preds_b: Tensor, target: Tensor, combine: Combine = "probabilities") -> Tensor:
    r"""The share of inconsistent examples (exactly one model right) the ensemble gets right.

    .. math::

        \mathrm{CR} = \frac{\#\{i : c_{a,i} \oplus c_{b,i},\ \hat y^{ens}_i = y_i\}}{\#\{i : c_{a,i} \oplus c_{b,i}\}}

    NaN when the models are never inconsistent.

    Example:
        >>> pa = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
        >>> pb = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])
        >>> round(float(conversion_rate(pa, pb, torch.tensor([0, 1, 0]))), 4)  # 2 of 3
        0.6667
    """
    return _two(_conversion_rate_compute, preds_a, preds_b, target, combine)


# ---------------------------------------------------------------------------------- pairwise


def pairwise_error_inconsistency(preds: PredictionsLike, target: Tensor) -> Tensor:
    """:func:`error_inconsistency` of every pair of M models: ``[M, M]`` (0 on the diagonal)."""
    return _many(_error_inconsistency_compute, preds, target, None)


def pairwise_error_consistency(preds: PredictionsLike, target: Tensor) -> Tensor:
    """:func:`error_consistency` of every pair of M models: ``[M, M]``."""
    return _many(_error_consistency_compute, preds, target, None)


def pairwise_error_correlation(preds: PredictionsLike, target: Tensor) -> Tensor:
    """:func:`error_correlation` of every pair of M models: ``[M, M]``."""
    return _many(_error_correlation_compute, preds, target, None)


def pairwise_disagreement(preds: PredictionsLike) -> Tensor:
    """:func:`disagreement` of every pair of M models: ``[M, M]``."""
    return _many(_disagreement_compute, preds, None, None, need_target=False)


def pairwise_ensemble_gain(
    preds: PredictionsLike, target: Tensor, reference: Reference = "mean", combine: Combine = "probabilities"
) -> Tensor:
    """:func:`ensemble_gain` of every pair of M models: ``[M, M]`` (0 on the diagonal)."""
    return _many(lambda c: _ensemble_gain_compute(c, reference), preds, target, combine)


def pairwise_conversion_rate(preds: PredictionsLike, target: Tensor, combine: Combine = "probabilities") -> Tensor:
    """:func:`conversion_rate` of every pair of M models: ``[M, M]`` (NaN on the diagonal)."""
    return _many(_conversion_rate_compute, preds, target, combine)


def pairwise_diversity(
    preds: PredictionsLike, target: Tensor, combine: Combine | None = "probabilities"
) -> dict[str, Tensor]:
    """Every metric for every pair of M models at once (one pass): ``{name: [M, M]}`` with the
    names of :data:`PAIRWISE_METRICS`, plus ``"accuracy"`` ``[M]``. The ensemble metrics need
    float inputs (``combine=None`` skips them).

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> out = pairwise_diversity(torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0]]), y, combine=None)
        >>> out["error_inconsistency"]
        tensor([[0.0000, 0.5000, 0.5000],
                [0.5000, 0.0000, 0.5000],
                [0.5000, 0.5000, 0.0000]])
    """
    stacked = stack_predictions(preds)
    _check_nonempty(stacked)
    if combine is not None and not stacked.is_floating_point():
        raise ValueError(
            "the ensemble metrics need probabilities or logits, got integer labels; pass scores, "
            "or combine=None for the label-only metrics"
        )
    counts = _pair_counts_update(stacked, target, combine)
    dtype = torch.get_default_dtype()
    out = {k: v.to(dtype) for k, v in _all_compute(counts).items()}
    out["accuracy"] = _accuracy(counts).to(dtype)
    return out
