"""Per-copy batch streams: each copy of an ensemble draws its own batches from its own subset.

With the shared stream (:func:`~lightning_tda.ensemble.data.indexed_loader`) every copy sees the
same batch of ``B`` examples and masks out those outside its subset, so with ``alpha = 0.5`` a
copy trains on about ``B / 2`` examples a step, a number that varies from step to step (and the
ensemble computes on the padding, or on the whole batch). A per-copy stream gives copy ``m``
exactly ``batch_size`` examples of its own subset at every step, so nothing is masked out.

What copy ``m`` sees (the definition the tests hold the loader to): with ``subset_m`` its mask
row's example positions in increasing order and ``s`` their number (equal for every copy), the
batches of epoch ``e`` are those of

    ``indexed_loader(Subset(dataset, subset_m), batch_size, seed=per_copy_seed(seed, m))``

(a :class:`~lightning_tda.ensemble.data.SeededShuffleSampler` over the subset), with each
position mapped back to the full dataset's. Every epoch has ``ceil(s / batch_size)`` steps (the
last one shorter, the same for every copy) or ``s // batch_size`` with ``drop_last``.

A batch is ``(x [M, b, ...], y [M, b, ...], index [M, b])``; :class:`EnsembleModule` recognises
it by the 2-d index and runs copy ``m`` on row ``m``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lightning_tda.ensemble.data import IndexedDataset, check_masks, mix_seed


def per_copy_seed(seed: int, m: int) -> int:
    """The :class:`SeededShuffleSampler` seed of copy ``m``'s stream in a per-copy loader."""
    return mix_seed(seed, m)


def _subsets(masks: Tensor | None, num_models: int | None, n: int) -> list[Tensor]:
    if masks is None:
        if num_models is None or num_models < 1:
            raise ValueError("per-copy streams need masks [M, n] or num_models (each copy on all examples)")
        return [torch.arange(n)] * num_models
    masks = check_masks(masks, masks.shape[0] if torch.is_tensor(masks) else len(masks))
    if num_models is not None and masks.shape[0] != num_models:
        raise ValueError(f"masks have {masks.shape[0]} rows but num_models={num_models}")
    if masks.shape[1] != n:
        raise ValueError(f"masks have {masks.shape[1]} columns but the dataset has {n} examples")
    sizes = masks.sum(1)
    if bool((sizes != sizes[0]).any()) or int(sizes[0]) == 0:
        raise ValueError(
            f"per-copy streams need every copy's subset to have the same, nonzero size (so all "
            f"copies take the same steps), got sizes from {int(sizes.min())} to {int(sizes.max())}; "
            "draw the masks with random_subset_masks (exactly round(alpha * n) each) or use the "
            "shared stream (indexed_loader)"
        )
    return [row.nonzero().flatten() for row in masks]


class _EpochHolder(Sampler[int]):
    """Holds the epoch of a :class:`PerCopyBatchSampler`: Lightning calls ``set_epoch`` on
    ``dataloader.batch_sampler.sampler``, not on the batch sampler itself."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(())


class PerCopyBatchSampler(Sampler[list[int]]):
    """Yields, per step, the ``M * b`` dataset positions of one per-copy batch (copy-major: copy
    ``m``'s ``b`` positions are entries ``m*b:(m+1)*b``); the streams are defined in the module
    docstring. ``set_epoch`` (Lightning calls it on ``.sampler``) makes a resumed fit see the
    same batches.

    Args:
        masks: ``BoolTensor[M, n]``, every row with the same number of ``True``; or ``None`` with
            ``num_models`` (every copy on all ``n`` examples, each in its own order).
        batch_size: examples per copy per step.
        n: the dataset's size (``masks.shape[1]`` when masks are given).
        seed: the stream seed; copy ``m`` shuffles with ``per_copy_seed(seed, m)``. Use a seed
            unrelated to the masks' (``random_subset_masks(seed=s)`` rows and a loader seed
            ``s`` draw from the same ``mix_seed(s, k)`` values).
        drop_last: drop each epoch's last, shorter step.
    """

    def __init__(
        self,
        masks: Tensor | None,
        batch_size: int,
        n: int | None = None,
        num_models: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if n is None:
            if masks is None:
                raise ValueError("pass n (the dataset's size) when no masks are given")
            n = int(masks.shape[1])
        self.subsets = _subsets(masks, num_models, int(n))
        self.num_models, self.subset_size = len(self.subsets), len(self.subsets[0])
        self.batch_size, self.seed, self.drop_last = batch_size, int(seed), drop_last
        self.sampler = _EpochHolder()
        if drop_last and self.subset_size < batch_size:
            raise ValueError(
                f"drop_last with batch_size={batch_size} > the subset size {self.subset_size} "
                "leaves no step"
            )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        s, b = self.subset_size, self.batch_size
        return s // b if self.drop_last else math.ceil(s / b)

    def orders(self, epoch: int | None = None) -> Tensor:
        """``[M, s]``: each copy's examples (dataset positions) in the order of ``epoch``."""
        epoch = self.epoch if epoch is None else int(epoch)
        rows = []
        for m, subset in enumerate(self.subsets):
            g = torch.Generator().manual_seed(mix_seed(per_copy_seed(self.seed, m), epoch))
            rows.append(subset[torch.randperm(self.subset_size, generator=g)])
        return torch.stack(rows)

    def __iter__(self) -> Iterator[list[int]]:
        orders, b = self.orders(), self.batch_size
        for step in range(len(self)):
            yield orders[:, step * b : (step + 1) * b].reshape(-1).tolist()


class _Collated(tuple):
    """A batch that :class:`_PreloadedDataset` already gathered (no collation needed)."""


def _take(tree: Any, index: Tensor) -> Any:
    if torch.is_tensor(tree):
        return tree[index]
    if isinstance(tree, Mapping):
        return {k: _take(v, index) for k, v in tree.items()}
    return type(tree)(_take(v, index) for v in tree)


def _split_copies(tree: Any, num_models: int) -> Any:
    if torch.is_tensor(tree):
        return tree.reshape(num_models, -1, *tree.shape[1:])
    if isinstance(tree, Mapping):
        return {k: _split_copies(v, num_models) for k, v in tree.items()}
    return type(tree)(_split_copies(v, num_models) for v in tree)


class _PreloadedDataset(Dataset):
    """Every example of ``dataset`` read once into tensors (plus its position), served a whole
    batch at a time by tensor indexing (``__getitems__``)."""

    def __init__(self, dataset: Dataset) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        indexed = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        self.data = default_collate([indexed[i] for i in range(n)])
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return _take(self.data, torch.tensor(index))

    def __getitems__(self, indices: Sequence[int]) -> _Collated:
        return _Collated((_take(self.data, torch.as_tensor(indices)),))


class _PerCopyCollate:
    """Collate ``M * b`` items (or a preloaded batch) and split every tensor into ``[M, b, ...]``."""

    def __init__(self, num_models: int) -> None:
        self.num_models = num_models

    def __call__(self, items: Any) -> Any:
        batch = items[0] if isinstance(items, _Collated) else default_collate(items)
        return _split_copies(batch, self.num_models)


def per_copy_loader(
    dataset: Dataset,
    batch_size: int,
    masks: Tensor | None = None,
    num_models: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    preload: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader of per-copy batches ``(x [M, b, ...], y [M, b, ...], index [M, b])``: copy
    ``m`` draws ``batch_size`` examples of its own subset (``masks[m]``) at every step, in its own
    seeded shuffle (module docstring). Pass the same ``masks`` to :class:`EnsembleModule`.

    ``preload=True`` reads every example once and then serves batches by tensor indexing, much
    faster for small in-memory datasets; only for datasets whose items do not change between
    reads (no random transforms: use the module's ``augment`` for per-copy augmentation).
    ``kwargs`` go to the ``DataLoader`` (e.g. ``num_workers``).
    """
    if not hasattr(dataset, "__len__"):
        raise TypeError("per_copy_loader needs a map-style dataset with __len__")
    n = len(dataset)  # type: ignore[arg-type]
    sampler = PerCopyBatchSampler(masks, batch_size, n, num_models, seed, drop_last)
    source: Dataset = _PreloadedDataset(dataset) if preload else (
        dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
    )
    return DataLoader(source, batch_sampler=sampler, collate_fn=_PerCopyCollate(sampler.num_models), **kwargs)
