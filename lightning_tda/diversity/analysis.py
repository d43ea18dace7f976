"""From M models' logits on an evaluation split (and a held-out split) to a ``DiversityResult``.

The steps, as the seed paper runs them: temperature-scale each model on the held-out split,
then compare every pair on the evaluation split (error inconsistency and the other metrics of
:mod:`~lightning_tda.diversity.functional`) and ensemble it (probability averaging by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tda.diversity.categories import DEFAULT_CATEGORY_ORDER, check_descriptions
from lightning_tda.diversity.functional import PAIRWISE_METRICS, _accuracy, _all_compute, _pair_counts_update
from lightning_tda.diversity.inputs import COMBINES, PredictionsLike, check_target, ensemble_scores, stack_predictions
from lightning_tda.diversity.result import DiversityResult
from lightning_tda.diversity.temperature import DEFAULT_BOUNDS, fit_temperature

__all__ = ["CalibratedOutputs", "DiversitySettings", "HeldOut", "analyze_diversity", "calibrate", "diversity_of", "split_held_out"]

HeldOut = tuple[PredictionsLike, Tensor | np.ndarray] | float | None
"""A held-out split: ``(logits [M, h, C], labels [h])``, a fraction of the evaluation examples
to set aside (seeded), or None (then ``temperature_scaling`` must be off)."""


@dataclass(frozen=True)
class DiversitySettings:
    """How models are compared.

    Args:
        combine: the ensemble averages ``"probabilities"`` (default) or ``"logits"``.
        temperature_scaling: fit one temperature per model on the held-out split first (the seed
            paper found it necessary: members trained differently are calibrated differently).
        temperature_bounds: the range of temperatures searched.
        category_order: the factors that describe models, least to most divergent; a pair's
            category is the most divergent one on which the two differ.
        confidence_level: of the per-category intervals over pairs.
        split_seed: the seed of the held-out split when ``held_out`` is a fraction.
        anchors: names of base models. Pairs with a base model each differ by the factors its
            other model changes, so their per-category table (logged besides the one of all
            pairs) isolates one factor at a time, as the seed paper pairs every model with a
            base ResNet-50.
    """

    combine: Literal["probabilities", "logits"] = "probabilities"
    temperature_scaling: bool = True
    temperature_bounds: tuple[float, float] = DEFAULT_BOUNDS
    category_order: tuple[str, ...] = DEFAULT_CATEGORY_ORDER
    confidence_level: float = 0.95
    split_seed: int = 0
    anchors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {self.confidence_level}")
        low, high = self.temperature_bounds
        if not 0 < low < high:
            raise ValueError(f"temperature_bounds must satisfy 0 < low < high, got {self.temperature_bounds}")


def split_held_out(n: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(evaluation rows, held-out rows)``: a seeded random ``fraction`` of ``n`` rows held out
    (each part sorted, at least one row each)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"a held-out fraction must be in (0, 1), got {fraction!r}")
    k = int(round(fraction * n))
    if k < 1 or k > n - 1:
        raise ValueError(f"a held-out fraction of {fraction} of {n} examples leaves an empty split; use more examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[k:].sort().values, order[:k].sort().values


def _logits(preds: PredictionsLike, what: str) -> Tensor:
    stacked = stack_predictions(preds, what)
    if not stacked.is_floating_point():
        raise ValueError(
            f"{what} are predicted labels; the diversity analysis ensembles and temperature-scales "
            "models, so it needs logits or probabilities ([M, n, num_classes])"
        )
    return ensemble_scores(stacked, "logits")  # float64 logits (log-probabilities for probabilities)


def _nll(z: Tensor, y: Tensor) -> np.ndarray:
    """Per-model mean NLL of logits ``[M, n, C]``."""
    if z.shape[1] == 0:
        return np.full(z.shape[0], math.nan)
    logp = torch.log_softmax(z, dim=-1)
    return (-logp.gather(2, y[None, :, None].expand(z.shape[0], -1, 1)).squeeze(2)).mean(1).numpy()


def _names(names: Sequence[str] | None, M: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"model_{m}" for m in range(M))
    names = tuple(str(n) for n in names)
    if len(names) != M:
        raise ValueError(f"got {len(names)} names for {M} models")
    if len(set(names)) != M:
        raise ValueError(f"model names must be unique, got {names}")
    return names


@dataclass(frozen=True)
class CalibratedOutputs:
    """M models' logits on the evaluation and held-out splits, before (``raw_*``) and after
    temperature scaling (float64, ``[M, n, C]``), with the labels and the temperatures."""

    logits: Tensor
    target: Tensor
    held_out_logits: Tensor
    held_out_target: Tensor
    raw_logits: Tensor
    raw_held_out_logits: Tensor
    temperatures: np.ndarray


def calibrate(
    logits: PredictionsLike,
    target: Tensor | np.ndarray,
    held_out: HeldOut = None,
    settings: DiversitySettings = DiversitySettings(),
) -> CalibratedOutputs:
    """Check the models' outputs, set the held-out split aside and fit one temperature per model
    on it (see :func:`analyze_diversity` for the arguments)."""
    z = _logits(logits, "logits")
    M = z.shape[0]
    y = check_target(torch.as_tensor(target), z.shape[1], z.shape[2])
    if isinstance(held_out, tuple):
        if len(held_out) != 2:
            raise ValueError("held_out must be (logits, labels), a fraction, or None")
        held_z = _logits(held_out[0], "held-out logits")
        if held_z.shape[0] != M or held_z.shape[2] != z.shape[2]:
            raise ValueError(
                f"held-out logits are {tuple(held_z.shape)} but the evaluation logits {tuple(z.shape)}: "
                "the same models (and classes) must be run on both splits"
            )
        held_y = check_target(torch.as_tensor(held_out[1]), held_z.shape[1], z.shape[2])
    elif held_out is not None:
        rows, held_rows = split_held_out(z.shape[1], held_out, settings.split_seed)
        held_z, held_y, z, y = z[:, held_rows], y[held_rows], z[:, rows], y[rows]
    else:
        if settings.temperature_scaling:
            raise ValueError(
                "temperature scaling needs a held-out split, and none was given: pass held_out="
                "(logits, labels) of examples no model trained on, or a fraction of the evaluation "
                "examples (held_out=0.5), or turn it off with DiversitySettings(temperature_scaling=False)"
            )
        held_z, held_y = z[:, :0], y[:0]
    if settings.temperature_scaling and held_z.shape[1] == 0:
        raise ValueError("temperature scaling needs a non-empty held-out split")
    if settings.temperature_scaling:
        temps = np.array([fit_temperature(held_z[m], held_y, settings.temperature_bounds) for m in range(M)])
    else:
        temps = np.ones(M)
    scale = torch.as_tensor(temps, dtype=z.dtype)[:, None, None]
    return CalibratedOutputs(z / scale, y, held_z / scale, held_y, z, held_z, temps)


def analyze_diversity(
    logits: PredictionsLike,
    target: Tensor | np.ndarray,
    held_out: HeldOut = None,
    *,
    names: Sequence[str] | None = None,
    descriptions: Sequence[Mapping[str, Any]] | None = None,
    settings: DiversitySettings = DiversitySettings(),
) -> DiversityResult:
    """Compare M >= 2 models from their outputs.

    Args:
        logits: ``[M, n, C]`` logits or probabilities on the evaluation split (or a sequence of
            ``[n, C]``).
        target: ``[n]`` labels of the evaluation split.
        held_out: the split temperatures are fitted on (:data:`HeldOut`); required when
            ``settings.temperature_scaling``.
        names: one unique name per model (default ``model_0``, ...).
        descriptions: per model, its factors (``{"seed": 0, "architecture": "cnn", ...}``, keys
            from ``settings.category_order``); pairs are grouped by what differs.
    """
    return diversity_of(calibrate(logits, target, held_out, settings), names=names, descriptions=descriptions, settings=settings)


def diversity_of(
    outputs: CalibratedOutputs,
    *,
    names: Sequence[str] | None = None,
    descriptions: Sequence[Mapping[str, Any]] | None = None,
    settings: DiversitySettings = DiversitySettings(),
) -> DiversityResult:
    """The :class:`DiversityResult` of calibrated outputs (:func:`calibrate`)."""
    scaled, y = outputs.logits, outputs.target
    M = scaled.shape[0]
    if M < 2:
        raise ValueError(f"diversity compares models pairwise: pass at least 2 models, got {M}")
    names = _names(names, M)
    missing = sorted(set(settings.anchors) - set(names))
    if missing:
        raise ValueError(f"anchors {missing} are not model names ({list(names)})")
    desc = check_descriptions(descriptions if descriptions is not None else [{} for _ in range(M)], M, settings.category_order)
    counts = _pair_counts_update(scaled, y, settings.combine)  # float64 metrics (no cast)
    metrics = {**_all_compute(counts), "accuracy": _accuracy(counts)}
    probs = torch.softmax(scaled, dim=-1)
    return DiversityResult(
        names=names,
        descriptions=tuple(desc),
        category_order=tuple(settings.category_order),
        combine=settings.combine,
        temperature_scaling=settings.temperature_scaling,
        n_held_out=int(outputs.held_out_target.shape[0]),
        accuracy=metrics["accuracy"].double().numpy(),
        temperatures=np.asarray(outputs.temperatures, dtype=np.float64),
        nll_before=_nll(outputs.raw_logits, y),
        nll_after=_nll(scaled, y),
        held_out_nll_before=_nll(outputs.raw_held_out_logits, outputs.held_out_target),
        held_out_nll_after=_nll(outputs.held_out_logits, outputs.held_out_target),
        **{name: metrics[name].double().numpy() for name in PAIRWISE_METRICS},
        predictions=scaled.argmax(-1).numpy(),
        correct_class_probability=probs.gather(2, y[None, :, None].expand(M, -1, 1)).squeeze(2).float().numpy(),
        target=y.numpy(),
        confidence_level=settings.confidence_level,
        anchors=tuple(settings.anchors),
    )
