r"""Temperature scaling (Guo et al., 2017): one scalar per model, fitted on held-out data.

Models trained differently are calibrated differently (an over-confident model dominates a
probability average), so each member is temperature-scaled on a held-out split before
ensembling, as the seed paper found necessary. The temperature :math:`T` minimises the held-out
negative log-likelihood of ``softmax(logits / T)``; in :math:`\beta = 1/T` that loss is convex,

.. math::

    \mathrm{NLL}(\beta) = \frac1n \sum_i \Big(\log \sum_k e^{\beta z_{ik}} - \beta z_{i y_i}\Big),
    \qquad \mathrm{NLL}'(\beta) = \frac1n \sum_i \big(\mathbb{E}_{p_\beta}[z_i] - z_{i y_i}\big),

so its derivative is increasing and the minimiser is found by bisection on it (exact to float64,
deterministic, no learning rate). It never changes a model's predicted labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fit_temperature", "negative_log_likelihood", "temperature_scale"]

DEFAULT_BOUNDS = (1e-2, 1e2)


def _logits(scores: Tensor, name: str) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n, num_classes], got {type(scores).__name__}")
    if not scores.is_floating_point() or scores.ndim != 2:
        raise ValueError(
            f"temperature scaling needs logits or probabilities of shape [n, num_classes]; {name} is "
            f"{scores.dtype} {tuple(scores.shape)} (predicted labels cannot be rescaled)"
        )
    return scores.detach().double()


def _check(logits: Tensor, target: Tensor) -> Tensor:
    if not isinstance(target, Tensor) or target.is_floating_point() or target.ndim != 1:
        raise ValueError("target must be integer labels of shape [n]")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} examples but target has {target.shape[0]}")
    if logits.shape[0] == 0:
        raise ValueError("temperature scaling needs a non-empty held-out split")
    return target.long()


def negative_log_likelihood(logits: Tensor, target: Tensor, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against ``target``."""
    z = _logits(logits, "logits")
    y = _check(z, target)
    return float(torch.nn.functional.cross_entropy(z / temperature, y))


def _slope(z: Tensor, y: Tensor, beta: float) -> float:
    """d NLL / d beta at ``beta`` (see the module docstring)."""
    p = torch.softmax(beta * z, dim=1)
    return float(((p * z).sum(1) - z.gather(1, y[:, None]).squeeze(1)).mean())


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    iterations: int = 60,
) -> float:
    r"""The temperature :math:`T \in` ``bounds`` that minimises the NLL of ``logits / T``.

    Args:
        logits: ``[n, C]`` held-out logits (or log-probabilities; probabilities are accepted too
            and read as ``log p``).
        target: ``[n]`` held-out labels.
        bounds: the range searched; the minimiser is clipped to it (a held-out split the model
            separates perfectly drives :math:`T \to 0`).
        iterations: bisection steps on :math:`\log \beta` (60 reach float64 resolution).

    Example:
        >>> z = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
        >>> T = fit_temperature(z, torch.tensor([0, 1, 1, 0]))  # half wrong: flatten fully
        >>> T == 100.0
        True
    """
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    z = _logits(logits, "logits")
    y = _check(z, target)
    if bool(((z >= 0) & (z <= 1)).all()) and torch.allclose(z.sum(1), torch.ones(len(z), dtype=z.dtype), atol=1e-4):
        z = z.clamp_min(1e-300).log()  # probabilities: their logs are logits
    z = torch.where(torch.isfinite(z), z, torch.full_like(z, -1e30))  # log 0 as a huge negative
    b_lo, b_hi = math.log(1 / high), math.log(1 / low)
    if _slope(z, y, math.exp(b_lo)) >= 0:
        return float(high)
    if _slope(z, y, math.exp(b_hi)) <= 0:
        return float(low)
    for _ in range(iterations):
        mid = (b_lo + b_hi) / 2
        if _slope(z, y, math.exp(mid)) > 0:
            b_hi = mid
        else:
            b_lo = mid
    return float(1 / math.exp((b_lo + b_hi) / 2))


def temperature_scale(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (same dtype); the predicted labels do not change."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature
