r"""A distance-correlation loss term for any training loop, and weight schedules for it.

:class:`DistanceCorrelationLoss` is a plain ``nn.Module``: add ``weight * loss(features, others)``
to any loss (:class:`~lightning_tda.dcor.penalty.DistanceCorrelationPenalty` does that for a
LightningModule without editing it).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from lightning_tda.dcor.functional import (
    DEFAULT_BLOCK_SIZE,
    PARTIAL_STATISTICS,
    Method,
    check_method,
    resolve_statistic,
)

__all__ = ["DistanceCorrelationLoss", "Signal", "Target", "linear_warmup"]

Target = Literal["decorrelate", "correlate"]
_TARGETS = ("decorrelate", "correlate")

Signal = Callable[[Any], Tensor] | Literal["labels"]
"""What a partial penalty correlates with: ``"labels"`` (the batch's labels, one-hot) or a
function ``batch -> [batch, ...]`` tensor (e.g. a label embedding)."""


class DistanceCorrelationLoss(nn.Module):
    r"""A distance-correlation loss term between a batch of features and one or more others.

    ``loss(x, y)`` is ``statistic(x, y)`` for ``target="decorrelate"`` and
    ``1 - statistic(x, y)`` for ``"correlate"``; with a list ``y = [y_1, ..., y_m]`` the
    statistic is averaged over them first. Features are ``[batch, ...]`` (flattened), of any
    widths.

    With a partial statistic (a name from :data:`lightning_tda.dcor.PARTIAL_STATISTICS`),
    ``loss(x, y, given=z)`` uses ``statistic(x, y; z)``, averaged over a list ``z``: ``y`` is then
    one tensor (the signal, e.g. one-hot labels) and ``z`` the features conditioned on.

    Args:
        statistic: a name from :data:`lightning_tda.dcor.STATISTICS` or
            :data:`~lightning_tda.dcor.PARTIAL_STATISTICS`; the default
            ``"distance_correlation_sqr"`` (biased squared dCor, in ``[0, 1]``, smooth at 0) is
            what the seed's code penalises. ``"distance_correlation"`` has an unbounded gradient
            near 0; ``"u_distance_correlation_sqr"`` is bias-corrected (may be negative).
        target: ``"decorrelate"`` or ``"correlate"``.
        normalize: L2-normalise each sample's flattened features first (``x`` and ``y``; for a
            partial statistic ``x`` and ``given``, never the signal).
        method, block_size: the functional path (:mod:`lightning_tda.dcor.functional`).
        check_finite: raise a clear error on NaN/inf features (one device sync per call).

    Example:
        >>> loss_fn = DistanceCorrelationLoss()
        >>> x = torch.randn(32, 8, requires_grad=True)
        >>> loss = loss_fn(x, torch.randn(32, 3))
        >>> loss.backward()
    """

    def __init__(
        self,
        statistic: str = "distance_correlation_sqr",
        target: Target = "decorrelate",
        normalize: bool = False,
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        check_method(method, block_size)
        self.statistic = statistic
        self.partial = statistic in PARTIAL_STATISTICS
        self._fn = resolve_statistic(statistic, partial=self.partial)
        self.target = target
        self.normalize = normalize
        self.method = method
        self.block_size = block_size
        self.check_finite = check_finite

    def values(
        self, x: Tensor, y: Tensor | Sequence[Tensor], given: Tensor | Sequence[Tensor] | None = None
    ) -> Tensor:
        """The statistic between ``x`` and each of ``y``: shape ``[len(y)]`` (``[1]`` for one);
        for a partial statistic, between ``x`` and the signal ``y`` given each of ``given``."""
        keywords = dict(method=self.method, block_size=self.block_size, check_finite=self.check_finite)
        if self.partial:
            if given is None:
                raise ValueError(
                    f"statistic {self.statistic!r} is partial: pass given=features to condition on "
                    "(a tensor or a list of them)"
                )
            if not isinstance(y, Tensor):
                raise TypeError(
                    f"with the partial statistic {self.statistic!r}, y is one tensor (the signal), "
                    f"got {type(y).__name__}"
                )
            zs = _as_list(given, "given")
            x, signal = self._features(x), _flat(y)
            return torch.stack([self._fn(x, signal, self._features(z), **keywords) for z in zs])
        if given is not None:
            raise ValueError(
                f"given= is for partial statistics {sorted(PARTIAL_STATISTICS)}; {self.statistic!r} "
                "compares two feature sets"
            )
        ys = _as_list(y, "y")
        x = self._features(x)
        return torch.stack([self._fn(x, self._features(other), **keywords) for other in ys])

    def loss_from_values(self, values: Tensor) -> Tensor:
        """The loss for statistics ``values`` (from :meth:`values`)."""
        mean = values.mean()
        return mean if self.target == "decorrelate" else 1.0 - mean

    def forward(
        self, x: Tensor, y: Tensor | Sequence[Tensor], given: Tensor | Sequence[Tensor] | None = None
    ) -> Tensor:
        return self.loss_from_values(self.values(x, y, given))

    def _features(self, t: Tensor) -> Tensor:
        t = _flat(t)
        if self.normalize:
            t = nn.functional.normalize(t, dim=1)
        return t

    def extra_repr(self) -> str:
        return f"statistic={self.statistic!r}, target={self.target!r}, normalize={self.normalize}"


def _flat(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"features must be tensors of shape [batch, ...], got {type(t).__name__}")
    return t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)


def _as_list(t: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    ts = [t] if isinstance(t, Tensor) else list(t)
    if not ts:
        raise ValueError(f"{name}: need at least one tensor to compare x with, got an empty sequence")
    return ts


def linear_warmup(weight: float, steps: int) -> Callable[[int], float]:
    """A weight schedule for :class:`DistanceCorrelationPenalty`: ``weight * min(1, step / steps)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return partial(_linear_warmup, float(weight), int(steps))


def _linear_warmup(weight: float, steps: int, step: int) -> float:
    return weight * min(1.0, step / steps)
