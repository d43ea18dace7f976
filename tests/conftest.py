"""Shared test set-up: offline W&B, quiet Lightning, small fast trainers."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

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
