"""A further-training check on digits in seconds: :func:`further_training_check` (for the
``lightning-tda demo`` command and a first look)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lightning_tda.data import DigitsDataModule
from lightning_tda.further_training.compare import ComparisonResult, compare
from lightning_tda.further_training.gold import dataset_tensors, further_training_scores
from lightning_tda.further_training.methods import final_model_scores
from lightning_tda.further_training.order import epoch_steps
from lightning_tda.models import MLP


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> nn.Module:
    """A plain SGD training loop (cross-entropy), enough to make a final model to study."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    x, y = dataset_tensors(dataset, "training")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()
    return model.eval()


def digits_mlp(hidden: int = 32, epochs: int = 20, seed: int = 0) -> tuple[nn.Module, Dataset, Dataset]:
    """A small MLP trained on the digits training split: ``(final model, train set, val set)``."""
    dm = DigitsDataModule()
    dm.setup()
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    torch.manual_seed(seed)
    model = train_classifier(MLP(64, hidden, 10), train, epochs=epochs, seed=seed)
    return model, train, val


def further_training_check(
    model: nn.Module | None = None,
    train_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    *,
    fast: bool = True,
    num_instances: int | None = None,
    num_test: int | None = None,
    seeds: int | None = None,
    epochs: Sequence[int] | None = None,
    methods: Sequence[str] = ("grad_dot", "grad_cos", "influence_projected:1", "trak", "datainf:1"),
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> ComparisonResult:
    """Further-train a final digits model on a handful of left-out instances and compare gradient
    methods with it: the seed paper's experiment in miniature. ``fast`` (16 instances, 32 test
    digits, 3 seeds, up to 8 epochs) runs in well under a minute on 2 CPU cores; otherwise 64, 100,
    10 and up to 25 epochs. Without ``model``, trains a small MLP on digits first (a few seconds).
    Returns the :class:`ComparisonResult` (``.log(reporter, prefix)``)."""
    if model is None:
        model, train_dataset, test_dataset = digits_mlp(seed=seed, epochs=10 if fast else 30)
    if train_dataset is None or test_dataset is None:
        raise ValueError("give train_dataset and test_dataset with a model (or neither, for digits)")
    num_instances = num_instances or (16 if fast else 64)
    num_test = min(num_test or (32 if fast else 100), len(test_dataset))  # type: ignore[arg-type]
    seeds = seeds or (3 if fast else 10)
    epochs = tuple(epochs or ((1, 2, 4, 8) if fast else (1, 2, 5, 10, 25)))
    n_train = len(train_dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    instances = torch.randperm(n_train, generator=g)[:num_instances].sort().values
    test = Subset(test_dataset, list(range(num_test)))
    gold = further_training_scores(
        model, train_dataset, test, instances, epoch_steps(epochs, n_train, batch_size), seeds,
        lr=lr, batch_size=batch_size, center=True, progress=progress,
    )
    scores = final_model_scores(model, train_dataset, test, instances, methods, proj_dim=512, progress=progress)
    return compare(gold, scores)
