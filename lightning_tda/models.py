"""Small reference models for the embedded default (digits) and a plain classifier LightningModule.

These are what examples, tests and benchmarks train; users bring their own modules.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_tda.data import BatchFn, BatchParser


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: two 3x3 convolutions and two linear layers."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(self.features(x)))))


class MLP(nn.Module):
    """A plain MLP on flattened inputs."""

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of any ``nn.Module`` classifier with SGD (momentum, weight decay) or
    Adam; logs loss and accuracy. ``forward`` returns logits, as recorders expect."""

    def __init__(
        self,
        model: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: Literal["sgd", "adam"] = "sgd",
        batch_fn: BatchFn | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "batch_fn"])
        self.model = model if model is not None else DigitsCNN(num_classes)
        self.parser = BatchParser(batch_fn=batch_fn)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.parser(batch)
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
        self.log(f"{stage}/acc", acc, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
