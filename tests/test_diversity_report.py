"""diversity_report end to end: from models and from stores, logged to PNG/CSV files and an
offline W&B run (read back), saved and loaded without pickle."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_tda.data import DigitsDataModule
from lightning_tda.diversity import DiversityReport, DiversitySettings, diversity_report, representation_overlap
from lightning_tda.diversity.overlap import layer_embeddings
from lightning_tda.models import MLP, DigitsCNN
from lightning_tda.reporting import Reporter

from wandb_records import wait_for_history


def _models():
    torch.manual_seed(0)
    return {"cnn-a": DigitsCNN(width=4).eval(), "cnn-b": DigitsCNN(width=4).eval(), "mlp": MLP(hidden=16).eval()}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    return tmp_path


def test_report_logs_files_and_wandb_and_round_trips(offline_wandb):
    tmp_path = offline_wandb
    dm = DigitsDataModule()
    dm.setup()
    models = _models()
    descriptions = [{"seed": 0, "architecture": "cnn"}, {"seed": 1, "architecture": "cnn"}, {"seed": 0, "architecture": "mlp"}]
    report = diversity_report(models, dm.val_dataset, held_out=dm.train_dataset.without_transform(),
                              descriptions=descriptions, settings=DiversitySettings(anchors=("cnn-a",)))
    assert report.diversity.names == ("cnn-a", "cnn-b", "mlp")
    assert report.selection is not None and report.selection.n_selection == len(dm.train_dataset)
    train_emb = [layer_embeddings(models[k], "fc1" if k != "mlp" else "net.1", dm.train_dataset.without_transform()) for k in ("cnn-a", "mlp")]
    val_emb = [layer_embeddings(models[k], "fc1" if k != "mlp" else "net.1", dm.val_dataset) for k in ("cnn-a", "mlp")]
    overlap = representation_overlap(train_emb[0], train_emb[1], dm.train_dataset.targets, val_emb[0], val_emb[1],
                                     dm.val_dataset.targets, names=("cnn-a", "mlp"), repeats=1)
    report = DiversityReport(report.diversity, report.selection, (overlap,))

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    reporter = Reporter(tmp_path / "report", logger)
    report.log(reporter, "diversity")
    run = logger.experiment
    run_dir, run_id = Path(run.dir).parent, run.id
    run.finish()

    out = tmp_path / "report"
    for name in ("diversity", "diversity_heatmap", "diversity_confidence", "diversity_selection", "diversity_overlap_0"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000, name
    for name in ("diversity_table", "diversity_categories", "diversity_categories_anchored", "diversity_members",
                 "diversity_selection_table", "diversity_overlap_0_table"):
        assert (out / "tables" / f"{name}.csv").exists(), name
    with open(out / "tables" / "diversity_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model_a"], r["model_b"], r["category"]) for r in rows] == [
        ("cnn-a", "cnn-b", "seed"), ("cnn-a", "mlp", "architecture"), ("cnn-b", "mlp", "architecture")
    ]
    assert float(rows[0]["error_inconsistency"]) == pytest.approx(float(report.diversity.error_inconsistency[0, 1]))
    with open(out / "metrics.csv") as f:
        metrics = {r["name"]: float(r["value"]) for r in csv.DictReader(f)}
    assert metrics["diversity/mean_error_inconsistency"] == pytest.approx(report.diversity.summary()["mean_error_inconsistency"])

    expected = {"diversity", "diversity_heatmap", "diversity_confidence", "diversity_table", "diversity_categories",
                "diversity_selection", "diversity/mean_error_inconsistency", "diversity_overlap_0"}
    _, rows = wait_for_history(run_dir / f"run-{run_id}.wandb", expected)
    logged = {key for row in rows for key in row}
    for key in sorted(expected):
        assert key in logged, key

    report.save(tmp_path / "saved")
    loaded = DiversityReport.load(tmp_path / "saved")
    assert loaded.diversity.to_frame().equals(report.diversity.to_frame())
    assert loaded.selection.to_frame().equals(report.selection.to_frame())
    assert loaded.overlaps[0].to_frame().equals(overlap.to_frame())
    assert loaded.diversity.anchors == ("cnn-a",) and loaded.diversity.descriptions[2] == {"seed": 0, "architecture": "mlp"}
    np.testing.assert_array_equal(loaded.diversity.predictions, report.diversity.predictions)


def test_report_bad_inputs(tmp_path):
    dm = DigitsDataModule()
    dm.setup()
    with pytest.raises(ValueError, match="temperature scaling needs a held-out split"):
        diversity_report(_models(), dm.val_dataset)
    with pytest.raises(ValueError, match="split name is for stores"):
        diversity_report(_models(), dm.val_dataset, held_out="train")
    with pytest.raises(ValueError, match="anchors \\['resnet'\\] are not model names"):
        diversity_report(_models(), dm.val_dataset, held_out=0.5, settings=DiversitySettings(anchors=("resnet",)))
