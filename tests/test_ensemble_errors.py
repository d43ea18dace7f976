"""Bad input to the ensemble engine: each a clear error that says what is wrong."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.data import synthetic_images
from lightning_tda.ensemble import EnsembleModule, StackingError, indexed_loader, random_subset_masks

pytestmark = pytest.mark.filterwarnings("ignore:.*no `val_dataloader`", "ignore:.*LeafSpec")

N = 12


def small() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def fit(ens, loader, tmp_path):
    L.Trainer(
        max_epochs=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    ).fit(ens, loader)


@pytest.fixture
def data():
    return synthetic_images(N, 3, (1, 2, 2))


@pytest.mark.parametrize("num_models", [0, -2, 1.5])
def test_bad_num_models(num_models):
    with pytest.raises(ValueError, match="num_models must be a positive integer"):
        EnsembleModule(small, num_models=num_models)


def test_num_models_required():
    with pytest.raises(ValueError, match="num_models is required"):
        EnsembleModule(small)


def test_architecture_depending_on_seed():
    def model_fn():
        return nn.Linear(2, int(torch.randint(2, 5, ())))

    pattern = r"'weight' is \[\d, 2\] float32 in copy \d+ but .* depend on the seed"
    with pytest.raises(StackingError, match=pattern):
        EnsembleModule(model_fn, num_models=8)


def test_lazy_module():
    with pytest.raises(StackingError, match="uninitialized .*Lazy"):
        EnsembleModule(lambda: nn.LazyLinear(3), num_models=2)


def test_no_parameters():
    with pytest.raises(StackingError, match="no parameters"):
        EnsembleModule(nn.ReLU, num_models=2)


def test_same_module_every_call():
    shared = small()
    with pytest.raises(StackingError, match="new module on each call"):
        EnsembleModule(lambda: shared, num_models=3)


def test_not_a_module():
    with pytest.raises(StackingError, match="not an nn.Module"):
        EnsembleModule(lambda: "model", num_models=2)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return h if h.sum() > 0 else -h  # Python control flow on a tensor value


def test_unvmappable_forward_at_construction():
    with pytest.raises(StackingError, match="cannot run under torch.func.vmap.*control flow"):
        EnsembleModule(DataDependent, num_models=2, example_input=torch.zeros(2, 1, 2, 2))


def test_unvmappable_forward_in_fit(data, tmp_path):
    with pytest.raises(StackingError, match="cannot run under torch.func.vmap"):
        fit(EnsembleModule(DataDependent, num_models=2), indexed_loader(data, 4), tmp_path)


@pytest.mark.parametrize(
    "masks, error, match",
    [
        (
            torch.ones(3, N, dtype=torch.bool),
            ValueError,
            r"masks must have shape \[num_models=2, n_train\], got \(3, 12\)",
        ),
        (torch.ones(N, dtype=torch.bool), ValueError, r"masks must have shape .* got \(12,\)"),
        (torch.ones(2, N), TypeError, "masks must be a bool tensor"),
    ],
)
def test_bad_masks(masks, error, match):
    with pytest.raises(error, match=match):
        EnsembleModule(small, num_models=2, masks=masks)


@pytest.mark.parametrize(
    "weights, match",
    [
        (torch.ones(2, N + 1), r"example_weights must have shape \[num_models=2, n_train=12\]"),
        (torch.ones(3, N), r"example_weights must have shape"),
        (torch.ones(2, N, 1), r"example_weights must have shape"),
        (torch.full((2, N), float("nan")), "finite"),
    ],
)
def test_bad_example_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        EnsembleModule(small, num_models=2, masks=torch.ones(2, N, dtype=torch.bool), example_weights=weights)


def test_masks_do_not_match_dataset(data, tmp_path):
    ens = EnsembleModule(small, masks=random_subset_masks(2, N + 5, 0.5))
    with pytest.raises(ValueError, match="17 columns but the training dataset has 12"):
        fit(ens, indexed_loader(data, 4), tmp_path)


def test_batches_without_index(data, tmp_path):
    ens = EnsembleModule(small, example_weights=torch.ones(2, N))
    loader = DataLoader(TensorDataset(data.images, data.targets), batch_size=4)
    with pytest.raises(ValueError, match="IndexedDataset"):
        fit(ens, loader, tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="lamb"), "optimizer must be one of"),
        (dict(normalization="mean"), "normalization must be one of"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(lr=[0.1, 0.2, 0.3]), "lr must be one float or one per copy"),
        (dict(lr=[0.1, -0.2]), "learning rates must be finite and >= 0"),
        (dict(lr=-0.1), "learning rates must be finite and >= 0"),
        (dict(seeds=[1, 2, 3]), "seeds must have num_models=2 entries"),
        (dict(augmentation_seeds=[1]), "augmentation_seeds must have 2 entries"),
        (dict(gradient_clip_norm=0.0), "gradient_clip_norm must be > 0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnsembleModule(small, num_models=2, **kwargs)


def test_member_out_of_range():
    with pytest.raises(IndexError, match="copy 2 out of range for an ensemble of 2"):
        EnsembleModule(small, num_models=2).member(2)
