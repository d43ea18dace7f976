"""Scorers against closed forms computed directly, on features small enough for exact algebra;
which records each scorer accepts; stores of different datasets refused."""

import numpy as np
import pytest
import torch

from attribution_stores import fake_gradient_store, trak_closed_form
from lightning_tda.attribution import (
    TRAK, GradCos, GradDot, ProjectedInfluence, StoredScores, TracIn, example_grid, load_features, plan_tiles,
    self_influence, top_k,
)
from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError


def test_grad_dot_cos_equal_brute_force(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("epoch=0", 0.1, 10), ("epoch=1", 0.01, 20)])
    dot = np.zeros((5, 12)); cos = np.zeros((5, 12))
    for rec in truth:
        (tr, _), (te, _) = rec["train"], rec["val"]
        for j in range(5):
            for i in range(12):
                d = float(te[j] @ tr[i])
                dot[j, i] += d / 2
                cos[j, i] += d / np.linalg.norm(te[j]) / np.linalg.norm(tr[i]) / 2
    np.testing.assert_allclose(GradDot().score(store), dot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(GradCos().score(store), cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(GradDot(dtype=torch.float64).score(store, tile_rows=2, tile_cols=5), dot, rtol=1e-6, atol=1e-7)
    last = truth[-1]  # one checkpoint only: the last
    np.testing.assert_allclose(GradDot(checkpoints=1).score(store), last["val"][0] @ last["train"][0].T, rtol=1e-5, atol=1e-6)


def test_tracin_weights_by_q_and_each_columns_rate(tmp_path):
    """TracIn_ji = sum_c q^c_i sum_g lr^c_g <phi^c_j,g, phi^c_i,g>: the q weight and the per-group
    rates (columns 0-2 at one rate, 3-6 at another) are both in; averaged over runs."""
    expected = np.zeros((5, 12))
    stores = []
    for run in range(2):
        columns = [[0, 3, 0.1], [3, 7, 0.02]]
        store, truth = fake_gradient_store(
            tmp_path / f"s{run}", [("epoch=0", 0.1, 10), ("epoch=1", 0.1, 20)], seed=run, lr_columns=columns
        )
        stores.append(store)
        rates = np.array([0.1] * 3 + [0.02] * 4)
        for rec in truth:
            (phi, q), (phi_t, _) = rec["train"], rec["val"]
            for j in range(5):
                for i in range(12):
                    expected[j, i] += q[i] * float((phi_t[j] * rates) @ phi[i]) / 2
    np.testing.assert_allclose(TracIn(dtype=torch.float64).score(stores), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k", [7, 30])  # k < n and k > n
def test_trak_equals_closed_form_in_both_damping_conventions(tmp_path, k):
    stores, truths = [], []
    for run in range(2):  # two runs x two checkpoints, averaged
        store, truth = fake_gradient_store(tmp_path / f"s{run}", [("epoch=0", 0.1, 10), ("epoch=1", 0.1, 20)], k=k, seed=run)
        stores.append(store)
        truths.append(truth)
    lam = 0.3  # mean-loss convention: traker's lambda_reg is n * lam
    expected = trak_closed_form(truths, lambda phi: len(phi) * lam)
    out = RunStore.create(tmp_path / "scores")
    got = TRAK(damping=lam).score(stores, out=out, tile_rows=2, tile_cols=5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.read("scores/trak/val"), expected, rtol=1e-4, atol=1e-6)
    assert out.is_complete("scores/trak/val") and not out.has_array("scoring/trak/val/kernels")
    # relative damping r: lambda_reg = r tr(Phi^T Phi) / n; the default is r = 1
    relative = trak_closed_form(truths, lambda phi: 0.5 * float((phi * phi).sum()) / len(phi))
    np.testing.assert_allclose(TRAK(relative_damping=0.5).score(stores), relative, rtol=1e-4, atol=1e-6)
    default = trak_closed_form(truths, lambda phi: float((phi * phi).sum()) / len(phi))
    np.testing.assert_allclose(TRAK().score(stores), default, rtol=1e-4, atol=1e-6)
    phi = load_features(stores[0], "train", "epoch=0").phi
    assert TRAK(relative_damping=0.5).lam(phi) == pytest.approx(0.5 * float((phi.double() ** 2).sum()) / 12)


def test_projected_influence_closed_form(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("fit_end", 0.1, 5)])
    (phi, q), (phi_t, _) = truth[0]["train"], truth[0]["val"]
    n, lam = len(phi), 0.05
    h = phi.T @ np.diag(q * (1 - q)) @ phi / n + lam * np.eye(phi.shape[1])
    expected = phi_t @ np.linalg.inv(h) @ phi.T * q[None, :] / n
    np.testing.assert_allclose(ProjectedInfluence(damping=lam).score(store), expected, rtol=1e-4, atol=1e-7)


def test_self_influence_is_the_scorers_diagonal_over_checkpoints_and_runs(tmp_path):
    """Several checkpoints: TRAK averages the kernels and, separately, q; self-influence must be
    that matrix's diagonal, not the mean of per-checkpoint diagonals."""
    stores = [
        fake_gradient_store(tmp_path / f"s{r}", [("epoch=0", 0.1, 5), ("epoch=1", 0.1, 9), ("epoch=2", 0.1, 13)], seed=r)[0]
        for r in range(2)
    ]
    full = TRAK(damping=0.1).score(stores, test_split="train")
    np.testing.assert_allclose(self_influence(stores, damping=0.1), np.diag(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(self_influence(stores[0]), np.diag(TRAK().score(stores[0], test_split="train")), rtol=1e-5, atol=1e-7)
    gd = GradDot(checkpoints=2)
    np.testing.assert_allclose(self_influence(stores, scorer=gd), np.diag(gd.score(stores, test_split="train")), rtol=1e-5, atol=1e-6)


def test_top_k_and_grid(tmp_path):
    store, _ = fake_gradient_store(tmp_path / "s", [("fit_end", 0.1, 5)])
    scores = np.array([[0.1, 3.0, -2.0, 0.5], [1.0, -1.0, 0.0, 2.0]])
    top = top_k(scores, 2)
    assert top.helpful.tolist() == [[1, 3], [3, 0]] and top.harmful.tolist() == [[2, 0], [1, 2]]
    np.testing.assert_allclose(top.helpful_scores, [[3.0, 0.5], [2.0, 1.0]])
    fig = example_grid(torch.rand(5, 1, 8, 8), torch.rand(12, 1, 8, 8), top_k(GradDot().score(store), 3), [0, 2], k=3)
    assert len(fig.axes) == 2 * 7


def test_scorers_refuse_records_without_the_margins_out_to_loss(tmp_path):
    """A record of the loss (q = -1) or of a custom output (q unknown) must not be scored as a
    margin record: TRAK and the influence function refuse any non-margin record, TracIn a
    custom one; GradDot needs no q and takes any."""
    loss_store, truth = fake_gradient_store(tmp_path / "loss", [("fit_end", 0.1, 5)], output="loss")
    for scorer in (TRAK(), ProjectedInfluence()):
        with pytest.raises(ValueError, match="needs gradients of 'margin'.*output 'loss'"):
            scorer.score(loss_store)
    custom, _ = fake_gradient_store(tmp_path / "custom", [("fit_end", 0.1, 5)], output="custom")
    with pytest.raises(ValueError, match="TracIn needs gradients of .*output 'custom'"):
        TracIn().score(custom)
    unknown, _ = fake_gradient_store(tmp_path / "old", [("fit_end", 0.1, 5)], output=None)
    with pytest.raises(ValueError, match="output None"):
        TRAK().score(unknown)
    (phi, _), (phi_t, _) = truth[0]["train"], truth[0]["val"]
    np.testing.assert_allclose(GradDot().score(loss_store), phi_t @ phi.T, rtol=1e-5, atol=1e-6)


def test_tracin_learning_rates_are_required_and_unambiguous(tmp_path):
    none, _ = fake_gradient_store(tmp_path / "none", [("fit_end", None, 5)])
    with pytest.raises(StoreError, match="holds no learning rate"):
        TracIn().score(none)
    mixed, _ = fake_gradient_store(tmp_path / "mixed", [("fit_end", 0.1, 5)], lr_columns=[[0, 3, 0.1], [3, 7, None]])
    with pytest.raises(StoreError, match="columns 3..7 .*different learning rates"):
        TracIn().score(mixed)
    several, _ = fake_gradient_store(tmp_path / "several", [("fit_end", 0.1, 5)])
    several.update_manifest(lambda m: m["records"]["grads"][0].__setitem__("learning_rates", [[0.1, 0.2]]))
    with pytest.raises(StoreError, match="several learning rates"):
        TracIn().score(several)


def test_stores_of_different_datasets_are_refused_naming_both(tmp_path):
    a, _ = fake_gradient_store(tmp_path / "a", [("fit_end", 0.1, 5)])
    other = {"train": {"size": 12, "labels_sha256": "c" * 64}, "val": {"size": 5, "labels_sha256": "b" * 64}}
    b, _ = fake_gradient_store(tmp_path / "b", [("fit_end", 0.1, 5)], fingerprints=other, seed=1)
    for scorer in (GradDot(), TRAK(), TracIn()):
        with pytest.raises(FingerprintMismatchError, match=rf"{tmp_path / 'a'} and .*{tmp_path / 'b'} were recorded on different datasets for the train split"):
            scorer.score([a, b])
    c, _ = fake_gradient_store(tmp_path / "c", [("fit_end", 0.1, 5)], seed=2)
    c.update_manifest(lambda m: m["fingerprints"].pop("val"))
    with pytest.raises(StoreError, match=rf"{tmp_path / 'c'}.*no dataset fingerprint"):
        GradDot().score([a, c])


def test_large_scores_stay_in_the_store(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("fit_end", 0.1, 5)])
    out = RunStore.create(tmp_path / "out")
    stored = GradDot().score(store, out=out, max_return_bytes=100, tile_rows=2, tile_cols=5)
    assert isinstance(stored, StoredScores) and stored.shape == (5, 12)
    expected = truth[0]["val"][0] @ truth[0]["train"][0].T
    np.testing.assert_allclose(np.asarray(stored), expected, rtol=1e-5, atol=1e-6)
    blocks = list(stored.iter_row_blocks())
    assert [start for start, _ in blocks] == [0, 2, 4]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass out=RunStore"):
        GradDot().score(store, max_return_bytes=100)
    assert StoredScores.open(out, "grad_dot", "val").fingerprints["train"]["size"] == 12


def test_tiles_fit_the_memory_budget():
    """The plan holds every job's test rows and one tile within the budget, reading the train
    features once when all test rows fit (the benchmark's size: 10 checkpoints, k = 2048), and
    as few times as the budget allows when they do not (50 checkpoints)."""
    def used(plan, jobs):
        kernel = 3 * 2048**2 * 8 + 1024 * 2048 * 16
        return kernel + jobs * plan.rows * 2048 * 4 + plan.cols * (plan.rows * 8 + 2048 * 10)

    plan = plan_tiles(10_000, 200_000, 2048, 10, compute_bytes=4, feature_bytes=2, memory_bytes=1 << 30)
    assert plan.rows == 10_000 and 1024 <= plan.cols < 200_000 and used(plan, 10) <= 1 << 30
    many = plan_tiles(10_000, 200_000, 2048, 50, compute_bytes=4, feature_bytes=2, memory_bytes=1 << 30)
    assert many.rows == 2_000 and many.cols >= 1024 and used(many, 50) <= 1 << 30  # 5 passes
    tiny = plan_tiles(10_000, 200_000, 2048, 50, compute_bytes=4, feature_bytes=2, memory_bytes=200 << 20)
    assert tiny.rows >= 1 and used(tiny, 50) <= 200 << 20


def test_bad_arguments(tmp_path):
    empty = RunStore.create(tmp_path / "empty")
    with pytest.raises(StoreError, match="no recorded gradients.*GradientRecorder"):
        TRAK().score(empty)
    store, _ = fake_gradient_store(tmp_path / "s", [("epoch=0", 0.1, 10), ("epoch=1", 0.1, 20)])
    train = load_features(store, "train", "epoch=0")
    test = load_features(store, "val", "epoch=1")
    with pytest.raises(ValueError, match="different checkpoints"):
        train.check_pairs_with(test)
    with pytest.raises(StoreError, match="no gradient records"):
        GradDot(checkpoints=["epoch=7"]).score(store)
    with pytest.raises(StoreError, match="no gradients for split 'test'"):
        GradDot().score(store, test_split="test")
    with pytest.raises(ValueError, match="damping must be positive"):
        ProjectedInfluence(damping=0)
    with pytest.raises(ValueError, match="not both"):
        TRAK(damping=1.0, relative_damping=1.0)
    with pytest.raises(ValueError, match="k must be in"):
        top_k(np.zeros((2, 3)), 4)


def test_lds_with_a_sweep_store_checks_it_holds_the_scored_datasets(tmp_path):
    from attribution_stores import fake_sweep_store

    from lightning_tda.datamodels import lds

    store, _ = fake_gradient_store(tmp_path / "grads", [("fit_end", 0.1, 5)])
    sweep, masks, margins = fake_sweep_store(tmp_path / "sweep")
    out = RunStore.create(tmp_path / "out")
    stored = TRAK().score(store, out=out, max_return_bytes=0)
    expected = lds(np.asarray(stored), masks, margins, n_bootstrap=0)
    got = lds(stored, sweep, split="val", sources=[store], n_bootstrap=0)
    assert got.value == pytest.approx(expected.value, abs=1e-6)
    other = {"train": {"size": 12, "labels_sha256": "d" * 64}, "val": {"size": 5, "labels_sha256": "b" * 64}}
    wrong, _, _ = fake_sweep_store(tmp_path / "wrong", fingerprints=other)
    with pytest.raises(FingerprintMismatchError, match=rf"{tmp_path / 'wrong'}.* and .*{tmp_path / 'out'}.* were recorded on different datasets"):
        lds(stored, wrong, split="val", n_bootstrap=0)
    with pytest.raises(FingerprintMismatchError, match=rf"{tmp_path / 'wrong'}.* and .*{tmp_path / 'grads'} were recorded on different datasets"):
        lds(np.asarray(stored), wrong, split="val", sources=[store], n_bootstrap=0)
