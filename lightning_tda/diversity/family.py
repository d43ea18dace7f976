"""A family of digits classifiers that differ by one training factor at a time.

The seed paper's categories on scikit-learn's bundled digits: models that differ only by
initialisation seed; by learning rate and weight decay; by architecture (MLP against CNN); by
augmentation (random 1-pixel shifts); by training data (disjoint halves of the training split).
Each group is ``seeds`` copies of one configuration trained at once by the ensemble engine
(:class:`~lightning_tda.ensemble.EnsembleModule`: one architecture, one Lightning fit; within a
group the copies share the batch order and differ by initialisation, and by their data mask for
the halves). Every group has its own seeds, so a pair from two groups also differs by seed: its
category is the most divergent factor that differs (:mod:`~lightning_tda.diversity.categories`).

The digits are split once (seeded) into training, held-out (temperature scaling, greedy
selection) and test (evaluation) examples; ``n_train`` caps the training examples for a harder
task with more errors to compare.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_tda.data import TensorImageDataset, load_digits_tensors
from lightning_tda.ensemble import BatchRandomShift, EnsembleModule, indexed_loader
from lightning_tda.models import MLP, DigitsCNN

__all__ = ["DigitsFamily", "FamilySettings", "train_digits_family"]


@dataclass(frozen=True)
class FamilySettings:
    """The family: ``seeds`` models per configuration.

    Args:
        seeds: models per configuration (>= 2, so every category has pairs).
        epochs: training epochs of every model.
        batch_size: training batch size.
        lr, weight_decay: the base configuration (SGD with momentum 0.9).
        hyperparameters: the alternative ``(lr, weight_decay)`` configurations of the CNN.
        cnn_width, mlp_hidden: the two architectures' sizes.
        augment_shift: the augmented group's random shift (pixels).
        test_fraction, held_out_fraction: shares of the 1,797 digits for evaluation and for the
            held-out split; the rest trains.
        n_train: cap on the training examples (None: all of the rest).
        split_seed: the seed of the split and of the data halves.
        groups: which groups to train ("base", "hyperparameters", "architecture",
            "augmentation", "data").
        accelerator: of the training runs.
    """

    seeds: int = 4
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    hyperparameters: tuple[tuple[float, float], ...] = ((0.02, 0.0), (0.1, 2e-3))
    cnn_width: int = 16
    mlp_hidden: int = 128
    augment_shift: int = 1
    test_fraction: float = 0.3
    held_out_fraction: float = 0.2
    n_train: int | None = None
    split_seed: int = 0
    groups: tuple[str, ...] = ("base", "hyperparameters", "architecture", "augmentation", "data")
    accelerator: str = "cpu"

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 (pairs within a configuration), got {self.seeds}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (0 < self.test_fraction < 1 and 0 < self.held_out_fraction < 1 and self.test_fraction + self.held_out_fraction < 1):
            raise ValueError("test_fraction and held_out_fraction must be in (0, 1) and leave training examples")
        if self.n_train is not None and self.n_train < 4:
            raise ValueError(f"n_train must be >= 4 (two halves of two), got {self.n_train}")
        unknown = set(self.groups) - {"base", "hyperparameters", "architecture", "augmentation", "data"}
        if unknown or not self.groups:
            raise ValueError(f"unknown groups {sorted(unknown)}; choose from base, hyperparameters, architecture, augmentation, data")


@dataclass
class DigitsFamily:
    """Trained models (eval mode) with one name and description each, and the three splits."""

    models: list[nn.Module]
    names: list[str]
    descriptions: list[dict[str, Any]]
    train: TensorImageDataset
    held_out: TensorImageDataset
    test: TensorImageDataset
    groups: dict[str, list[int]] = field(default_factory=dict)


def _splits(settings: FamilySettings) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    images, labels = load_digits_tensors()
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.split_seed))
    n_test, n_held = round(settings.test_fraction * n), round(settings.held_out_fraction * n)
    test, held, train = order[:n_test], order[n_test : n_test + n_held], order[n_test + n_held :]
    if settings.n_train is not None:
        train = train[: settings.n_train]
    return (TensorImageDataset(images[train], labels[train]), TensorImageDataset(images[held], labels[held]),
            TensorImageDataset(images[test], labels[test]))


def _fit(
    model_fn: Callable[[], nn.Module],
    seeds: list[int],
    train: TensorImageDataset,
    settings: FamilySettings,
    lr: float,
    weight_decay: float,
    masks: torch.Tensor | None = None,
    augment: Any = None,
) -> list[nn.Module]:
    module = EnsembleModule(
        model_fn, seeds=seeds, masks=masks, lr=lr, weight_decay=weight_decay, augment=augment, momentum=0.9,
    )
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator=settings.accelerator, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with warnings.catch_warnings():  # no validation split here, by design
        warnings.filterwarnings("ignore", ".*validation_step.*val_dataloader.*")
        trainer.fit(module, indexed_loader(train, settings.batch_size, seed=settings.split_seed))
    return [m.eval() for m in module.cpu().members()]


def train_digits_family(settings: FamilySettings = FamilySettings(), progress: bool = True) -> DigitsFamily:
    """Train the family (module docstring); a few seconds per group on a CPU core."""
    train, held_out, test = _splits(settings)
    base = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    cnn = lambda: DigitsCNN(width=settings.cnn_width)  # noqa: E731
    mlp = lambda: MLP(in_features=64, hidden=settings.mlp_hidden)  # noqa: E731
    half = len(train) // 2
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.split_seed + 1))
    halves = [torch.zeros(len(train), dtype=torch.bool) for _ in range(2)]
    halves[0][perm[:half]], halves[1][perm[half : 2 * half]] = True, True

    def hp(lr: float, wd: float) -> str:
        return f"lr={lr:g},wd={wd:g}"

    # (group, name, model_fn, architecture, lr, wd, augmentation, data mask)
    plan: list[tuple[str, str, Callable[[], nn.Module], str, float, float, str, str]] = []
    if "base" in settings.groups:
        plan.append(("base", "cnn", cnn, "cnn", base["lr"], base["weight_decay"], "none", "all"))
    if "hyperparameters" in settings.groups:
        for k, (lr, wd) in enumerate(settings.hyperparameters):
            plan.append(("hyperparameters", f"cnn-hp{k}", cnn, "cnn", lr, wd, "none", "all"))
    if "architecture" in settings.groups:
        plan.append(("architecture", "mlp", mlp, "mlp", base["lr"], base["weight_decay"], "none", "all"))
    if "augmentation" in settings.groups:
        plan.append(("augmentation", "cnn-shift", cnn, "cnn", base["lr"], base["weight_decay"], "shift", "all"))
    if "data" in settings.groups:
        plan.append(("data", "cnn-halfA", cnn, "cnn", base["lr"], base["weight_decay"], "none", "half A"))
        plan.append(("data", "cnn-halfB", cnn, "cnn", base["lr"], base["weight_decay"], "none", "half B"))

    family = DigitsFamily([], [], [], train, held_out, test)
    for g, (group, prefix, model_fn, arch, lr, wd, aug, data) in enumerate(tqdm(plan, desc="family", disable=not progress)):
        seeds = [1000 * (g + 1) + s for s in range(settings.seeds)]
        masks = None if data == "all" else halves[0 if data == "half A" else 1][None].repeat(settings.seeds, 1)
        augment = BatchRandomShift(settings.augment_shift) if aug == "shift" else None
        models = _fit(model_fn, seeds, train, settings, lr, wd, masks, augment)
        for s, model in zip(seeds, models):
            family.groups.setdefault(group, []).append(len(family.models))
            family.models.append(model)
            family.names.append(f"{prefix}-s{s % 1000}")
            family.descriptions.append(
                {"seed": s, "hyperparameters": hp(lr, wd), "architecture": arch, "augmentation": aug, "data": data}
            )
    return family
