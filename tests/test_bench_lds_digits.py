"""The LDS benchmark runs end to end in quick mode (sweeps, runs, traker, ridge choice, table), and
its shortcut for traker's ridge grid equals a fresh TRAKer built with that ridge."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("trak")
    out = tmp_path_factory.mktemp("lds") / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lds_digits.py"), "--quick", "--out", str(out)],
        cwd=out.parent, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_lds_digits_quick(quick_run):
    out, stdout = quick_run
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["r"] in [float(r) for r in tuning["mean_lds_factored"]]
    for header in ("ours factored, r = 0", "ours exact (dense JL), r = 0", "traker default (float16, lambda_reg = 0)",
                   "traker best (float32, lambda_reg chosen on held-out)", "TracIn (5 checkpoints per model)"):
        assert header in stdout
    assert "| 64 | 1 |" in stdout and "| 64 | 2 |" in stdout and "random scores (control)" in stdout
    assert (out / "lds_tuning.json").exists() and (out / "lds_table.json").exists()


def test_traker_ridge_grid_equals_a_fresh_traker(quick_run, tmp_path):
    out, _ = quick_run
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lds_digits as bench
    from _lds_traker import TrakerScores, make_traker

    cfg = bench.QUICK
    data = bench.datasets(cfg)
    k, lam = cfg.ks[0], 0.37
    cached = TrakerScores(out / "traker" / f"table-k{k}-float32", cfg.n_train, k, half=False)
    assert cached.done
    shortcut = cached.scores("test", [0, 1], lam)

    fresh = make_traker(tmp_path / "fresh", cfg.n_train, k, half=False, lambda_reg=lam)
    states = bench.final_checkpoints(out, "table", range(2))
    for model_id, state in enumerate(states):
        fresh.load_checkpoint(state, model_id=model_id)
        for lo in range(0, cfg.n_train, 100):
            hi = min(lo + 100, cfg.n_train)
            fresh.featurize(batch=(data["train"].images[lo:hi], data["train"].targets[lo:hi]), num_samples=hi - lo)
    fresh.finalize_features()
    for model_id, state in enumerate(states):
        fresh.start_scoring_checkpoint(exp_name="test", checkpoint=state, model_id=model_id, num_targets=cfg.n_test)
        fresh.score(batch=(data["test"].images, data["test"].targets), num_samples=cfg.n_test)
    expected = np.asarray(fresh.finalize_scores(exp_name="test"), dtype=np.float64).T
    np.testing.assert_allclose(shortcut, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # and the ridge matters (so the comparison above can fail)
    assert not np.allclose(cached.scores("test", [0, 1], 0.0), expected, rtol=1e-3)
