import json
import os
import pickle

import numpy as np
import pytest
import torch

from lightning_tda.store import (
    SCHEMA_VERSION,
    FingerprintMismatchError,
    RunStore,
    SchemaVersionError,
    StoreExistsError,
    StoreNotFoundError,
    StoreError,
    rank_blocks,
    validate_name,
)


def test_row_blocks_and_completion(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("grads/train/a", (10, 3), "float32", block_rows=4)
    assert store.incomplete_blocks("grads/train/a") == [(0, 4), (4, 8), (8, 10)]
    store.write_block("grads/train/a", 8, np.ones((2, 3)))
    store.write_block("grads/train/a", 0, np.zeros((4, 3)))
    assert store.incomplete_blocks("grads/train/a") == [(4, 8)]
    assert not store.is_complete("grads/train/a")
    assert np.isnan(store.read("grads/train/a")[4:8]).all()
    store.write_block("grads/train/a", 4, np.full((4, 3), 2.0))
    assert store.is_complete("grads/train/a")
    blocks = list(store.iter_row_blocks("grads/train/a", 3))
    assert [s for s, _ in blocks] == [0, 3, 6, 9]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), store.read("grads/train/a"))
    # reopening sees the same
    again = RunStore(tmp_path / "run")
    assert again.is_complete("grads/train/a")


def test_completion_is_chunk_presence(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("margins/val", (2, 5), "float32", row_axis=1, block_rows=2)
    store.ensure_array("preds/val", (2, 5), "int64", row_axis=1, block_rows=2)
    # values equal to the fill value (NaN, 0) still complete their block
    store.write_blocks([("margins/val", 2, np.full(2, np.nan), (1,)), ("preds/val", 4, np.zeros(1), (0,))])
    assert store.completed_blocks("margins/val").tolist() == [[False, False, False], [False, True, False]]
    assert store.completed_blocks("preds/val", (0,)).tolist() == [False, False, True]
    # a temporary file a killed write left behind is not a chunk
    (tmp_path / "run" / "arrays" / "margins" / "val" / "c.0.0.3f2a.partial").write_bytes(b"torn")
    assert store.incomplete_blocks("margins/val", (0,)) == [(0, 2), (2, 4), (4, 5)]
    # trimming the records axis drops the completed blocks beyond it
    store.trim("margins/val", 1)
    store.grow("margins/val", 2)
    assert not store.completed_blocks("margins/val", (1,)).any()


def test_older_schema_is_refused(tmp_path):
    RunStore.create(tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION - 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="earlier lightning-tda.*new store path"):
        RunStore(tmp_path / "run")


def test_records_axis_grows(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("margins/val", (1, 5), "float32", row_axis=1, block_rows=2)
    store.write_block("margins/val", 0, np.arange(2), lead=(0,))
    store.grow("margins/val", 2)
    assert store.incomplete_blocks("margins/val", lead=(1,)) == [(0, 2), (2, 4), (4, 5)]
    assert store.incomplete_blocks("margins/val", lead=(0,)) == [(2, 4), (4, 5)]
    assert store.read("margins/val").shape == (2, 5)


def test_background_block_writes(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("margins/val", (1, 5), "float32", row_axis=1, block_rows=2)
    store.ensure_array("preds/val", (1, 5), "int64", row_axis=1, block_rows=2)
    store.grow(["margins/val", "preds/val"], 3)  # several arrays at once
    assert store.layout("margins/val").shape == (3, 5) and store.layout("preds/val").shape == (3, 5)
    buffer = np.arange(5, dtype=np.float32)
    writes = [("margins/val", s, buffer[s : s + 2], (2,)) for s in (0, 2, 4)]
    writes += [("preds/val", 0, np.array([7, 8]), (2,))]
    store.write_blocks(writes, wait=False)
    buffer[:] = -1  # the caller may reuse its buffer at once: the store wrote a copy
    # any read waits for the background writes first
    np.testing.assert_array_equal(store.read("margins/val")[2], np.arange(5, dtype=np.float32))
    assert store.incomplete_blocks("preds/val", lead=(2,)) == [(2, 4), (4, 5)]
    assert RunStore(tmp_path / "run").completed_blocks("margins/val", (2,)).all()


def test_background_write_errors_surface(tmp_path, monkeypatch):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("x", (4,), "float32", block_rows=2)

    def broken(data):
        raise OSError("disk full")

    monkeypatch.setattr(RunStore, "_store_values", staticmethod(broken))
    store.write_blocks([("x", 0, np.zeros(2), ())], wait=False)
    with pytest.raises(StoreError, match="background write .* failed: disk full"):
        store.flush()
    monkeypatch.undo()
    assert store.incomplete_blocks("x") == [(0, 2), (2, 4)]  # nothing flagged complete


def test_block_writes_must_be_whole_blocks(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.ensure_array("x", (10,), "float32", block_rows=4)
    with pytest.raises(StoreError, match="block boundary"):
        store.write_block("x", 2, np.zeros(4))
    with pytest.raises(StoreError, match="needs 4 rows"):
        store.write_block("x", 0, np.zeros(3))


def test_rank_blocks_partition():
    for n in (1, 2, 7, 10):
        for w in (1, 2, 3):
            got = [b for r in range(w) for b in rank_blocks(n, r, w)]
            assert got == list(range(n))


def test_checkpoints_round_trip_exactly_without_unpickling(tmp_path, monkeypatch):
    store = RunStore.create(tmp_path / "run")
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}
    store.save_checkpoint("epoch=1-step=10", tensors, {"epoch": 1, "global_step": 10, "learning_rates": [[0.1]]})

    def no_unpickling(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, meta = RunStore(tmp_path / "run").load_checkpoint("epoch=1-step=10")
    assert meta == {"epoch": 1, "global_step": 10, "learning_rates": [[0.1]]}
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert store.checkpoint_tags() == ["epoch=1-step=10"]
    with pytest.raises(StoreError, match="no checkpoint"):
        store.load_checkpoint("epoch=9-step=9")


def test_newer_schema_is_refused(tmp_path):
    RunStore.create(tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="upgrade lightning-tda"):
        RunStore(tmp_path / "run")
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION + 1  # untouched


def test_fingerprint_mismatch_names_both(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.set_fingerprint("train", {"size": 10, "labels_sha256": "aa"})
    store.set_fingerprint("train", {"size": 10, "labels_sha256": "aa"})
    with pytest.raises(FingerprintMismatchError, match="size 10.*size 11.*new store path"):
        store.set_fingerprint("train", {"size": 11, "labels_sha256": "bb"})
    assert store.manifest["fingerprints"]["train"]["size"] == 10


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_path_non_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="writable"):
        RunStore.create(locked / "run")


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="writable directory"):
        RunStore.create(blocker / "run")


def test_missing_store_and_names():
    with pytest.raises(StoreError, match="no RunStore at memory://nothing/here.*RunStore.create"):
        RunStore("memory://nothing/here")
    for bad in ["../x", "a/b", "", ".hidden", "a\\b"]:
        with pytest.raises(ValueError, match="no path separators"):
            validate_name(bad)


def test_fsspec_url_store():
    store = RunStore.create("memory://lightning-tda-test/run")
    store.ensure_array("preds/val", (1, 3), "int64", row_axis=1, block_rows=2)
    store.write_block("preds/val", 0, np.array([4, 5]), lead=(0,))
    store.save_checkpoint("t", {"w": torch.ones(2)})
    again = RunStore("memory://lightning-tda-test/run")
    assert again.read("preds/val")[0, :2].tolist() == [4, 5]
    assert torch.equal(again.load_checkpoint("t")[0]["w"], torch.ones(2))
    assert "preds/val" in again.summary()


def test_background_checkpoint_save(tmp_path):
    store = RunStore.create(tmp_path / "run")
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    store.save_checkpoint("epoch=0-step=5", weights, {"global_step": 5}, wait=False)
    weights["w"].zero_()  # training goes on: the store saved a copy taken at the call
    other = RunStore(tmp_path / "run")  # another instance on the same path
    other.update_manifest(lambda m: m.__setitem__("run_name", "concurrent"))
    tensors, meta = store.load_checkpoint("epoch=0-step=5")  # waits for the background save
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and meta == {"global_step": 5}
    manifest = RunStore(tmp_path / "run").manifest
    assert manifest["run_name"] == "concurrent" and "epoch=0-step=5" in manifest["checkpoints"]


@pytest.mark.parametrize("durable", [False, True])
def test_durable_store_syncs_manifest_and_checkpoints(tmp_path, monkeypatch, durable):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    store = RunStore.create(tmp_path / "run", durable=durable)
    store.save_checkpoint("t", {"w": torch.ones(2)})
    # the first manifest, the checkpoint file and the manifest listing it; nothing when not durable
    assert len(synced) == (3 if durable else 0)
    assert torch.equal(store.load_checkpoint("t")[0]["w"], torch.ones(2))


def test_checkpoint_listing_can_wait_for_flush(tmp_path):
    store = RunStore.create(tmp_path / "run")
    store.save_checkpoint("epoch=1-step=8", {"w": torch.ones(2)}, {"global_step": 8}, list_now=False)
    store.save_checkpoint("epoch=0-step=4", {"w": torch.zeros(2)}, {"global_step": 4}, list_now=False)
    assert store.manifest["checkpoints"] == {}  # the files are complete, the listing waits
    other = RunStore(tmp_path / "run")  # another process finds the files
    assert other.checkpoint_tags() == ["epoch=0-step=4", "epoch=1-step=8"]
    assert other.checkpoints()["epoch=1-step=8"] == {"global_step": 8}
    store.flush()  # one manifest write for both
    assert store.manifest["checkpoints"] == {"epoch=0-step=4": {"global_step": 4}, "epoch=1-step=8": {"global_step": 8}}
    (tmp_path / "run" / "checkpoints" / "epoch=2-step=9.safetensors.123.4.partial").write_bytes(b"torn")
    assert other.checkpoint_tags() == ["epoch=0-step=4", "epoch=1-step=8"]  # a torn temporary file is no checkpoint


def test_open_never_creates(tmp_path):
    with pytest.raises(StoreNotFoundError, match=r"no RunStore at .*typo.*RunStore.create"):
        RunStore(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()  # no stray directory left behind


def test_create_refuses_a_foreign_directory_and_an_existing_store(tmp_path):
    logs = tmp_path / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "hparams.yaml").write_text("lr: 0.1\n")
    with pytest.raises(StoreError, match=r"not empty and is not a RunStore.*hparams.yaml"):
        RunStore.create(logs)
    assert sorted(p.name for p in logs.iterdir()) == ["hparams.yaml"]  # nothing written into it
    RunStore.create(tmp_path / "run", run_name="a")
    with pytest.raises(StoreExistsError, match="already exists.*exist_ok=True"):
        RunStore.create(tmp_path / "run")
    assert RunStore.create(tmp_path / "run", exist_ok=True).manifest["run_name"] == "a"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunStore.create(empty).manifest["records"] == {}  # an empty directory is fine


def test_damaged_manifest_names_the_file(tmp_path):
    RunStore.create(tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(StoreError, match=r"manifest.json is damaged.*not valid JSON"):
        RunStore(tmp_path / "run")


def test_one_check_that_stores_share_their_datasets(tmp_path):
    from lightning_tda import schema
    from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError, check_stores_share_datasets

    def store(name, size, labels="abc"):
        s = RunStore.create(tmp_path / name)
        s.update_manifest(lambda m: m[schema.FINGERPRINTS].update(train={schema.FINGERPRINT_SIZE: size, schema.FINGERPRINT_LABELS: labels}))
        return s

    a, b, other = store("a", 10), store("b", 10), store("other", 12, "def")
    assert check_stores_share_datasets([a, b], ["train"], "why")["train"][schema.FINGERPRINT_SIZE] == 10
    with pytest.raises(FingerprintMismatchError, match=r"a and the RunStore at .*other were recorded on different datasets for the 'train' split \(sizes 10 and 12.*; because"):
        check_stores_share_datasets([a, b, other], ["train"], "because")
    with pytest.raises(StoreError, match=r"the RunStore at .*a has no 'test' dataset recorded \(it has \['train'\]\)"):
        check_stores_share_datasets([a, b], ["train", "test"], "why")
    with pytest.raises(ValueError, match="no stores given"):
        check_stores_share_datasets([], ["train"], "why")
