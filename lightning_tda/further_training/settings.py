"""Settings of a further-training run, validated once for the function and the LightningModule."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

Mode = Literal["remove", "upweight"]
OptimizerName = Literal["sgd", "adam"]


@dataclass(frozen=True)
class FurtherTrainingSettings:
    """How each copy is further trained from the final model.

    Args:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (with ``betas``).
        lr: learning rate.
        batch_size: examples a step; ``None`` is full-batch gradient descent.
        weight_decay: L2 penalty ``weight_decay / 2 * ||theta||^2`` added to every copy's loss
            (the optimizer's ``weight_decay``).
        momentum: SGD momentum (0: plain SGD, as in the seed paper).
        betas: Adam's coefficients.
        mode: ``"remove"``: copy ``i`` drops instance ``i`` from its batches (the batch mean is
            over the remaining examples); ``"upweight"``: copy ``i`` weights instance ``i`` by
            ``1 + n * eps`` in the batch mean, i.e. it minimises
            ``(1/n) sum_j loss_j + eps * loss_i`` (Koh & Liang's up-weighting; ``eps = -1/n``
            gives weight 0: a removal in expectation, and exactly with full batches).
        eps: the up-weighting ``eps`` (``mode="upweight"`` only).
        center: subtract, per test example, step and seed, the mean over the left-out instances
            (the seed paper's optional centering).
        chunk_size: copies per vmap call (memory); ``None`` runs all copies of a seed at once.
        keep_per_seed: keep every seed's scores in the result (for re-averaging over fewer seeds
            or switching centering later); otherwise only their mean and standard error.
    """

    optimizer: OptimizerName = "sgd"
    lr: float = 0.01
    batch_size: int | None = 64
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    mode: Mode = "remove"
    eps: float | None = None
    center: bool = False
    chunk_size: int | None = None
    keep_per_seed: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None (full batch), got {self.batch_size!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.mode not in ("remove", "upweight"):
            raise ValueError(f"mode must be 'remove' or 'upweight', got {self.mode!r}")
        if self.mode == "remove" and self.eps is not None:
            raise ValueError("eps is the up-weighting of mode='upweight'; mode='remove' takes no eps")
        if self.mode == "upweight" and (self.eps is None or not self.eps == self.eps or self.eps == 0):
            raise ValueError(
                f"mode='upweight' needs a nonzero eps (the weight of instance i becomes 1 + n * eps; "
                f"eps = -1/n removes it in expectation), got eps={self.eps!r}"
            )
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {self.chunk_size!r}")

    def check_weights(self, n_train: int) -> None:
        """Refuse an ``eps`` that makes an instance's weight ``1 + n * eps`` negative."""
        if self.mode == "upweight":
            assert self.eps is not None
            weight = 1.0 + n_train * self.eps
            if weight < 0:
                raise ValueError(
                    f"eps={self.eps} gives instance weight 1 + n * eps = {weight:.4g} < 0 with n={n_train} "
                    f"training examples; eps must be >= -1/n = {-1.0 / n_train:.4g} (-1/n removes the instance)"
                )

    def describe(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer, "lr": float(self.lr), "batch_size": self.batch_size,
            "weight_decay": float(self.weight_decay), "momentum": float(self.momentum),
            "mode": self.mode, "eps": None if self.eps is None else float(self.eps),
        }


def check_steps(steps: Sequence[int] | int) -> tuple[int, ...]:
    """The evaluation schedule: strictly increasing positive step counts ``K``."""
    values = [steps] if isinstance(steps, int) else list(steps)
    if not values:
        raise ValueError("steps is empty: give at least one number of further-training steps K >= 1")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"steps must be integers (optimizer steps), got {k!r}")
    values = [int(k) for k in values]
    if values[0] < 1:
        raise ValueError(
            f"steps must be >= 1 (K = {values[0]} further-training steps leaves the final model unchanged: "
            "every score would be 0)"
        )
    bad = [(a, b) for a, b in zip(values, values[1:]) if b <= a]
    if bad:
        raise ValueError(f"steps must be strictly increasing, got {values} ({bad[0][1]} after {bad[0][0]})")
    return tuple(values)


def check_seeds(seeds: Sequence[int] | int) -> tuple[int, ...]:
    """Seeds to average over: ``S`` (an int) means ``0..S-1``."""
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int count or a sequence of ints")
    if isinstance(seeds, numbers.Integral):
        seeds = int(seeds)
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (how many seeds to average over), got {seeds}")
        return tuple(range(seeds))
    values = tuple(int(s) for s in seeds)
    if not values:
        raise ValueError("seeds is empty")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds must be distinct (a repeated seed repeats the same run), got {values}")
    return values


def check_instances(instances: Sequence[int] | Tensor, n_train: int) -> Tensor:
    """Left-out instances as an int64 tensor of distinct positions in ``[0, n_train)``."""
    values = torch.as_tensor(instances)
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.ndim != 1:
        raise TypeError(f"instances must be a 1-d sequence of integer positions, got {tuple(values.shape)} {values.dtype}")
    values = values.to(torch.int64)
    if values.numel() == 0:
        raise ValueError("instances is empty: give the training positions to leave out")
    bad = values[(values < 0) | (values >= n_train)]
    if bad.numel():
        raise IndexError(
            f"instance index {int(bad[0])} is out of range for a training set of {n_train} examples "
            f"(valid: 0..{n_train - 1})"
        )
    if values.unique().numel() != values.numel():
        raise ValueError("instances must be distinct positions (a repeated instance repeats the same run)")
    return values
