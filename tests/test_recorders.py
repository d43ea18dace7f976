"""MarginRecorder and CheckpointRecorder driving a real Trainer on digits."""

import json

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.callbacks import CheckpointRecorder, MarginRecorder
from lightning_tda.data import BatchParseError, DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.outputs import margin_from_logits
from lightning_tda.store import SCHEMA_VERSION, FingerprintMismatchError, RunStore, SchemaVersionError, StoreError

from conftest import trainer_kwargs


def small_dm(**kw):
    return DigitsDataModule(batch_size=32, n_train=256, **kw)


def fit(tmp_path, callbacks, epochs=2, model=None, dm=None, seed=0, ckpt_path=None):
    L.seed_everything(seed, verbose=False)
    model = model or ImageClassifier(DigitsCNN(width=8), lr=0.05)
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, enable_checkpointing=checkpointing)
    )
    trainer.fit(model, dm or small_dm(), ckpt_path=ckpt_path)
    return model


def snapshot(store: RunStore) -> dict:
    arrays = {name: store.read(name) for name in store.array_names()}
    return {"manifest": store.manifest, "arrays": arrays}


def assert_same_snapshot(a, b):
    assert a["manifest"] == b["manifest"]
    assert a["arrays"].keys() == b["arrays"].keys()
    for k in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k])


def test_margins_equal_recomputation_from_checkpoints(tmp_path):
    store_path = tmp_path / "store"
    fit(tmp_path, [MarginRecorder(store_path, block_rows=100, batch_size=64), CheckpointRecorder(store_path)], epochs=3)
    store = RunStore(store_path)
    records = store.manifest["records"]["margins"]
    assert [r["tag"] for r in records] == ["epoch=0", "epoch=1", "epoch=2"]  # fit_end is the same step
    tags = store.checkpoint_tags()
    assert len(tags) == 3
    dm = small_dm()
    dm.setup()
    for record, tag in zip(records, tags):
        tensors, meta = store.load_checkpoint(tag)
        assert meta["global_step"] == record["global_step"]
        assert meta["learning_rates"] == [[0.05]]
        module = ImageClassifier(DigitsCNN(width=8))
        module.load_state_dict(tensors)
        module.eval()
        for split in ("train", "val"):
            ds = dm.recording_dataset(split)
            with torch.no_grad():
                logits = module(ds.images)
            recorded = store.read(f"margins/{split}", lead=(record["index"],))
            np.testing.assert_allclose(recorded, margin_from_logits(logits, ds.targets).numpy(), atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(store.read(f"preds/{split}", lead=(record["index"],)), logits.argmax(1).numpy())
    assert store.is_complete("margins/train") and store.manifest["fingerprints"]["train"]["size"] == 256


def test_recording_does_not_change_training(tmp_path):
    plain = fit(tmp_path / "a", [])
    recorded = fit(
        tmp_path / "b",
        [MarginRecorder(tmp_path / "s", embeddings="model.fc1", block_rows=64), CheckpointRecorder(tmp_path / "s", every_n_steps=3)],
    )
    for (name, a), (_, b) in zip(plain.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), name
    assert recorded.training  # mode restored
    store = RunStore(tmp_path / "s")
    assert store.read("embeddings/val").shape == (2, 359, 64)


def test_schedules(tmp_path):
    store_path = tmp_path / "s"
    fit(tmp_path, [MarginRecorder(store_path, splits=("val",), every_n_epochs=None, at_epochs=[1], on_fit_end=True),
                   CheckpointRecorder(store_path, every_n_epochs=2, on_fit_end=False)], epochs=3)
    store = RunStore(store_path)
    assert [r["tag"] for r in store.manifest["records"]["margins"]] == ["epoch=1", "fit_end"]
    assert store.checkpoint_tags() == ["epoch=1-step=16"]
    assert "margins/train" not in store.array_names()


def test_checkpoints_a_killed_run_saved_but_did_not_list(tmp_path):
    store_path = tmp_path / "s"
    lightning_ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    fit(tmp_path, [CheckpointRecorder(store_path, on_fit_end=False), lightning_ckpt], epochs=2)
    store = RunStore(store_path)
    listed = store.manifest["checkpoints"]
    assert sorted(listed) == ["epoch=0-step=8", "epoch=1-step=16"]
    # a kill after the saves, before the manifest listed them: the files are complete
    store.update_manifest(lambda m: m["checkpoints"].clear())
    assert store.checkpoints() == listed and store.checkpoint_tags() == ["epoch=0-step=8", "epoch=1-step=16"]
    files = {p.name: p.stat().st_mtime_ns for p in (store_path / "checkpoints").iterdir()}
    # the run resumed from its last Lightning checkpoint (one more epoch)
    fit(tmp_path, [CheckpointRecorder(store_path, on_fit_end=False)], epochs=3, ckpt_path=tmp_path / "ckpts" / "last.ckpt")
    manifest = RunStore(store_path).manifest["checkpoints"]
    assert {k: manifest[k] for k in listed} == listed  # listed at the resume's start
    assert sorted(manifest) == ["epoch=0-step=8", "epoch=1-step=16", "epoch=2-step=24"]
    after = {p.name: p.stat().st_mtime_ns for p in (store_path / "checkpoints").iterdir()}
    assert {k: after[k] for k in files} == files  # not rewritten


def test_a_fresh_run_into_a_store_of_another_run_is_refused(tmp_path):
    store_path = tmp_path / "s"
    fit(tmp_path, [MarginRecorder(store_path, splits=("val",)), CheckpointRecorder(store_path)], epochs=1, seed=0)
    before = snapshot(RunStore(store_path))
    files = {p: p.read_bytes() for p in store_path.rglob("*") if p.is_file()}
    recorders = [MarginRecorder(store_path, splits=("val",)), CheckpointRecorder(store_path)]
    with pytest.raises(StoreError, match=r"already holds another training run .*run id .*new store path.*overwrite=True"):
        fit(tmp_path, recorders, epochs=1, seed=1, model=ImageClassifier(DigitsCNN(width=8), lr=0.1))
    assert {p: p.read_bytes() for p in store_path.rglob("*") if p.is_file()} == files  # byte for byte
    # overwrite=True on one recorder of the store: the old records are cleared, with a warning
    with pytest.warns(UserWarning, match="overwrite=True cleared the old records"):
        fit(tmp_path, [MarginRecorder(store_path, splits=("val",)), CheckpointRecorder(store_path, overwrite=True)],
            epochs=1, seed=1, model=ImageClassifier(DigitsCNN(width=8), lr=0.1))
    after = RunStore(store_path)
    assert after.run_id != before["manifest"]["run_id"]
    assert [r["tag"] for r in after.manifest["records"]["margins"]] == ["epoch=0"]
    assert not np.array_equal(after.read("margins/val"), before["arrays"]["margins/val"])


def test_a_resume_must_find_its_own_run(tmp_path):
    store_path, other = tmp_path / "s", tmp_path / "other"
    lightning_ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    fit(tmp_path, [MarginRecorder(store_path, splits=("val",)), lightning_ckpt], epochs=1)
    run_id = RunStore(store_path).run_id
    last = tmp_path / "ckpts" / "last.ckpt"
    assert torch.load(last, weights_only=False)["callbacks"]  # the recorder's state holds the run id
    fit(tmp_path, [MarginRecorder(store_path, splits=("val",))], epochs=2, ckpt_path=last)  # goes on
    store = RunStore(store_path)
    assert store.run_id == run_id and [r["tag"] for r in store.manifest["records"]["margins"]] == ["epoch=0", "epoch=1"]
    # the store was cleared and reused by another run meanwhile: the resume is refused
    fit(tmp_path, [MarginRecorder(other, splits=("val",))], epochs=1)
    store.clear_records()
    fit(tmp_path, [MarginRecorder(store_path, splits=("val",))], epochs=1)
    with pytest.raises(StoreError, match="resumes a run that recorded into .* as run " + run_id):
        fit(tmp_path, [MarginRecorder(store_path, splits=("val",))], epochs=2, ckpt_path=last)


# ------------------------------------------------------------------------------- bad input


@pytest.fixture
def recorded_store(tmp_path):
    """A store with one good run in it, to check that failures leave it intact."""
    path = tmp_path / "store"
    fit(tmp_path / "first", [MarginRecorder(path, splits=("val",), on_fit_end=False)], epochs=1)
    return path


class DictDM(L.LightningDataModule):
    def __init__(self, n=64, key="image"):
        super().__init__()
        x = torch.rand(n, 1, 8, 8)
        y = torch.randint(0, 10, (n,))
        self.ds = [{key: x[i], "label": y[i]} for i in range(n)]

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=16)


class DictClassifier(ImageClassifier):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["image"]), batch["label"])


def test_unparseable_batch_hints_batch_fn(tmp_path):
    rec = MarginRecorder(tmp_path / "s", splits=("train",))
    with pytest.raises(BatchParseError, match="batch_fn"):
        fit(tmp_path, [rec], model=DictClassifier(DigitsCNN(width=4)), dm=DictDM())
    # with a batch_fn it records
    rec = MarginRecorder(tmp_path / "s2", splits=("train",), batch_fn=lambda b: (b["image"], b["label"]))
    fit(tmp_path, [rec], model=DictClassifier(DigitsCNN(width=4)), dm=DictDM(), epochs=1)
    assert RunStore(tmp_path / "s2").is_complete("margins/train")


def test_labels_out_of_range(tmp_path, recorded_store):
    before = snapshot(RunStore(recorded_store))
    labels = torch.randint(0, 10, (64,))
    labels[37] = 12
    bad = TensorDataset(torch.rand(64, 1, 8, 8), labels)
    rec = MarginRecorder(tmp_path / "s", splits=("bad",), datasets={"bad": bad})
    with pytest.raises(ValueError, match=r"labels out of range \[0, 10\).*values \[12\]"):
        fit(tmp_path, [rec], epochs=1)
    # a store holding a good run is refused before anything is recorded, and left as it was
    rec = MarginRecorder(recorded_store, splits=("val", "bad"), datasets={"bad": bad})
    with pytest.raises(StoreError, match="already holds another training run"):
        fit(tmp_path, [rec], epochs=1)
    after = snapshot(RunStore(recorded_store))
    np.testing.assert_array_equal(before["arrays"]["margins/val"][0], after["arrays"]["margins/val"][0])


def test_output_fn_of_wrong_shape(tmp_path, recorded_store):
    before = snapshot(RunStore(recorded_store))
    rec = MarginRecorder(recorded_store, splits=("val",), output_fn=lambda m, x, y: m(x))
    with pytest.raises(ValueError, match="one scalar per example"):
        fit(tmp_path, [rec], epochs=1)
    assert_same_snapshot(before, snapshot(RunStore(recorded_store)))


def test_store_of_another_dataset(tmp_path, recorded_store):
    before = snapshot(RunStore(recorded_store))
    with pytest.raises(FingerprintMismatchError, match="another 'val' dataset"):
        fit(tmp_path, [MarginRecorder(recorded_store, splits=("val",))], dm=small_dm(split_seed=3))
    assert_same_snapshot(before, snapshot(RunStore(recorded_store)))


def test_store_of_newer_schema(tmp_path, recorded_store):
    manifest_path = recorded_store / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 5
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="upgrade"):
        fit(tmp_path, [MarginRecorder(recorded_store, splits=("val",))])
    assert json.loads(manifest_path.read_text()) == manifest


def test_unwritable_store_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="writable"):
        fit(tmp_path, [MarginRecorder(blocker / "store")])


def test_empty_dataset(tmp_path):
    rec = MarginRecorder(tmp_path / "s", splits=("train", "empty"), datasets={"empty": TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))})
    with pytest.raises(ValueError, match="'empty' dataset is empty"):
        fit(tmp_path, [rec])


def test_missing_embedding_layer_lists_names(tmp_path):
    with pytest.raises(ValueError, match="layers are: .*model.fc1"):
        fit(tmp_path, [MarginRecorder(tmp_path / "s", embeddings="model.nope")])


def test_nan_outputs_are_recorded_and_reported(tmp_path):
    def nan_margin(module, x, y):
        out = margin_from_logits(module(x), y)
        out[::50] = float("nan")
        return out

    rec = MarginRecorder(tmp_path / "s", splits=("val",), output_fn=nan_margin, on_fit_end=False, batch_size=4096)
    with pytest.warns(RuntimeWarning, match=r"non-finite outputs in split 'val'.*examples \[0, 50"):
        fit(tmp_path, [rec], epochs=1)
    values = RunStore(tmp_path / "s").read("outputs/val")[0]
    assert np.isnan(values[::50]).all() and np.isfinite(values[1::50]).all()
    assert rec.nonfinite_count == len(values[::50])


def test_read_margins_returns_complete_records_only(tmp_path):
    from lightning_tda.callbacks import read_margins

    path = tmp_path / "s"
    fit(tmp_path, [MarginRecorder(path, splits=("val",), block_rows=100, on_fit_end=False)], epochs=2)
    store = RunStore(path)
    values, records = read_margins(store, "val")
    assert values.shape == (2, 359) and [r["tag"] for r in records] == ["epoch=0", "epoch=1"]
    # a record with an unwritten block (as a crash leaves it) is not returned
    store.update_manifest(lambda m: m["records"]["margins"].append({**records[-1], "tag": "epoch=2", "index": 2}))
    store.grow("margins/val", 3)
    store.write_block("margins/val", 0, np.zeros(100), lead=(2,))
    values, records = read_margins(store, "val")
    assert values.shape == (2, 359) and [r["tag"] for r in records] == ["epoch=0", "epoch=1"]


def test_margin_recorder_on_an_ensemble_records_every_copy(tmp_path):
    from lightning_tda.ensemble import EnsembleModule, IndexedDataModule

    L.seed_everything(0, verbose=False)
    masks = torch.rand(3, 128) > 0.5
    module = EnsembleModule(lambda: DigitsCNN(width=4), num_models=3, masks=masks, lr=0.05)
    path = tmp_path / "s"
    dm = IndexedDataModule(DigitsDataModule(batch_size=32, n_train=128))
    trainer = L.Trainer(max_epochs=2, callbacks=[MarginRecorder(path, block_rows=50)], **trainer_kwargs(tmp_path))
    trainer.fit(module, dm)
    store = RunStore(path)
    assert store.read("margins/train").shape == (2, 128, 3)
    plain = DigitsDataModule(n_train=128)
    plain.setup()
    for split in ("train", "val"):
        expected = module.outputs(plain.recording_dataset(split), "margin").T.numpy()  # [n, M]
        np.testing.assert_allclose(store.read(f"margins/{split}")[-1], expected, rtol=1e-5, atol=1e-5)
        assert store.read(f"preds/{split}").shape[-1] == 3


def test_models_that_cannot_take_channels_last_still_record(tmp_path):
    """A model calling .view on its input fails on a channels-last batch; the recorder falls back
    to the input as given and records the right margins."""

    class ViewNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], -1)[:, :64])

    images = torch.rand(64, 3, 8, 8)
    labels = torch.randint(0, 10, (64,))
    path = tmp_path / "s"
    model = ImageClassifier(ViewNet())
    rec = MarginRecorder(path, splits=("rgb",), datasets={"rgb": TensorDataset(images, labels)}, on_fit_end=False)
    fit(tmp_path, [rec], model=model, epochs=1)
    assert rec._channels_last is False
    with torch.no_grad():
        expected = margin_from_logits(model.eval()(images), labels).numpy()
    np.testing.assert_allclose(RunStore(path).read("margins/rgb")[0], expected, rtol=1e-5, atol=1e-5)


class StopAfter(L.Callback):
    """Stops training after ``epochs`` epochs and remembers the margin array's rows mid-fit."""

    def __init__(self, store_path, epochs):
        self.store_path, self.epochs, self.rows_mid_fit = store_path, epochs, None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.rows_mid_fit = RunStore(self.store_path).layout("margins/val").shape[0]
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_rows_reserved_for_planned_records_are_given_back(tmp_path):
    # 6 epochs planned (every epoch + fit end), training stops after 2: rows for the planned
    # records are reserved at the first record, and the ones not taken are trimmed at the end.
    path = tmp_path / "s"
    stopper = StopAfter(path, epochs=2)
    fit(tmp_path, [MarginRecorder(path, splits=("val",)), stopper], epochs=6)
    assert stopper.rows_mid_fit == 7  # this record, 5 later epochs, fit end
    store = RunStore(path)
    assert [r["tag"] for r in store.manifest["records"]["margins"]] == ["epoch=0", "epoch=1"]
    for name in ("margins/val", "losses/val", "preds/val"):
        assert store.layout(name).shape[0] == 2 and store.is_complete(name)
