"""ModelDiff from recorded runs: scores from stores (TRAK), fingerprints, the one-call pipeline,
and its logging to files and to an offline W&B run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tda.attribution import TRAK
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.modeldiff import ModelDiff, ModelDiffReport, PastePatch, compare_algorithms, square_patch
from lightning_tda.modeldiff.digits import CaseStudyData, digits_splits, record_runs
from lightning_tda.reporting import Reporter
from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny algorithms, two recorded models each (200 training and 60 test digits)."""
    root = tmp_path_factory.mktemp("modeldiff_runs")
    train, test = digits_splits(n_train=200, n_test=60)
    common = dict(num_models=2, epochs=2, proj_dim=32, record_epochs=(0,), progress=False)
    stores_a, models_a = record_runs(root, "plain", CaseStudyData(train, test), seed=0, **common)
    stores_b, models_b = record_runs(root, "slow", CaseStudyData(train, test, batch_size=100), lr=0.01, seed=10, **common)
    return train, test, stores_a, stores_b, models_a, models_b


def test_from_stores_scores_each_algorithm_and_its_halves(runs):
    _, _, stores_a, stores_b, _, _ = runs
    assert [s.manifest["algorithm"] for s in stores_a + stores_b] == ["plain", "plain", "slow", "slow"]
    assert len(stores_a[0].manifest["records"]["grads"]) == 2  # epoch 0 and the end of fit
    diff = ModelDiff.from_stores(stores_a, stores_b)
    assert diff.names == ("plain", "slow")  # the stores' algorithm labels
    scorer = TRAK(progress=False)
    by_hand = ModelDiff(
        scorer.score(stores_a), scorer.score(stores_b), ("plain", "slow"),
        halves_a=(scorer.score(stores_a[:1]), scorer.score(stores_a[1:])),
        halves_b=(scorer.score(stores_b[:1]), scorer.score(stores_b[1:])),
    )
    ours, theirs = diff.directions("a", 2), by_hand.directions("a", 2)
    np.testing.assert_allclose(ours.train_weights, theirs.train_weights, atol=1e-6)
    assert ours.noise_floor == pytest.approx(theirs.noise_floor) and ours.floor_measured
    assert ours.train_weights.shape == (2, 200) and ours.test_loadings.shape == (60, 2)


def test_stores_of_different_datasets_are_refused(runs, tmp_path):
    _, _, stores_a, _, _, _ = runs
    other = RunStore.create(tmp_path / "other")
    other.set_fingerprint("train", {"size": 150, "labels_sha256": "0" * 64})
    other.set_fingerprint("val", stores_a[0].manifest["fingerprints"]["val"])
    with pytest.raises(FingerprintMismatchError, match="different datasets for the 'train' split") as err:
        ModelDiff.from_stores(stores_a, [other, other])
    assert stores_a[0].path in str(err.value) and other.path in str(err.value)
    empty = RunStore.create(tmp_path / "empty")
    with pytest.raises(StoreError, match="no 'train' dataset"):
        ModelDiff.from_stores([empty], stores_a, noise_floor=False)


def test_one_model_per_algorithm_is_refused_for_the_floor(runs):
    _, _, stores_a, stores_b, _, _ = runs
    with pytest.raises(ValueError, match="at least 2 models per algorithm"):
        ModelDiff.from_stores(stores_a[:1], stores_b)
    d = ModelDiff.from_stores(stores_a[:1], stores_b[:1], noise_floor=False).directions("a", 2)
    assert not d.floor_measured
    with pytest.raises(TypeError, match="RunStores"):
        ModelDiff.from_stores(["path"], stores_b)
    with pytest.raises(ValueError, match="empty"):
        ModelDiff.from_stores([], stores_b)


def test_compare_algorithms_end_to_end_logs_files(runs, tmp_path):
    train, test, stores_a, stores_b, models_a, _ = runs
    patch = PastePatch(square_patch(2), (0, 0))
    report = compare_algorithms(
        stores_a, stores_b, train, test, transform=patch, target_class=4,
        model_fn=lambda: ImageClassifier(DigitsCNN()), fast=True,
    )
    assert report.directions_a.num == 3 and report.directions_a.top_train_images.shape == (3, 2, 6, 8, 8)
    assert report.verification is not None and len(report.verification.effects_a) == 2
    # the checkpoints loaded from the stores are the trained models
    direct = compare_algorithms(stores_a, stores_b, train, test, transform=patch, target_class=4, fast=True,
                                models_a=models_a, models_b=[ImageClassifier(DigitsCNN()).eval() for _ in range(2)])
    np.testing.assert_allclose(direct.verification.effects_a, report.verification.effects_a, atol=1e-6)

    report.log(Reporter(tmp_path / "report"), "md")
    figures = {p.name for p in (tmp_path / "report" / "figures").glob("*.png")}
    assert {"md_directions_a.png", "md_directions_a_examples.png", "md_verification.png", "md_summary.png"} <= figures
    with open(tmp_path / "report" / "tables" / "md_directions_a_direction0_examples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["train_positive_image"].endswith(".png")
    assert (tmp_path / "report" / "tables" / rows[0]["train_positive_image"]).exists()
    names = {row.split(",")[1] for row in (tmp_path / "report" / "metrics.csv").read_text().splitlines()[1:]}
    assert "md_directions_a/noise_floor" in names and "md_verification/effect_a" in names

    loaded = ModelDiffReport.load(report.save(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.directions_b.train_weights, report.directions_b.train_weights)
    assert loaded.verification.ci_a == report.verification.ci_a


def test_report_goes_to_an_offline_wandb_run(runs, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import wait_for_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    train, test, stores_a, stores_b, models_a, models_b = runs
    report = compare_algorithms(stores_a, stores_b, train, test, num=2, images=3, transform=PastePatch(square_patch(2), (0, 0)),
                                target_class=4, models_a=models_a, models_b=models_b, fast=True)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    report.log(Reporter(tmp_path / "report", logger), "md")
    run = logger.experiment
    run_dir, run_id = Path(run.dir).parent, run.id
    run.finish()
    expected = {"md_directions_a", "md_summary", "md_directions_a_direction0_examples", "md_verification_examples"}
    _, rows = wait_for_history(run_dir / f"run-{run_id}.wandb", expected)
    logged = {key: value for row in rows for key, value in row.items() if not key.startswith(("_", "trainer/"))}
    assert logged["md_directions_a"]["_type"] == "image-file" and logged["md_summary"]["_type"] == "image-file"
    table = logged["md_directions_a_direction0_examples"]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    assert logged["md_verification_examples"]["_type"] == "table-file"
    assert "md_directions_b/noise_floor" in logged
    assert (tmp_path / "report" / "figures" / "md_summary.png").exists()  # the PNGs are written either way


def test_compare_algorithms_bad_input(runs):
    train, test, stores_a, stores_b, _, _ = runs
    with pytest.raises(ValueError, match="target_class"):
        compare_algorithms(stores_a, stores_b, train, test, transform=lambda x: x, fast=True)
    with pytest.raises(ValueError, match="same shape"):
        compare_algorithms(stores_a, stores_b, train, test, transform=lambda x: x[:, :, :4], target_class=1, fast=True,
                           model_fn=lambda: ImageClassifier(DigitsCNN()))
    with pytest.raises(ValueError, match="training and .* test examples"):
        ModelDiff.from_stores(stores_a, stores_b).directions("a", 2).with_images(train, torch.zeros(5, 1, 8, 8))


@pytest.mark.slow
def test_two_runs_of_one_algorithm_on_digits_give_nothing_above_the_floor(tmp_path):
    """The null on real TRAK scores: the same algorithm (plain training) recorded twice with
    different seeds, 4 models each (the examples' --fast setting)."""
    from lightning_tda.modeldiff.case_study import RECORD_EPOCHS

    train, test = digits_splits()
    common = dict(num_models=4, epochs=8, proj_dim=512, record_epochs=RECORD_EPOCHS, progress=False)
    stores_a, _ = record_runs(tmp_path, "first", CaseStudyData(train, test), seed=100, **common)
    stores_b, _ = record_runs(tmp_path, "second", CaseStudyData(train, test), seed=200, **common)
    diff = ModelDiff.from_stores(stores_a, stores_b)
    for of in ("a", "b"):
        d = diff.directions(of, 3)
        assert d.floor_measured and not d.distinguishing.any(), (of, d.gap, d.noise_floor)
