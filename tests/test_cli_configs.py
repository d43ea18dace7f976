"""The YAML files in callbacks/ add the recorders to an unmodified LightningCLI script."""

import subprocess
import sys
from pathlib import Path

from lightning_tda.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def test_configs_add_the_recorders(tmp_path):
    cmd = [
        sys.executable, str(REPO / "examples" / "cli_train.py"), "fit",
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--data.n_train=128",
        "--config", str(REPO / "callbacks" / "record_margins.yaml"),
        "--config", str(REPO / "callbacks" / "record_checkpoints.yaml"),
        "--config", str(REPO / "callbacks" / "record_gradients.yaml"),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = RunStore(tmp_path / "lightning_tda_store")
    assert [r["tag"] for r in store.manifest["records"]["margins"]] == ["epoch=0", "epoch=1"]
    assert store.read("margins/train").shape == (2, 128) and store.is_complete("margins/val")
    assert len(store.checkpoint_tags()) == 2
    assert [r["tag"] for r in store.manifest["records"]["grads"]] == ["fit_end"]
    assert store.read("grads/val/fit_end").shape == (359, 2048)
