"""Peers at their defaults and tuned best: the tuning picks from the grid, on a problem the
reported tables never read, and the one-pass TMC tolerance sweep equals TMC Shapley run alone."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tda.modelpred import make_target
from lightning_tda.modelpred.baselines import influence_values, knn_utility, tmc_shapley
from lightning_tda.modelpred.peer_settings import DEFAULTS, GRIDS, tmc_tolerance_sweep, tune_peer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_studies():
    spec = importlib.util.spec_from_file_location("bench_modelpred_studies_peers", BENCHMARKS / "modelpred_studies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tmc_tolerance_sweep_equals_tmc_shapley_at_each_tolerance():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(14, 3)), rng.integers(0, 2, 14)
    xt, yt = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    utility = lambda masks: knn_utility(x, y, xt, yt, masks, k=3)  # noqa: E731
    full = float(utility(np.ones((1, 14), dtype=bool))[0])
    tolerances = [0.01, 0.1, 0.3]
    sweep = tmc_tolerance_sweep(utility, 14, 0.0, full, 6, tolerances, seed=3)
    retrainings = []
    for tolerance in tolerances:
        alone = tmc_shapley(utility, 14, 0.0, full, 6, tolerance, seed=3)
        np.testing.assert_allclose(sweep[tolerance].values, alone.values, atol=1e-12)
        assert sweep[tolerance].settings["retrainings"] == alone.settings["retrainings"]
        retrainings.append(alone.settings["retrainings"])
    assert retrainings[0] > retrainings[-1]  # the case truncates: larger tolerances retrain less
    with pytest.raises(ValueError, match="tolerances must be > 0"):
        tmc_tolerance_sweep(utility, 14, 0.0, full, 2, [0.0], seed=0)


def test_influence_damping_tends_to_the_gradient_product():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 2, 30)
    target = make_target("logistic", x, y, num_classes=2)
    plain = influence_values(target, x[:10], y[:10])
    assert plain.settings["damping"] == 0.0 and plain.method == "influence function"
    damped = influence_values(target, x[:10], y[:10], damping=1e6)
    from lightning_tda.modelpred.utility import HeldOutUtility

    test = HeldOutUtility(target, x[:10], y[:10])
    theta = target.solve(torch.ones(1, 30, dtype=torch.float64))[0]
    product = target.C * (target.loss_gradients(theta) @ target.loss_gradients(theta, test.x, test.y).mean(0)) / 1e6
    np.testing.assert_allclose(damped.values, product.numpy(), rtol=1e-4)
    assert not np.allclose(plain.values, damped.values * 1e6, rtol=1e-2)
    with pytest.raises(ValueError, match="damping"):
        influence_values(target, x[:10], y[:10], damping=-1.0)


def test_tuning_picks_from_the_grid_with_ties_to_the_default():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 2, 40)
    flipped = np.zeros(40, dtype=bool)
    flipped[:4] = True
    target = make_target("logistic", x, y, num_classes=2)
    from lightning_tda.modelpred.utility import HeldOutUtility

    utility = HeldOutUtility(target, x[:20], y[:20])
    tuned = tune_peer("knn_shapley", target, torch.as_tensor(x), torch.as_tensor(y), flipped, utility, 2, 0)
    assert tuned["best"] in GRIDS["knn_shapley"] and tuned["grid"] == GRIDS["knn_shapley"]
    assert tuned["precision"][GRIDS["knn_shapley"].index(tuned["best"])] == max(tuned["precision"])
    if tuned["precision"][GRIDS["knn_shapley"].index(DEFAULTS["knn_shapley"])] == max(tuned["precision"]):
        assert tuned["best"] == DEFAULTS["knn_shapley"]


def test_studies_tuning_never_reads_the_reported_split(monkeypatch):
    studies = load_studies()
    seen_seeds = []
    original = studies.load_data

    def recording(name, n_train, n_test, seed=0):
        seen_seeds.append(seed)
        return original(name, n_train, n_test, seed=seed)

    monkeypatch.setattr(studies, "load_data", recording)
    args = argparse.Namespace(n_train=40, n_test=30, tmc_permutations=2, tuning_seed=1,
                              peer_grids={"data_oob": [{"num_models": 5, "max_features": None}, {"num_models": 5, "max_features": "sqrt"}],
                                          "data_oob_target": [{"num_models": 4}, {"num_models": 6}],
                                          "tmc_shapley": [{"truncation_tolerance": 0.05}, {"truncation_tolerance": 0.2}]})
    tuning = studies.peer_tuning_section(args, "breast-cancer")
    assert seen_seeds and studies.REPORTED_SEED not in seen_seeds
    assert tuning["split_seed"] != studies.REPORTED_SEED and tuning["flip_seed"] != studies.REPORTED_SEED
    reported = studies.split_order("breast-cancer", studies.REPORTED_SEED)[:40].tolist()
    assert tuning["train_indices"] != reported and len(set(tuning["train_indices"]) ^ set(reported)) > 0
    for method, t in tuning["peers"].items():
        grid = args.peer_grids.get(method, GRIDS.get(method, [DEFAULTS[method]]))
        assert t["best"] in grid, method
        if t["precision"]:
            assert t["precision"][grid.index(t["best"])] == max(t["precision"]), method
    with pytest.raises(SystemExit, match="tuning-seed must differ"):
        studies.peer_tuning_section(argparse.Namespace(**{**vars(args), "tuning_seed": studies.REPORTED_SEED}), "breast-cancer")
