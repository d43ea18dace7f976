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
    return RunStore(root / "store", create=False)


def kill_and_resume(root, kill_at, phase):
    killed = run(root, "--kill-at", str(kill_at), "--kill-phase", phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = RunStore(root / "store", create=False)  # a killed store still opens
    incomplete = [n for n in store.array_names() if not store.is_complete(n)]
    resumed = run(root, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return incomplete


def test_kill_during_recording_then_resume(tmp_path, reference):
    rng = random.Random(20261124)
    kill_at = rng.randrange(2, 3 * WRITES_PER_RECORD)
    phase = rng.choice(["before", "between", "after"])
    kill_and_resume(tmp_path, kill_at, phase)
    assert_same_store(reference, RunStore(tmp_path / "store", create=False))


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before", "between", "after"])
@pytest.mark.parametrize("record", [0, 1, 2])
def test_kill_everywhere(tmp_path, reference, phase, record):
    kill_at = record * WRITES_PER_RECORD + 1 + (7 * record + 3) % WRITES_PER_RECORD
    kill_and_resume(tmp_path, kill_at, phase)
    assert_same_store(reference, RunStore(tmp_path / "store", create=False))
