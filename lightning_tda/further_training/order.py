"""The further-training batch order: seed ``s`` fixes every batch, and a leave-one-out run sees
exactly the full run's batches with its left-out instance taken out.

Definition (what the batched engine, the Lightning module and the tests all use): with ``n``
training examples and batch size ``b``, an epoch has ``ceil(n / b)`` steps; epoch ``e`` of seed
``s`` visits ``SeededShuffleSampler(n, seed=s)``'s permutation of epoch ``e`` (a function of
``(s, e)`` alone) in consecutive slices of ``b`` (the last one shorter when ``b`` does not divide
``n``). Global step ``t`` (0-based) is slice ``t mod ceil(n/b)`` of epoch ``t div ceil(n/b)``.
The leave-one-out run of instance ``i`` takes the same slices with ``i`` removed, so the one batch
of each epoch that held ``i`` has ``b - 1`` examples and every other batch is identical.

This differs from the seed paper's public code, which removes ``i`` from the permutation and then
re-slices (every later batch shifts by one example); here the two runs share all other batches,
which is what lets them run as copies of one vmapped step on one shared batch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_tda.ensemble import SeededShuffleSampler


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """Optimizer steps in one pass over ``n`` examples (``batch_size=None``: full batch, 1)."""
    if batch_size is None or batch_size >= n:
        return 1
    return math.ceil(n / batch_size)


def epoch_steps(epochs: Sequence[int] | int, n: int, batch_size: int | None) -> tuple[int, ...]:
    """Global step counts at the ends of the given (1-based) epochs: a ``steps`` schedule in
    epochs, e.g. ``epoch_steps(range(1, 26), n_train, 64)``."""
    epochs = [epochs] if isinstance(epochs, int) else list(epochs)
    per_epoch = steps_per_epoch(n, batch_size)
    return tuple(int(e) * per_epoch for e in epochs)


class BatchOrder:
    """The batches of one seed: :meth:`batch` ``(t)`` is the tensor of example positions of global
    step ``t`` (module docstring; with full batches, ``0..n-1`` in order). Permutations are
    cached one epoch at a time."""

    def __init__(self, n: int, batch_size: int | None, seed: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the training set must have at least one example, got n={n!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
        self.n = n
        self.batch_size = n if batch_size is None else min(int(batch_size), n)
        self.seed = int(seed)
        self.per_epoch = steps_per_epoch(n, self.batch_size)
        self._epoch: int | None = None
        self._perm: Tensor | None = None

    def permutation(self, epoch: int) -> Tensor:
        """Epoch ``epoch``'s order of all ``n`` examples (the full run's)."""
        if self._epoch != epoch:
            sampler = SeededShuffleSampler(self.n, seed=self.seed)
            sampler.set_epoch(epoch)
            self._perm = torch.tensor(list(iter(sampler)), dtype=torch.int64)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, step: int) -> Tensor:
        """Example positions of global step ``step`` (0-based) in the full run."""
        if self.batch_size >= self.n:  # full batch: every step is the whole set (order is moot)
            return torch.arange(self.n)
        epoch, slot = divmod(int(step), self.per_epoch)
        b = self.batch_size
        return self.permutation(epoch)[slot * b : (slot + 1) * b]


class SameOrderBatchSampler(Sampler[list[int]]):
    """Batches of one further-training run for an ordinary ``DataLoader``: the full run
    (``leave_out=None``) or the leave-one-out run of ``leave_out``, for ``num_steps`` steps of
    seed ``seed`` (module docstring). A plain, sequential further training with this sampler is
    what each copy of the batched engine equals (tested).

    A batch that held only the left-out example is yielded empty; a ``DataLoader`` cannot collate
    an empty batch, so use ``batch_size >= 2`` (the batched engine takes such a step with loss 0).
    """

    def __init__(
        self, n: int, batch_size: int | None, seed: int, num_steps: int, leave_out: int | None = None
    ) -> None:
        self.order = BatchOrder(n, batch_size, seed)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if leave_out is not None and not 0 <= leave_out < n:
            raise IndexError(f"leave_out={leave_out} is outside the training set's {n} examples")
        self.num_steps = int(num_steps)
        self.leave_out = leave_out

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.num_steps):
            batch = self.order.batch(t)
            if self.leave_out is not None:
                batch = batch[batch != self.leave_out]
            yield batch.tolist()
