"""The demo's ModelDiff entry point on stores recorded as ``lightning-tda demo`` records them
(DigitsDataModule, GradientRecorder with its default splits, CheckpointRecorder)."""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import pytest

from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.modeldiff import ModelDiffReport, Rotate
from lightning_tda.modeldiff.demo import digits_model_diff, recorded_digits
from lightning_tda.store import RunStore


def record(root, name: str, augment: bool, models: int, n_train: int = 200) -> list[RunStore]:
    stores = []
    for m in range(models):
        path = root / f"{name}_{m}"
        RunStore.create(path, run_name=f"{name}_{m}", algorithm=name, seed=m)
        L.seed_everything(m, verbose=False)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[GradientRecorder(path, proj_dim=32, seed=0), CheckpointRecorder(path, every_n_epochs=None)])
        trainer.fit(ImageClassifier(DigitsCNN(), lr=0.01, optimizer="adam"), DigitsDataModule(n_train=n_train, augment=augment, batch_size=32))
        stores.append(RunStore(path))
    return stores


@pytest.fixture(scope="module")
def demo_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("modeldiff_demo")
    return record(root, "A", False, 2), record(root, "B", True, 2)


def test_digits_model_diff_runs_on_the_demo_stores(demo_stores):
    stores_a, stores_b = demo_stores
    start = time.perf_counter()
    report = digits_model_diff(stores_a, stores_b)
    assert time.perf_counter() - start < 30
    assert isinstance(report, ModelDiffReport) and report.names == ("A", "B")
    d = report.directions_a
    assert d.train_weights.shape == (3, 200) and d.floor_measured
    assert d.top_train_images is not None and len(d.top_train_images[0]) > 0
    v = report.verification
    assert v is not None and v.names == ("A", "B") and np.isfinite(v.effects_a).all() and len(v.effects_b) == 2
    # the verification used the stores' checkpoints: another transformation gives other effects
    other = digits_model_diff(stores_a, stores_b, transform=Rotate(20.0), names=("plain", "shifted"))
    assert other.names == ("plain", "shifted") and not np.allclose(other.verification.effects_a, v.effects_a)


def test_recorded_digits_are_checked_against_the_fingerprints(demo_stores):
    stores_a, _ = demo_stores
    train, test = recorded_digits(stores_a)
    assert len(train) == 200 and len(test) == stores_a[0].manifest["fingerprints"]["val"]["size"]
    with pytest.raises(ValueError, match="not the digits split"):
        recorded_digits(stores_a, split_seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        digits_model_diff([], stores_a)
