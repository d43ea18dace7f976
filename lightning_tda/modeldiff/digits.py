"""Case studies on the bundled digits: data variants, a planted feature, and recorded runs.

What the four ``examples/modeldiff_*.py`` share (and what a demo can call):

- :func:`digits_splits`: the fixed train/val split of :class:`~lightning_tda.data.DigitsDataModule`
  as two datasets (val is ModelDiff's test set);
- :class:`CaseStudyData`: a datamodule over given datasets, with a per-image training
  augmentation and its own batch size; recorders see the un-augmented datasets;
- :func:`plant_feature`: paste a patch into a fraction of one class's images (the known answer);
- :func:`record_runs`: train several models of one algorithm, one Lightning fit per model, each
  recording its final checkpoint and projected gradients (train and val) into its own new
  RunStore, labelled with the algorithm's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_tda import schema
from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder
from lightning_tda.data import DigitsDataModule, TensorImageDataset
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.modeldiff.transformations import Transformation
from lightning_tda.store import RunStore


def digits_splits(n_train: int | None = None, n_test: int | None = None, split_seed: int = 0) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The digits train and val datasets of ``DigitsDataModule(split_seed=split_seed)``, optionally
    cut to the first ``n_train`` / ``n_test`` examples."""
    dm = DigitsDataModule(split_seed=split_seed, n_train=n_train)
    dm.setup()
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    assert isinstance(train, TensorImageDataset) and isinstance(val, TensorImageDataset)
    if n_test is not None:
        val = TensorImageDataset(val.images[:n_test], val.targets[:n_test])
    return train, val


class CaseStudyData(L.LightningDataModule):
    """Training and validation datasets as given; ``train_transform`` (one image at a time)
    augments training batches only, and ``recording_dataset`` returns the datasets unchanged."""

    def __init__(
        self,
        train: TensorImageDataset,
        val: TensorImageDataset,
        batch_size: int = 64,
        train_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train, self.val, self.batch_size, self.train_transform = train, val, batch_size, train_transform

    def train_dataloader(self) -> DataLoader:
        dataset = TensorImageDataset(self.train.images, self.train.targets, self.train_transform)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)

    def recording_dataset(self, split: str) -> TensorImageDataset:
        if split not in ("train", "val"):
            raise ValueError(f"CaseStudyData has splits 'train' and 'val', not {split!r}")
        return self.train if split == "train" else self.val


def plant_feature(
    dataset: TensorImageDataset, transformation: Transformation, target_class: int, fraction: float, seed: int = 0
) -> tuple[TensorImageDataset, Tensor]:
    """A copy of ``dataset`` whose images of ``target_class`` are transformed (a patch pasted,
    say) for a random ``fraction`` of them; returns it and the planted example indices."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    candidates = torch.nonzero(dataset.targets == target_class).flatten()
    if len(candidates) == 0:
        raise ValueError(f"the dataset has no examples of class {target_class}")
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: max(1, round(fraction * len(candidates)))]]
    chosen = chosen.sort().values
    images = dataset.images.clone()
    images[chosen] = transformation(images[chosen])
    return TensorImageDataset(images, dataset.targets.clone()), chosen


def record_runs(
    root: str | os.PathLike[str],
    name: str,
    data: L.LightningDataModule,
    num_models: int,
    epochs: int,
    make_model: Callable[[int], nn.Module] | None = None,
    lr: float = 0.05,
    proj_dim: int = 1024,
    record_epochs: Sequence[int] = (),
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[RunStore], list[nn.Module]]:
    """Train ``num_models`` models of algorithm ``name`` (one Lightning fit each, seeds ``seed + m``)
    with a GradientRecorder (splits train and val, ``proj_dim``; at the end of the 0-based
    ``record_epochs`` and of training: TRAK averages over these checkpoints) and a
    CheckpointRecorder (final model) into new stores ``root/name/model<m>``.

    Args:
        data: the algorithm's datamodule (its augmentation and batch size are part of the algorithm).
        make_model: ``make_model(seed) -> nn.Module`` (e.g. a fine-tuning start); a fresh
            :class:`~lightning_tda.models.DigitsCNN` by default.
        lr: SGD learning rate (momentum 0.9, weight decay 5e-4, as ``ImageClassifier``).

    Returns the stores and the trained modules (``ImageClassifier``, in eval mode).
    """
    if num_models < 1 or epochs < 1 or proj_dim < 1:
        raise ValueError(f"num_models, epochs and proj_dim must be >= 1, got {num_models}, {epochs}, {proj_dim}")
    stores, modules = [], []
    for m in tqdm(range(num_models), desc=f"training {name}", disable=not progress):
        path = Path(root) / name / f"model{m}"
        RunStore.create(path, run_name=f"{name}-{m}", algorithm=name, seed=seed + m)
        L.seed_everything(seed + m, verbose=False)
        model = make_model(seed + m) if make_model is not None else DigitsCNN()
        module = ImageClassifier(model, lr=lr)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[
                GradientRecorder(str(path), proj_dim=proj_dim, splits=(schema.TRAIN_SPLIT, "val"),
                                 at_epochs=[e for e in record_epochs if e < epochs - 1] or None),
                CheckpointRecorder(str(path), every_n_epochs=None, on_fit_end=True),
            ],
        )
        trainer.fit(module, datamodule=data)
        stores.append(RunStore(path))
        modules.append(module.eval())
    return stores, modules


def rotation_pretrained(train: TensorImageDataset, epochs: int = 10, lr: float = 0.05, seed: int = 0) -> dict[str, Tensor]:
    """Weights of a DigitsCNN pre-trained to tell the rotation (0, 90, 180 or 270 degrees) of the
    training images (no digit labels used): a pre-training task made from the bundled data.
    Returns its state dict without the 4-way output layer (``fc2``)."""
    images = torch.cat([torch.rot90(train.images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(len(train.images))
    data = CaseStudyData(TensorImageDataset(images, labels), TensorImageDataset(images[:256], labels[:256]), batch_size=128)
    L.seed_everything(seed, verbose=False)
    module = ImageClassifier(DigitsCNN(num_classes=4), num_classes=4, lr=lr)
    L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    ).fit(module, datamodule=data)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items() if not k.startswith("fc2.")}


def fine_tune_start(pretrained: dict[str, Tensor]) -> Callable[[int], nn.Module]:
    """``make_model(seed)`` for :func:`record_runs`: a DigitsCNN with the pre-trained layers and a
    fresh, seeded output layer."""

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = DigitsCNN()
        missing, unexpected = model.load_state_dict(pretrained, strict=False)
        assert not unexpected and all(k.startswith("fc2.") for k in missing)
        return model

    return make


def accuracy(modules: Sequence[nn.Module], dataset: TensorImageDataset) -> float:
    """Mean accuracy of ``modules`` on ``dataset``."""
    with torch.no_grad():
        return float(torch.stack([(m.eval()(dataset.images).argmax(1) == dataset.targets).float().mean() for m in modules]).mean())


__all__ = ["CaseStudyData", "accuracy", "digits_splits", "fine_tune_start", "plant_feature", "record_runs", "rotation_pretrained"]
