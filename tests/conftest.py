"""Shared test set-up: offline W&B, quiet Lightning, small fast trainers."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def trainer_kwargs(tmp_path, **overrides):
    """Trainer arguments for a quick, quiet, CPU-only run under ``tmp_path``."""
    kwargs = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def fast_trainer_kwargs(tmp_path):
    return lambda **kw: trainer_kwargs(tmp_path, **kw)


class TinyCNN(nn.Module):
    """A conv, an optional BatchNorm (``norm="batch"``), max-pooling and a linear layer on 1x8x8
    inputs: the smallest model the ensemble tests stack and compare with separate trainings."""

    def __init__(self, norm: str | None = None, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3) if norm == "batch" else nn.Identity()
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.norm(self.conv(x))), 2)
        return self.fc(h.flatten(1))
