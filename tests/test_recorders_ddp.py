"""Under DDP (2 CPU processes, gloo) each rank writes its row blocks; the store equals one process's."""

import lightning as L
import numpy as np
import pytest

from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder, MarginRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.store import RunStore
from torch.utils.data import DataLoader, DistributedSampler

from conftest import trainer_kwargs


class OrderedDigits(DigitsDataModule):
    """Digits in a fixed order; under DDP rank r takes rows r, r+2, ... (no shuffling)."""

    def train_dataloader(self):
        self.setup()
        world = self.trainer.world_size
        sampler = DistributedSampler(self.train_dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler)


def run(tmp_path, store_path, devices, batch_size):
    L.seed_everything(0, verbose=False)
    # no shuffling: rank r of 2 gets rows r, r+2, ... so two DDP batches of b are one batch of 2b
    dm = OrderedDigits(batch_size=batch_size, n_train=256)
    kwargs = trainer_kwargs(tmp_path, devices=devices, deterministic=False)
    if devices > 1:
        kwargs["strategy"] = "ddp_spawn"
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[
            MarginRecorder(store_path, embeddings="model.fc1", block_rows=48, batch_size=32),
            GradientRecorder(store_path, proj_dim=64, every_n_epochs=1, block_rows=48, batch_size=32),
            CheckpointRecorder(store_path),
        ],
        **kwargs,
    )
    trainer.fit(ImageClassifier(DigitsCNN(width=8), lr=0.05), dm)
    return RunStore(store_path)


@pytest.mark.ddp
def test_ddp_store_equals_single_process_store(tmp_path):
    single = run(tmp_path / "single", tmp_path / "single_store", devices=1, batch_size=32)
    ddp = run(tmp_path / "ddp", tmp_path / "ddp_store", devices=2, batch_size=16)
    assert ddp.array_names() == single.array_names()
    for name in single.array_names():
        assert ddp.is_complete(name), name
        a, b = single.read(name), ddp.read(name)
        if name.startswith("preds/"):
            assert (a == b).mean() > 0.99, name  # argmax may flip on near-ties only
        else:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
    assert ddp.manifest["records"] == single.manifest["records"]
    assert ddp.checkpoint_tags() == single.checkpoint_tags()
    assert ddp.manifest["fingerprints"] == single.manifest["fingerprints"]
