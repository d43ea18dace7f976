"""Per-copy data augmentation for the ensemble engine.

An augmentation here is a batch function ``augment(x, generator) -> x'`` that draws all of its
randomness from ``generator`` (a CPU ``torch.Generator``). At optimizer step ``t`` copy ``m``
augments the shared batch with :func:`augmentation_generator(augmentation_seeds[m], t)`, so each
copy sees its own augmentations, the draws do not depend on how copies are chunked, and a resumed
fit redraws exactly what an uninterrupted one would. A separate training reproduces copy ``m`` by
applying ``augment(x, augmentation_generator(seed_m, t))`` to its batch at step ``t``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_tda.ensemble.data import mix_seed

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``augment(x [batch, ...], generator) -> Tensor [batch, ...]``."""


def augmentation_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator copy with augmentation seed ``seed`` uses at optimizer step ``step``."""
    return torch.Generator().manual_seed(mix_seed(seed, step))


def augment_per_copy(
    augment: Augment, x: Tensor, seeds: Sequence[int], step: int, per_copy_inputs: bool = False
) -> Tensor:
    """``[len(seeds), batch, ...]``: the shared batch ``x`` augmented once per copy seed, or with
    ``per_copy_inputs`` row ``k`` of ``x [len(seeds), batch, ...]`` augmented with seed ``k``."""
    return torch.stack([
        augment(x[k] if per_copy_inputs else x, augmentation_generator(seed, step))
        for k, seed in enumerate(seeds)
    ])


class BatchRandomShift:
    """Shift each image of a batch ``[b, C, H, W]`` by its own random offset of up to
    ``max_shift`` pixels in each direction, with zero padding (a batched
    :class:`lightning_tda.data.RandomShift`)."""

    def __init__(self, max_shift: int = 1) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = max_shift

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        s = self.max_shift
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        dy, dx = torch.randint(-s, s + 1, (2, b), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        rows = (torch.arange(h, device=x.device) + s)[None, :] + dy[:, None]  # [b, h]
        cols = (torch.arange(w, device=x.device) + s)[None, :] + dx[:, None]  # [b, w]
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.movedim(1, -1)[batch, rows[:, :, None], cols[:, None, :]]  # [b, h, w, C]
        return out.movedim(-1, 1)
