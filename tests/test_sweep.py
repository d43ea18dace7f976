"""SubsetSweep: resumable after SIGKILL, shardable across processes, clear errors."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_tda.data import DigitsDataModule
from lightning_tda.ensemble import random_subset_masks
from lightning_tda.models import MLP
from lightning_tda.store import RunStore, StoreError
from lightning_tda.sweep import SubsetSweep, read_sweep, sweep_progress

SCRIPT = Path(__file__).with_name("sweep_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from sweep_run import make_sweep  # noqa: E402


def run(*args):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same(a: RunStore, b: RunStore):
    for split in ("val", "train"):
        ma, oa = read_sweep(a, split)
        mb, ob = read_sweep(b, split)
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_allclose(oa, ob, rtol=1e-6, atol=1e-6)
    assert a.manifest["sweep"] == b.manifest["sweep"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = make_sweep(str(tmp_path_factory.mktemp("ref") / "store")).run()
    assert sweep_progress(store) == (12, 12)
    return store


def test_sweep_records_masks_and_margins(reference):
    masks, margins = read_sweep(reference, "val")
    assert masks.shape == (12, 120) and margins.shape == (12, 40)
    assert (masks.sum(1) == 60).all()
    np.testing.assert_array_equal(masks, random_subset_masks(12, 120, 0.5, seed=3).numpy())
    assert np.isfinite(margins).all() and margins.std(0).mean() > 0  # models differ
    _, train_margins = read_sweep(reference, "train")
    # in-subset examples are fit better than held-out ones: the masks really select the training data
    assert train_margins[masks].mean() > train_margins[~masks].mean()


def test_killed_sweep_resumes_to_the_same_store(tmp_path, reference):
    store = tmp_path / "store"
    killed = run(store, "--kill-after-blocks", 2)
    killed.wait(timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-2000:]
    assert sweep_progress(RunStore(store)) == (8, 12)
    resumed = run(store)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert_same(reference, RunStore(store))


def test_two_shards_in_two_processes_equal_one_process(tmp_path, reference):
    store = tmp_path / "store"
    shards = [run(store, "--shard", i, "--num-shards", 2) for i in range(2)]
    for p in shards:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    assert_same(reference, RunStore(store))


def test_bad_input(tmp_path):
    dm = DigitsDataModule(n_train=50)
    dm.setup()
    common = dict(model_fn=lambda: MLP(64, 8, 10), train_dataset=dm.recording_dataset("train"),
                  eval_datasets={"val": dm.recording_dataset("val")})
    for alpha in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
            SubsetSweep(tmp_path / "a", alpha=alpha, **common)
    with pytest.raises(ValueError, match="num_models must be a positive integer"):
        SubsetSweep(tmp_path / "b", num_models=0, **common)
    with pytest.raises(ValueError, match="shard_index"):
        SubsetSweep(tmp_path / "c", shard_index=2, num_shards=2, **common)
    sweep = SubsetSweep(tmp_path / "d", num_models=4, epochs=1, **common)
    sweep.prepare()
    with pytest.raises(StoreError, match=r"holds another sweep \(settings differ in \['num_models'\]\).*overwrite=True"):
        SubsetSweep(tmp_path / "d", num_models=8, epochs=1, **common).prepare()
    with pytest.warns(UserWarning, match="overwrite=True cleared"):
        SubsetSweep(tmp_path / "d", num_models=8, epochs=1, overwrite=True, **common).prepare()
    assert RunStore(tmp_path / "d").manifest["sweep"]["num_models"] == 8
