"""SubsetSweep hands Lightning's accelerator/devices to every block's Trainer ("auto" by default)."""

import lightning as L

from lightning_tda.data import DigitsDataModule
from lightning_tda.models import MLP
from lightning_tda import sweep as sweep_module
from lightning_tda.sweep import SubsetSweep


def test_accelerator_and_devices_reach_the_trainer(tmp_path, monkeypatch):
    seen = []

    class Recording(L.Trainer):
        def __init__(self, **kwargs):
            seen.append((kwargs["accelerator"], kwargs["devices"]))
            super().__init__(**{**kwargs, "accelerator": "cpu", "devices": 1})

    monkeypatch.setattr(sweep_module.L, "Trainer", Recording)
    dm = DigitsDataModule(n_train=40)
    dm.setup()
    common = dict(model_fn=lambda: MLP(64, 8, 10), train_dataset=dm.recording_dataset("train"),
                  eval_datasets={"val": dm.recording_dataset("val")}, num_models=2, models_per_block=2, epochs=1,
                  progress=False)
    default = SubsetSweep(tmp_path / "a", **common)
    assert (default.accelerator, default.devices) == ("auto", "auto")
    default.train_block(0)
    SubsetSweep(tmp_path / "b", accelerator="cpu", devices=1, **common).train_block(0)
    assert seen == [("auto", "auto"), ("cpu", 1)]
