"""The ``lightning-tda`` command: every subcommand on stores made here, one-line errors with exit
code 2 that write nothing, and the sweep scaled out over 2 processes and 2 torchrun "nodes"."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder, MarginRecorder
from lightning_tda.cli import main
from lightning_tda.data import DigitsDataModule
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.store import RunStore
from lightning_tda.sweep import read_sweep

from conftest import trainer_kwargs

N_TRAIN = 120
ENV = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def record(root: Path, name: str, seed: int, split_seed: int = 0, gradients: bool = True) -> Path:
    L.seed_everything(seed, verbose=False)
    store = root / name
    callbacks = [MarginRecorder(store, logits=True), CheckpointRecorder(store)]
    if gradients:
        callbacks.append(GradientRecorder(store, proj_dim=64))
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, **trainer_kwargs(root / "trainer"))
    trainer.fit(ImageClassifier(DigitsCNN(width=4), lr=0.1), DigitsDataModule(batch_size=32, n_train=N_TRAIN, split_seed=split_seed))
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "a": record(root, "a", 0),
        "b": record(root, "b", 1),
        "margins_only": record(root, "margins_only", 2, gradients=False),
        "other_data": record(root, "other_data", 3, split_seed=1),
        "c": record(root, "c", 4),
        "d": record(root, "d", 5),
        "root": root,
    }


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_subcommand_has_help(capsys):
    for command in ["demo", "attribute", "lds", "modeldiff", "diversity", "report", "sweep"]:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "usage: lightning-tda" in capsys.readouterr().out
    assert main(["record", "fit", "--help"]) == 0
    assert "--trainer.max_epochs" in capsys.readouterr().out


def test_attribute_and_report(stores, tmp_path, capsys):
    out = tmp_path / "attribute"
    assert main(["attribute", str(stores["a"]), str(stores["b"]), "--out", str(out), "--top", "3"]) == 0
    scores = np.load(out / "scores.npy")
    assert scores.shape == (359, N_TRAIN) and np.isfinite(scores).all()
    page = (out / "report.html").read_text()
    assert "Attribution (trak)" in page and "Self-influence" in page and page.count("data:image/png;base64,") > 10
    assert (out / "tables" / "trak_top_examples.csv").exists()
    assert main(["report", str(stores["a"]), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Run a" in page and "accuracy over training" not in page or "a_training" in page
    assert (tmp_path / "report" / "figures" / "a_training.png").exists()


def test_diversity(stores, tmp_path):
    out = tmp_path / "diversity"
    assert main(["diversity", str(stores["a"]), str(stores["b"]), str(stores["margins_only"]), "--out", str(out)]) == 0
    assert (out / "report.html").exists() and any((out / "figures").iterdir())


def test_modeldiff(stores, tmp_path, capsys):
    out = tmp_path / "modeldiff"
    args = ["modeldiff", "--a", str(stores["a"]), str(stores["b"]), "--b", str(stores["c"]), str(stores["d"])]
    assert main([*args, "--num", "2", "--names", "[first, second]", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "ModelDiff" in page and page.count("data:image/png;base64,") >= 4
    assert "noise_floor" in capsys.readouterr().out


def test_sweep_on_two_processes_equals_one_and_lds(stores, tmp_path):
    common = ["--num_models", "4", "--models_per_block", "1", "--epochs", "1", "--model", "mlp", "--n_train", str(N_TRAIN)]
    one = tmp_path / "one"
    assert main(["sweep", "--store", str(one), *common]) == 0
    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_tda.cli", "sweep", "--store", str(two), *common, "--trainer.devices", "2"],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4/4 models complete" in done.stdout and "(2 rank(s))" in done.stdout
    for a, b in zip(read_sweep(RunStore(one), "val"), read_sweep(RunStore(two), "val")):
        np.testing.assert_array_equal(a, b)
    out = tmp_path / "lds"
    assert main(["lds", str(stores["a"]), str(stores["b"]), "--sweep", str(one), "--out", str(out)]) == 0
    assert "lds/trak" in (out / "metrics.csv").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
def test_sweep_on_two_torchrun_nodes_equals_one_process(tmp_path):
    """The README's cluster recipe, simulated: two torchrun "nodes" on localhost, one rank each."""
    common = ["--num_models", "4", "--models_per_block", "1", "--epochs", "1", "--model", "mlp", "--n_train", "60"]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc-per-node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "lightning_tda.cli", "sweep", "--store", str(tmp_path / "nodes"), *common, "--trainer.num_nodes", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "4/4 models complete" in outputs[0][0] and "(2 rank(s))" in outputs[0][0]
    assert main(["sweep", "--store", str(tmp_path / "single"), *common]) == 0
    for a, b in zip(read_sweep(RunStore(tmp_path / "single"), "val"), read_sweep(RunStore(tmp_path / "nodes"), "val")):
        np.testing.assert_array_equal(a, b)


BAD = [
    ("a path that is not a store", lambda s, o: ["attribute", str(s["root"] / "nope"), "--out", o], r"no RunStore at .*nope"),
    ("a store without gradients", lambda s, o: ["attribute", str(s["margins_only"]), "--out", o], r"has no recorded gradients.*GradientRecorder"),
    ("an unknown scorer", lambda s, o: ["attribute", str(s["a"]), "--scorer", "magic", "--out", o], r'"scorer".*Got value: magic'),
    ("stores of different datasets", lambda s, o: ["attribute", str(s["a"]), str(s["other_data"]), "--out", o], r"a and .*other_data were recorded on different datasets for the 'train' split"),
    ("diversity of different datasets", lambda s, o: ["diversity", str(s["a"]), str(s["other_data"]), "--out", o], r"a and .*other_data were recorded on different datasets for the 'val' split"),
    ("modeldiff of different datasets", lambda s, o: ["modeldiff", "--a", str(s["a"]), str(s["b"]), "--b", str(s["c"]), str(s["other_data"]), "--out", o], r"a and .*other_data were recorded on different datasets for the 'train' split"),
    ("modeldiff with one run of B", lambda s, o: ["modeldiff", "--a", str(s["a"]), str(s["b"]), "--b", str(s["c"]), "--out", o], r"at least 2 runs per algorithm"),
    ("lds against a store that is no sweep", lambda s, o: ["lds", str(s["a"]), "--sweep", str(s["b"]), "--out", o], r"holds no subset sweep"),
    ("a report into a store", lambda s, o: ["report", str(s["a"]), "--out", str(s["b"])], r"--out .* is a RunStore"),
    ("a sweep with alpha 0", lambda s, o: ["sweep", "--store", o, "--alpha", "0"], r"--alpha must be in \(0, 1\]"),
    ("a sweep into a run's store", lambda s, o: ["sweep", "--store", str(s["a"]), "--num_models", "2", "--epochs", "1"], r"holds records of a training run"),
    ("an unknown subcommand", lambda s, o: ["explain", str(s["a"])], r"explain"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(stores, tmp_path, capsys, name, args, message):
    import re

    out = tmp_path / "out"
    before = tree(stores["root"])
    assert main(args(stores, str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightning-tda"), err
    assert re.search(message, err), err
    assert not out.exists()
    assert tree(stores["root"]) == before
