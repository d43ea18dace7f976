r"""torchmetrics faces of :mod:`lightning_tda.dcor.functional`: distance correlation accumulated over an
evaluation set.

dCor is not a mean over batches: it needs every sample at once. The metrics therefore keep the
features of every ``update`` in list states (``dist_reduce_fx="cat"``, so under DDP each rank's
rows are gathered before ``compute``) and evaluate the functional estimator on all of them; the
blockwise path keeps that at ``O(n d)`` memory for large evaluation sets. dCor is invariant to a
common permutation of the rows, so the order in which ranks' rows are gathered does not matter;
a ``DistributedSampler`` that pads with repeated examples does change the value slightly (as it
changes any metric), so evaluate on a split whose size the world size divides, or unpadded.
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (used by the doctests)
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_tda.dcor.functional import DEFAULT_BLOCK_SIZE, Method, check_method, resolve_statistic

__all__ = ["DistanceCorrelation", "PartialDistanceCorrelation"]


def _dcor_update(
    names: tuple[str, ...], tensors: tuple[Tensor, ...], widths: list[int | None]
) -> list[Tensor]:
    """Check one batch of paired features and flatten each to ``[batch, width]``; ``widths``
    are those of earlier updates (``None`` for none yet)."""
    flat = []
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [batch, ...], got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"{name} is a scalar; expected a batch of features, shape [batch, ...]")
        flat.append(t.reshape(t.shape[0], -1) if t.ndim > 1 else t[:, None])
    sizes = {t.shape[0] for t in flat}
    if len(sizes) != 1:
        shown = ", ".join(f"{n} has {t.shape[0]}" for n, t in zip(names, flat))
        raise ValueError(f"update got batches of different sizes: {shown}")
    for name, t, width in zip(names, flat, widths):
        if width is not None and width != t.shape[1]:
            raise ValueError(
                f"{name} has {t.shape[1]} features per sample in this update but {width} before; "
                "every update must pass features of the same width"
            )
    return flat


class _FeatureAccumulator(Metric):
    """Keeps paired feature batches in list states; subclasses name the inputs and statistic."""

    is_differentiable = True
    higher_is_better = None
    full_state_update = False

    _inputs: tuple[str, ...] = ()
    _partial = False

    def __init__(
        self,
        statistic: str,
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.statistic = statistic
        self._fn = resolve_statistic(statistic, partial=self._partial)
        check_method(method, block_size)
        self.method = method
        self.block_size = block_size
        for name in self._inputs:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _update(self, *tensors: Tensor) -> None:
        states = [getattr(self, name) for name in self._inputs]
        widths = [state[0].shape[1] if state else None for state in states]
        for state, t in zip(states, _dcor_update(self._inputs, tensors, widths)):
            state.append(t)

    def compute(self) -> Tensor:
        first = getattr(self, self._inputs[0])  # a list, or one tensor after a DDP sync
        if isinstance(first, list) and not first:
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        tensors = [dim_zero_cat(getattr(self, name)) for name in self._inputs]
        return self._fn(*tensors, method=self.method, block_size=self.block_size)


class DistanceCorrelation(_FeatureAccumulator):
    r"""Distance correlation between two feature spaces over everything passed to ``update``.

    .. math::

        \mathcal{R}_n(X, Y) = \sqrt{\frac{\mathcal{V}^2_n(X, Y)}
            {\sqrt{\mathcal{V}^2_n(X, X)\, \mathcal{V}^2_n(Y, Y)}}}

    computed on the concatenation of all updates (and, under DDP, of all ranks).

    Args:
        statistic: a name from :data:`lightning_tda.dcor.STATISTICS`: ``"distance_correlation"``
            (biased dCor, the default), ``"distance_correlation_sqr"``,
            ``"u_distance_correlation_sqr"`` (bias-corrected, needs ``n >= 4``), or the
            covariances.
        method: ``"auto"``, ``"dense"`` or ``"blockwise"`` (see :mod:`lightning_tda.dcor.functional`).
        block_size: tile size of the blockwise path (``None``: by device).
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``...).

    ``update(x, y)`` takes ``x`` of shape ``[batch, ...]`` and ``y`` of shape ``[batch, ...]``
    (flattened to ``[batch, d_x]`` and ``[batch, d_y]``; the widths may differ but must stay the
    same across updates). ``compute()`` returns a scalar tensor.

    Example:
        >>> metric = DistanceCorrelation()
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(3):
        ...     x = torch.randn(16, 4, generator=g)
        ...     metric.update(x, x[:, :2] ** 2)
        >>> bool(metric.compute() > 0.5)
        True
    """

    _inputs = ("x", "y")

    def __init__(
        self,
        statistic: str = "distance_correlation",
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(statistic, method, block_size, **kwargs)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch of paired features ``x`` [batch, ...] and ``y`` [batch, ...]."""
        self._update(x, y)


class PartialDistanceCorrelation(_FeatureAccumulator):
    r"""Partial distance correlation of two feature spaces given a third, over an evaluation set.

    ``statistic`` is ``"partial_distance_correlation"`` (Székely & Rizzo 2014, the default),
    ``"semi_partial_distance_correlation"`` (only ``x`` projected off ``z``, as in the public code
    of Zhen et al. 2022) or ``"partial_distance_covariance"``. ``update(x, y, z)`` takes three
    ``[batch, ...]`` tensors; needs ``n >= 4`` in total. Other arguments as in
    :class:`DistanceCorrelation`.
    """

    _inputs = ("x", "y", "z")
    _partial = True

    def __init__(
        self,
        statistic: str = "partial_distance_correlation",
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(statistic, method, block_size, **kwargs)

    def update(self, x: Tensor, y: Tensor, z: Tensor) -> None:
        """Add a batch of features ``x``, ``y`` and ``z``, each [batch, ...]."""
        self._update(x, y, z)
