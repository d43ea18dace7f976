"""Data for the ensemble engine: indexed batches, a resumable shuffle, subset masks.

Masks and weights are per example, so a training batch must say which examples it holds:
:class:`IndexedDataset` wraps any dataset so item ``i`` is ``(x, y, i)`` (the position ``i`` is
the example's identity, as everywhere in lightning-tda), and :class:`IndexedDataModule` does that
to a datamodule's training split. :class:`SeededShuffleSampler` makes the batch stream a
function of ``(seed, epoch)`` alone, so a resumed fit sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

IndexedBatchFn = Callable[[Any], tuple[Tensor, Tensor, Tensor]]
"""``batch_fn(batch) -> (x, y, index)``: overrides the default indexed-batch parser."""


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (``numpy.random.SeedSequence``): distinct tuples give
    unrelated streams, unlike ``seed + epoch``."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(
        1, np.uint64
    )[0] >> 1)


class IndexedDataset(Dataset):
    """``dataset`` with each item's position appended: item ``i`` is ``(*dataset[i], i)`` for
    tuple items (``(x, y, i)`` for the usual pairs) and ``{**dataset[i], "index": i}`` for
    mapping items. ``targets``/``labels`` pass through, so fingerprints still read labels."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, "index": index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        raise TypeError(
            f"IndexedDataset needs items that are tuples (x, y, ...) or mappings, got "
            f"{type(item).__name__}"
        )

    def __getattr__(self, name: str) -> Any:
        if name in ("targets", "labels") and "dataset" in self.__dict__:
            return getattr(self.__dict__["dataset"], name)
        raise AttributeError(name)


class SeededShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` per epoch, drawn from ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for ``DistributedSampler``),
    so a fit resumed from a checkpoint sees exactly the batches an uninterrupted fit would.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


def indexed_loader(
    dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, **kwargs: Any
) -> DataLoader:
    """A DataLoader of ``(x, y, index)`` batches over ``dataset`` with a :class:`SeededShuffleSampler`."""
    indexed = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
    sampler = SeededShuffleSampler(len(indexed), seed, shuffle)
    return DataLoader(indexed, batch_size=batch_size, sampler=sampler, **kwargs)


class IndexedDataModule(L.LightningDataModule):
    """Wrap a datamodule so its training batches carry example indices (``(x, y, index)``) and are
    shuffled by a :class:`SeededShuffleSampler`; everything else (validation, test,
    ``recording_dataset``, ``num_classes``...) passes through to ``datamodule``."""

    def __init__(self, datamodule: L.LightningDataModule, seed: int = 0) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.seed = seed

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader:
        inner = self.datamodule.train_dataloader()
        return indexed_loader(
            inner.dataset, inner.batch_size or 1, self.seed, num_workers=inner.num_workers,
            collate_fn=inner.collate_fn, drop_last=inner.drop_last,
        )

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "datamodule" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["datamodule"], name)


def parse_indexed_batch(
    batch: Any, batch_fn: IndexedBatchFn | None = None, require_index: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Split a batch into ``(x, y, index)``: ``(x, y, index)`` tuples, mappings with ``x``, ``y``
    and ``index``, or whatever ``batch_fn`` returns. Without an index, raise when
    ``require_index`` and return ``index=None`` otherwise."""
    if batch_fn is not None:
        out = batch_fn(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise ValueError("batch_fn must return a triple (x, y, index)")
        return out[0], out[1], out[2]
    if isinstance(batch, Mapping):
        x, y, index = batch.get("x"), batch.get("y"), batch.get("index")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y, index = batch[0], batch[1], batch[2] if len(batch) >= 3 else None
    else:
        x = y = index = None
    if x is None or y is None:
        raise ValueError(
            f"cannot split a batch of type {type(batch).__name__} into (x, y, index); expected a "
            "tuple (x, y, index) or a dict with 'x', 'y', 'index'; pass batch_fn"
        )
    if index is None and require_index:
        raise ValueError(
            "masks/example weights are per example, so training batches must carry the example "
            "index: wrap the dataset in lightning_tda.ensemble.IndexedDataset (items (x, y, i)) or "
            "the datamodule in IndexedDataModule"
        )
    if index is not None:
        index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.ndim not in (1, 2):
            raise ValueError(
                f"the batch's third element must be the example indices (1-d integers, or 2-d "
                f"[num_models, batch] for per-copy batches), got "
                f"{tuple(index.shape)} {index.dtype}"
            )
    return x, y, index


def random_subset_masks(num_models: int, n: int, alpha: float, seed: int = 0) -> Tensor:
    """``[num_models, n]`` bool masks, row ``m`` a uniformly random subset of exactly
    ``round(alpha * n)`` examples drawn from ``(seed, m)`` alone (so shards agree on row ``m``).

    Use a loader seed different from ``seed``: ``indexed_loader(..., seed=seed)`` shuffles epoch
    ``e`` with the same permutation that drew row ``e``, so copy ``e``'s subset would come first
    in that epoch (the rows stay uniformly random; the batch order of those copies would not)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    size = int(round(alpha * n))
    masks = torch.zeros(num_models, n, dtype=torch.bool)
    for m in range(num_models):
        g = torch.Generator().manual_seed(mix_seed(seed, m))
        masks[m, torch.randperm(n, generator=g)[:size]] = True
    return masks


def check_masks(masks: Any, num_models: int) -> Tensor:
    """A ``[num_models, n_train]`` bool tensor, or a clear error."""
    masks = torch.as_tensor(masks)
    if masks.dtype != torch.bool:
        raise TypeError(
            f"masks must be a bool tensor [num_models, n_train], got dtype {masks.dtype}; "
            "convert with masks.bool() or masks > 0"
        )
    if masks.ndim != 2 or masks.shape[0] != num_models:
        raise ValueError(
            f"masks must have shape [num_models={num_models}, n_train], got {tuple(masks.shape)}"
        )
    return masks


def check_example_weights(weights: Any, num_models: int, n_train: int | None) -> Tensor:
    """A finite ``[num_models, n_train]`` float tensor, or a clear error."""
    weights = torch.as_tensor(weights)
    if not weights.dtype.is_floating_point:
        weights = weights.float()
    expected = f"[num_models={num_models}, n_train{'' if n_train is None else '=' + str(n_train)}]"
    if (
        weights.ndim != 2
        or weights.shape[0] != num_models
        or (n_train is not None and weights.shape[1] != n_train)
    ):
        raise ValueError(f"example_weights must have shape {expected}, got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError("example_weights must be finite")
    return weights
