"""The ensemble engine: M copies of one architecture trained at once.

- :class:`EnsembleModule` (``module.py``): the LightningModule; its docstring defines what each
  copy is (init seed, example mask, example weights, augmentation seed, optimizer).
- ``stacking.py``: stacking copies (:func:`build_copies`, :class:`StackedModel`,
  :class:`StackingError`), ``vmap(functional_call)`` over a range of copies, one copy back out.
- ``optim.py``: ``torch.optim`` on stacked tensors as M optimizers, per-copy learning rates and
  gradient clipping.
- ``data.py``: :class:`IndexedDataset` / :class:`IndexedDataModule` (batches ``(x, y, index)``),
  :class:`SeededShuffleSampler` (a resumable shuffle), :func:`random_subset_masks`.
- ``per_copy.py``: per-copy batch streams (:func:`per_copy_loader`, :class:`PerCopyBatchSampler`):
  each copy draws exactly ``b`` examples of its own subset a step, so nothing is masked out.
- ``augment.py``: per-copy augmentation (:func:`augmentation_generator`, :class:`BatchRandomShift`).
"""

from lightning_tda.ensemble.augment import Augment, BatchRandomShift, augmentation_generator
from lightning_tda.ensemble.data import (
    IndexedDataModule,
    IndexedDataset,
    SeededShuffleSampler,
    indexed_loader,
    parse_indexed_batch,
    random_subset_masks,
)
from lightning_tda.ensemble.module import EnsembleModule
from lightning_tda.ensemble.optim import PerCopyLearningRate, build_optimizer, clip_grad_norm_per_copy
from lightning_tda.ensemble.per_copy import PerCopyBatchSampler, per_copy_loader, per_copy_seed
from lightning_tda.ensemble.stacking import StackedModel, StackingError, build_copies

__all__ = [
    "Augment",
    "BatchRandomShift",
    "EnsembleModule",
    "IndexedDataModule",
    "IndexedDataset",
    "PerCopyBatchSampler",
    "PerCopyLearningRate",
    "SeededShuffleSampler",
    "StackedModel",
    "StackingError",
    "augmentation_generator",
    "build_copies",
    "build_optimizer",
    "clip_grad_norm_per_copy",
    "indexed_loader",
    "parse_indexed_batch",
    "per_copy_loader",
    "per_copy_seed",
    "random_subset_masks",
]
