"""Bad input across the public API: each case gets a clear error that names the problem, and
leaves every file already in the store byte-identical (the tree is hashed before and after).

One table, so a new public entry point adds its bad inputs here."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tda.attribution import TRAK, top_k
from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder, MarginRecorder
from lightning_tda.callbacks.margin_recorder import read_margins
from lightning_tda.data import DigitsDataModule
from lightning_tda.datamodels import lds
from lightning_tda.dcor import distance_correlation
from lightning_tda.models import MLP, DigitsCNN, ImageClassifier
from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError, StoreExistsError, StoreNotFoundError
from lightning_tda.sweep import SubsetSweep

from conftest import trainer_kwargs

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the set of directories), by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def small_dm(**kw) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, n_train=128, **kw)


def fit(root: Path, callbacks, seed: int = 0, epochs: int = 1, ckpt_path=None, dm=None) -> None:
    L.seed_everything(seed, verbose=False)
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs(root, enable_checkpointing=checkpointing))
    trainer.fit(ImageClassifier(DigitsCNN(width=4), lr=0.05), dm or small_dm(), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A directory holding one recorded run (margins, checkpoints, projected gradients)."""
    root = tmp_path_factory.mktemp("bad_input")
    store = root / "run"
    fit(root, [
        MarginRecorder(store, splits=("train", "val")),
        CheckpointRecorder(store),
        GradientRecorder(store, proj_dim=16, splits=("train", "val")),
    ])
    (root / "margins_only").mkdir()
    fit(root, [MarginRecorder(root / "margins_only" / "run", splits=("val",))])
    return root


def damaged_copy(root: Path, name: str, damage: Callable[[Path], None]) -> Path:
    """A copy of the recorded store with ``damage`` applied (the original stays intact)."""
    copy = root / "damaged" / name
    if not copy.exists():
        shutil.copytree(root / "run", copy)
        damage(copy)
    return copy


def truncate_manifest(store: Path) -> None:
    path = store / "manifest.json"
    path.write_text(path.read_text()[:100])


def edit_manifest(store: Path) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["records"] = [manifest["records"]]  # valid JSON, wrong structure
    path.write_text(json.dumps(manifest))


def drop_array(store: Path) -> None:
    shutil.rmtree(store / "arrays" / "margins" / "val")


def truncate_chunk(store: Path) -> None:
    chunk = next(p for p in sorted((store / "arrays" / "margins" / "val").iterdir()) if p.name.startswith("c."))
    chunk.write_bytes(chunk.read_bytes()[:7])


def truncate_checkpoint(store: Path) -> None:
    ckpt = sorted((store / "checkpoints").iterdir())[0]
    ckpt.write_bytes(ckpt.read_bytes()[:50])


def run_example(args: list[str], cwd: Path) -> None:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1]}")


def fresh_fit_into_recorded(root: Path) -> None:
    fit(root / "fresh", [MarginRecorder(root / "run", splits=("train", "val"))], seed=1)


def other_dataset_into_recorded(root: Path) -> None:
    fit(root / "other", [MarginRecorder(root / "run", splits=("val",))], dm=small_dm(split_seed=3))


def sweep(root: Path, store: Path, **kw) -> SubsetSweep:
    dm = DigitsDataModule(n_train=40)
    dm.setup()
    return SubsetSweep(store, model_fn=lambda: MLP(64, 8, 10), train_dataset=dm.recording_dataset("train"),
                       eval_datasets={"val": dm.recording_dataset("val")}, num_models=2, epochs=1, progress=False, **kw)


def lds_of_wrong_shape(root: Path) -> None:
    masks = np.ones((4, 10), bool)
    lds(np.zeros((3, 9)), masks, np.zeros((4, 3)))


# (id, call, exception, message regex): every message names the problem and, where there is one, the fix
CASES: list[tuple[str, Callable[[Path], object], type[BaseException] | tuple, str]] = [
    ("open a mistyped path", lambda r: RunStore(r / "runn"), StoreNotFoundError, r"no RunStore at .*runn.*RunStore.create"),
    ("create over an existing store", lambda r: RunStore.create(r / "run"), StoreExistsError, "already exists.*exist_ok"),
    ("create in a foreign directory", lambda r: RunStore.create(r / "margins_only"), StoreError, "not empty and is not a RunStore"),
    ("truncated manifest", lambda r: RunStore(damaged_copy(r, "truncated", truncate_manifest)), StoreError, r"manifest.json is damaged.*not valid JSON"),
    ("hand-edited manifest", lambda r: RunStore(damaged_copy(r, "edited", edit_manifest)), StoreError, r"manifest.json is damaged or was edited by hand: field 'records'"),
    ("missing array", lambda r: read_margins(RunStore(damaged_copy(r, "no_array", drop_array)), "val"), StoreError, r"no array 'margins/val'.*deleted.*resume"),
    ("chunk of the wrong size", lambda r: RunStore(damaged_copy(r, "torn_chunk", truncate_chunk)).read("margins/val"), StoreError, r"damaged chunk files .*c\.0\.0.*Delete them and resume"),
    ("unreadable checkpoint", lambda r: (lambda s: s.load_checkpoint(s.checkpoint_tags()[0]))(RunStore(damaged_copy(r, "torn_ckpt", truncate_checkpoint))), StoreError, r"checkpoint file .*safetensors cannot be read.*Delete it and resume"),
    ("a checkpoint that is not there", lambda r: RunStore(r / "run").load_checkpoint("epoch=99-step=1"), StoreError, r"no checkpoint 'epoch=99-step=1'.*it has \['epoch=0"),
    ("a fresh run into a recorded store", fresh_fit_into_recorded, StoreError, "already holds another training run.*overwrite=True"),
    ("another dataset into a recorded store", other_dataset_into_recorded, FingerprintMismatchError, "another 'val' dataset.*new store path"),
    ("a split name with a separator", lambda r: RunStore(r / "run").set_fingerprint("../val", {"size": 1}), ValueError, r"invalid split name '\.\./val'.*no path separators"),
    ("splits as a string", lambda r: MarginRecorder(r / "run", splits="train"), ValueError, "splits must be a non-empty sequence"),
    ("a schedule that records nothing", lambda r: MarginRecorder(r / "run", every_n_epochs=None, on_fit_end=False), ValueError, "nothing would be recorded"),
    ("every_n_epochs = 0", lambda r: CheckpointRecorder(r / "run", every_n_epochs=0), ValueError, "every_n_epochs must be a positive integer"),
    ("proj_dim = 0", lambda r: GradientRecorder(r / "run", proj_dim=0), ValueError, "proj_dim must be a positive integer"),
    ("an unknown gradient engine", lambda r: GradientRecorder(r / "run", engine="fast"), ValueError, "engine must be 'factored' or 'exact'"),
    ("overwrite that is not a bool", lambda r: MarginRecorder(r / "run", overwrite="yes"), TypeError, "overwrite must be True or False"),
    ("a block write off a block boundary", lambda r: RunStore(r / "run").write_block("margins/val", 3, np.zeros(3), lead=(0,)), StoreError, "not a block boundary"),
    ("negative TRAK damping", lambda r: TRAK(damping=-1.0), ValueError, "damping must be >= 0"),
    ("TRAK on a store without gradients", lambda r: TRAK(progress=False).score(RunStore(r / "margins_only" / "run")), StoreError, "has no recorded gradients.*GradientRecorder"),
    ("top_k with k = 0", lambda r: top_k(np.zeros((2, 3)), k=0), ValueError, r"k must be in \[1, 3\]"),
    ("a sweep with alpha = 0", lambda r: sweep(r, r / "sweep_a", alpha=0.0), ValueError, r"alpha must be in \(0, 1\]"),
    ("a sweep into a recorded run's store", lambda r: sweep(r, r / "run").prepare(), StoreError, "holds records of a training run.*new store path"),
    ("lds with scores of the wrong shape", lds_of_wrong_shape, ValueError, r"scores cover 9 training examples .* masks have 10"),
    ("dCor of samples of different sizes", lambda r: distance_correlation(torch.randn(5, 2), torch.randn(6, 2)), ValueError, "same number of samples|rows|samples"),
    ("dCor with an unknown method", lambda r: distance_correlation(torch.randn(5, 2), torch.randn(5, 2), method="fast"), ValueError, "method"),
    ("record_digits --epochs 0", lambda r: run_example([str(REPO / "examples" / "record_digits.py"), "--epochs", "0", "--store", str(r / "ex")], r), SystemExit, r"exit 2: .*--epochs: must be >= 1, got 0"),
    ("record_digits --epochs -1", lambda r: run_example([str(REPO / "examples" / "record_digits.py"), "--epochs", "-1", "--store", str(r / "ex")], r), SystemExit, r"exit 2: .*--epochs: must be >= 1, got -1"),
    ("record_digits into a recorded store", lambda r: run_example([str(REPO / "examples" / "record_digits.py"), "--fast", "--store", str(r / "margins_only" / "run")], r), SystemExit, "exit 1: .*already holds another training run"),
    ("dcor example with a negative weight", lambda r: run_example([str(REPO / "examples" / "dcor_diverse_models.py"), "--weight", "-1"], r), SystemExit, r"exit 2: .*--weight: must be a finite number >= 0"),
]


def test_the_table_has_at_least_twenty_cases():
    assert len({case[0] for case in CASES}) >= 20


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_leaves_stores_intact(root, name, call, error, message):
    before = tree_hashes(root)
    with pytest.raises(error, match=message):
        call(root)
    after = tree_hashes(root)
    # nothing already there changed; only the damaged copies a case makes for itself appear
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"{name} changed {sorted(changed)[:5]}"
    new = sorted(k for k in after if k not in before and not k.startswith("damaged"))
    assert not new, f"{name} wrote {new[:5]}"
