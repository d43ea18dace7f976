"""Data: the embedded digits datamodule, the batch parser, and dataset fingerprints.

Examples are identified by their position in a dataset (DESIGN.md): row ``i`` of every recorded
array is example ``i`` of the split's dataset, so the datasets here are plain indexable tensors
with a fixed order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_tda.schema import FINGERPRINT_LABELS, FINGERPRINT_SIZE

BatchFn = Callable[[Any], tuple[Tensor, Tensor]]
"""``batch_fn(batch) -> (x, y)``: overrides the default batch parser."""


class BatchParseError(ValueError):
    """A batch could not be split into ``(x, y)``."""


@dataclass(frozen=True)
class BatchParser:
    """Split a batch into ``(x, y)``.

    Accepts ``(x, y, ...)`` tuples/lists and mappings with keys ``x_key``/``y_key``; a user
    ``batch_fn`` replaces all of that.
    """

    x_key: str = "x"
    y_key: str = "y"
    batch_fn: BatchFn | None = None

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        if self.batch_fn is not None:
            out = self.batch_fn(batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise BatchParseError(
                    f"batch_fn must return a pair (x, y), got {type(out).__name__}"
                )
            return out[0], out[1]
        if isinstance(batch, Mapping):
            missing = [k for k in (self.x_key, self.y_key) if k not in batch]
            if missing:
                raise BatchParseError(
                    f"batch is a mapping with keys {sorted(map(str, batch))} but lacks {missing}; "
                    "set x_key/y_key or pass batch_fn=lambda batch: (x, y)"
                )
            return batch[self.x_key], batch[self.y_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise BatchParseError(
            f"cannot split a batch of type {type(batch).__name__} into (x, y); expected a tuple "
            "(x, y, ...) or a dict with 'x' and 'y'; pass batch_fn=lambda batch: (x, y)"
        )


def parse_batch(batch: Any, batch_fn: BatchFn | None = None) -> tuple[Tensor, Tensor]:
    """Split ``batch`` into ``(x, y)`` with the default parser (or ``batch_fn``)."""
    return BatchParser(batch_fn=batch_fn)(batch)


# ---------------------------------------------------------------------------------- fingerprints


def dataset_labels(dataset: Dataset, batch_fn: BatchFn | None = None) -> np.ndarray:
    """The labels of ``dataset`` in order, as int64 (from ``.targets``/``.labels`` when present)."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    parser = BatchParser(batch_fn=batch_fn)
    return np.asarray(
        [int(torch.as_tensor(parser(dataset[i])[1])) for i in range(len(dataset))],  # type: ignore[arg-type]
        dtype=np.int64,
    )


def dataset_fingerprint(dataset: Dataset, batch_fn: BatchFn | None = None) -> dict[str, Any]:
    """Size and SHA-256 of the labels: enough to tell that a store belongs to another dataset."""
    labels = dataset_labels(dataset, batch_fn)
    return {
        FINGERPRINT_SIZE: int(len(labels)),
        FINGERPRINT_LABELS: hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
    }


# ---------------------------------------------------------------------------------- digits


class TensorImageDataset(Dataset):
    """Images and integer labels held as tensors, with an optional transform on ``x``.

    ``targets`` is public so fingerprints and recorders read labels without a pass.
    """

    def __init__(
        self, images: Tensor, targets: Tensor, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def without_transform(self) -> "TensorImageDataset":
        """The same examples with no augmentation (what recorders evaluate)."""
        return TensorImageDataset(self.images, self.targets)


class RandomShift:
    """Shift an image by up to ``max_shift`` pixels in each direction (zero padding)."""

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = max_shift

    def __call__(self, x: Tensor) -> Tensor:
        s = self.max_shift
        dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        h, w = x.shape[-2:]
        return padded[..., s + dy : s + dy + h, s + dx : s + dx + w]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``([1797, 1, 8, 8] float32 in [0, 1], [1797] int64)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled digits (1,797 8x8 images, 10 classes), no download.

    A fixed, seeded train/val split; ``augment=True`` adds random 1-pixel shifts to training
    images. Recorders evaluate :meth:`recording_dataset`, which never augments.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
        n_train: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.num_workers = num_workers
        self.n_train = n_train
        self.shuffle = shuffle
        self.train_dataset: TensorImageDataset | None = None
        self.val_dataset: TensorImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(labels)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        if self.n_train is not None:
            train_idx = train_idx[: self.n_train]
        transform = RandomShift(1) if self.augment else None
        self.train_dataset = TensorImageDataset(images[train_idx], labels[train_idx], transform)
        self.val_dataset = TensorImageDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def recording_dataset(self, split: str) -> Dataset:
        """The un-augmented dataset of ``split`` ("train" or "val"), in its fixed order."""
        self.setup()
        if split == "train":
            assert self.train_dataset is not None
            return self.train_dataset.without_transform()
        if split == "val":
            assert self.val_dataset is not None
            return self.val_dataset
        raise ValueError(f"DigitsDataModule has splits 'train' and 'val', not {split!r}")


def synthetic_images(
    n: int, num_classes: int = 10, shape: Sequence[int] = (3, 32, 32), seed: int = 0
) -> TensorImageDataset:
    """A learnable synthetic image set: class-dependent mean patterns plus noise (for tests and
    benchmarks at a larger scale than digits)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = prototypes[labels] + 2.0 * torch.randn(n, *shape, generator=g)
    return TensorImageDataset(images, labels)
