"""Per-copy loss coefficients of a batch, and compaction of each copy's examples.

Copy ``m``'s loss on a batch is ``sum_i coef[m, i] * loss_m(x_i, y_i)`` with
``coef = mask * weight / Z_m`` (:func:`example_coefficients`; the normalisers ``Z_m`` are
defined in :mod:`lightning_tda.ensemble.module`). Examples with ``coef == 0`` do not count, so
:func:`compaction_indices` lets each copy run only on its own examples.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["mask_count", "batch_size", "weight_sum"]
NORMALIZATIONS: tuple[str, ...] = ("mask_count", "batch_size", "weight_sum")


def example_coefficients(
    index: Tensor | None,
    batch_size: int,
    num_models: int,
    masks: Tensor | None,
    weights: Tensor | None,
    normalization: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[num_models, batch_size]`` coefficients ``mask * weight / Z`` of the batch's examples
    (``index``: their dataset positions, ``[batch]`` for a shared batch or ``[num_models, batch]``
    for per-copy batches; only needed with masks or weights)."""

    def take(table: Tensor) -> Tensor:
        rows = table[:, index] if index.ndim == 1 else table.gather(1, index.to(table.device))
        return rows.to(dtype)

    if masks is None:
        mask = torch.ones(num_models, batch_size, dtype=dtype, device=device)
    else:
        mask = take(masks)
    weight = mask if weights is None else mask * take(weights)
    if normalization == "mask_count":
        denom = mask.sum(1).clamp(min=1.0)
    elif normalization == "batch_size":
        denom = torch.full_like(mask[:, 0], float(batch_size))
    elif normalization == "weight_sum":
        denom = weight.sum(1)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return weight / denom[:, None]


def compaction_indices(coef: Tensor, max_kept: float = 0.8) -> Tensor | None:
    """``[M, K]`` batch positions of each copy's examples (nonzero coefficients, in batch order,
    then zero-coefficient padding up to the largest count ``K``), or ``None`` when ``K`` would
    exceed ``max_kept`` of the batch (too little to skip)."""
    included = coef != 0
    k = max(int(included.sum(1).max()), 1)
    if k > max_kept * coef.shape[1]:
        return None
    return torch.argsort((~included).to(torch.uint8), dim=1, stable=True)[:, :k]


def take_examples(x: Tensor, select: Tensor, per_copy: bool) -> Tensor:
    """``[M, K, ...]``: row ``m`` holds ``x[select[m]]`` (``x`` shared, ``[batch, ...]``) or
    ``x[m, select[m]]`` (``per_copy``: ``x`` is ``[M, batch, ...]``)."""
    if not per_copy:
        return x[select]
    rows = torch.arange(select.shape[0], device=select.device)[:, None]
    return x[rows, select]


def check_index(index: Tensor | None, n_train: int | None) -> None:
    """Raise a clear error when a batch's example indices fall outside ``[0, n_train)``."""
    if n_train is None or index is None or not len(index):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n_train:
        raise IndexError(
            f"a batch holds example index {hi if hi >= n_train else lo}, outside the {n_train} "
            "columns of masks/example_weights; they need one column per training example (len "
            "of the training dataset), and batches the dataset positions (IndexedDataset)"
        )
