"""SIGKILL a recording run at a random block write, resume from the last Lightning checkpoint,
and check the finished store equals an uninterrupted run's."""

import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tda.store import RunStore

SCRIPT = Path(__file__).with_name("record_run.py")
# per epoch: train 200 rows / 40 = 5 blocks, val 359 / 40 = 9 blocks; margins write 4 arrays,
# gradients 2 (the kill switch counts block writes of both recorders)
WRITES_PER_RECORD = (5 + 9) * (4 + 2)


def run(root, *args):
    return subprocess.run([sys.executable, str(SCRIPT), str(root), *args], capture_output=True, text=True, timeout=300)


def assert_same_store(a: RunStore, b: RunStore) -> None:
    assert a.array_names() == b.array_names()
    for name in a.array_names():
        assert b.is_complete(name), name
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
    ma, mb = a.manifest, b.manifest
    assert ma["records"] == mb["records"] and ma["checkpoints"] == mb["checkpoints"]
    for tag in a.checkpoint_tags():
        ta, tb = a.load_checkpoint(tag)[0], b.load_checkpoint(tag)[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta), tag


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = run(root)
    assert done.returncode == 0, done.stderr[-3000:]
    return RunStore(root / "store")


def kill_and_resume(root, kill_at, phase):
    killed = run(root, "--kill-at", str(kill_at), "--kill-phase", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = RunStore(root / "store")  # a killed store still opens
    incomplete = [n for n in store.array_names() if not store.is_complete(n)]
    resumed = run(root, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return incomplete


def test_kill_during_recording_then_resume(tmp_path, reference):
    rng = random.Random(20261124)
    kill_at = rng.randrange(2, 3 * WRITES_PER_RECORD)
    phase = rng.choice(["before", "between", "after"])
    kill_and_resume(tmp_path, kill_at, phase)
    assert_same_store(reference, RunStore(tmp_path / "store"))


def test_kill_after_a_lightning_checkpoint_on_an_epochs_last_step(tmp_path, reference):
    # 200 rows in batches of 32: 7 steps an epoch. Lightning checkpoints at step 14, after epoch
    # 1's last batch; the kill comes before epoch 1 ends, so no recorder has seen that epoch end,
    # and the resume does not replay it: the recorders take it at the start of training.
    killed = run(tmp_path, "--lightning-every-step", "7", "--kill-at-epoch-end", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["tag"] for r in RunStore(tmp_path / "store").manifest["records"]["margins"]] == ["epoch=0"]
    resumed = run(tmp_path, "--lightning-every-step", "7", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    store = RunStore(tmp_path / "store")
    assert store.manifest["records"] == reference.manifest["records"]  # margins' and gradients'
    assert store.checkpoints() == reference.checkpoints()
    # Lightning itself resumes from such a checkpoint with another data order (its final weights
    # differ from an uninterrupted run's, recorders or not), so only epochs 0 and 1 must match.
    for name in store.array_names():
        assert store.is_complete(name), name
        if name.startswith(("margins/", "losses/", "preds/", "embeddings/")):  # [record, example, ...]
            np.testing.assert_array_equal(store.read(name)[:2], reference.read(name)[:2], err_msg=name)
        elif "/epoch=0" in name or "/epoch=1" in name:  # a record's gradients, out_to_loss
            np.testing.assert_array_equal(store.read(name), reference.read(name), err_msg=name)
    for tag in ["epoch=0-step=7", "epoch=1-step=14"]:
        ours, theirs = store.load_checkpoint(tag)[0], reference.load_checkpoint(tag)[0]
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), tag


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before", "between", "after"])
@pytest.mark.parametrize("record", [0, 1, 2])
def test_kill_everywhere(tmp_path, reference, phase, record):
    kill_at = record * WRITES_PER_RECORD + 1 + (7 * record + 3) % WRITES_PER_RECORD
    kill_and_resume(tmp_path, kill_at, phase)
    assert_same_store(reference, RunStore(tmp_path / "store"))


def test_unfinished_epoch_end_reads_lightnings_loop_state():
    from lightning_tda.callbacks.recording import unfinished_epoch_end

    def ckpt(last_batch, processed):
        progress = {"ready": 2, "started": 2, "processed": processed, "completed": 1}
        loop = {"epoch_loop.batch_progress": {"is_last_batch": last_batch}, "epoch_progress": {"current": progress}}
        return {"epoch": 1, "loops": {"fit_loop": loop}}

    assert unfinished_epoch_end(ckpt(True, 1)) == 1  # after the last batch, before the epoch's end
    assert unfinished_epoch_end(ckpt(True, 2)) is None  # the epoch's end ran (ModelCheckpoint there)
    assert unfinished_epoch_end(ckpt(False, 1)) is None  # mid-epoch
    assert unfinished_epoch_end({"epoch": 1}) is None  # no loop state (not a fit checkpoint)
