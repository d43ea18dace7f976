"""Scorers against closed forms computed directly, on features small enough for exact algebra."""

import numpy as np
import pytest
import torch

from lightning_tda.attribution import (
    TRAK, GradCos, GradDot, ProjectedInfluence, TracIn, example_grid, load_features, self_influence, top_k,
)
from lightning_tda.store import RunStore, StoreError, join_name


def fake_gradient_store(path, records, n_train=12, n_test=5, k=7, seed=0):
    """A store laid out as GradientRecorder writes it, with known random features."""
    g = np.random.default_rng(seed)
    store = RunStore.create(path)
    entries, truth = [], []
    for i, (tag, lr, step) in enumerate(records):
        feats = {"train": g.normal(size=(n_train, k)), "val": g.normal(size=(n_test, k))}
        qs = {"train": g.uniform(0.05, 0.95, n_train), "val": g.uniform(0.05, 0.95, n_test)}
        for split in ("train", "val"):
            n = len(feats[split])
            store.ensure_array(join_name("out_to_loss", split, tag), (n,), "float32", block_rows=4)
            store.ensure_array(join_name("grads", split, tag), (n, k), "float32", block_rows=4)
            for start in range(0, n, 4):
                store.write_block(join_name("out_to_loss", split, tag), start, qs[split][start:start + 4])
                store.write_block(join_name("grads", split, tag), start, feats[split][start:start + 4])
        entries.append({"tag": tag, "index": i, "epoch": i, "global_step": step, "learning_rates": [[lr]], "splits": ["train", "val"]})
        # what the scorer reads back (float32 storage)
        truth.append({s: (feats[s].astype(np.float32).astype(np.float64), qs[s].astype(np.float32).astype(np.float64)) for s in feats})
    store.update_manifest(lambda m: m["records"].__setitem__("grads", entries))
    return store, truth


def test_grad_dot_cos_tracin_equal_brute_force(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("epoch=0", 0.1, 10), ("epoch=1", 0.01, 20)])
    dot = np.zeros((5, 12)); cos = np.zeros((5, 12)); tracin = np.zeros((5, 12))
    for rec, lr in zip(truth, (0.1, 0.01)):
        (tr, _), (te, _) = rec["train"], rec["val"]
        for j in range(5):
            for i in range(12):
                d = float(te[j] @ tr[i])
                dot[j, i] += d / 2
                cos[j, i] += d / np.linalg.norm(te[j]) / np.linalg.norm(tr[i]) / 2
                tracin[j, i] += lr * d
    np.testing.assert_allclose(GradDot().score(store), dot, rtol=1e-5)
    np.testing.assert_allclose(GradCos().score(store), cos, rtol=1e-5)
    np.testing.assert_allclose(TracIn().score(store), tracin, rtol=1e-5)
    # one checkpoint only: the last
    last = truth[-1]
    np.testing.assert_allclose(GradDot(checkpoints=1).score(store), last["val"][0] @ last["train"][0].T, rtol=1e-5)


@pytest.mark.parametrize("k", [7, 30])  # k < n (primal solve) and k > n (dual solve)
def test_trak_equals_closed_form(tmp_path, k):
    lam = 0.3
    stores, kernels, qs = [], [], []
    for run in range(2):  # two runs x two checkpoints, averaged
        store, truth = fake_gradient_store(tmp_path / f"s{run}", [("epoch=0", 0.1, 10), ("epoch=1", 0.1, 20)], k=k, seed=run)
        stores.append(store)
        for rec in truth:
            (phi, q), (phi_t, _) = rec["train"], rec["val"]
            kernels.append(phi_t @ np.linalg.inv(phi.T @ phi + lam * np.eye(k)) @ phi.T)
            qs.append(q)
    expected = np.mean(kernels, 0) * np.mean(qs, 0)[None, :]
    out = RunStore.create(tmp_path / "scores")
    got = TRAK(damping=lam).score(stores, out=out, block_rows=2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.read("scores/trak/val"), expected, rtol=1e-4, atol=1e-6)
    assert out.is_complete("scores/trak/val")


def test_projected_influence_closed_form(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("fit_end", 0.1, 5)])
    (phi, q), (phi_t, _) = truth[0]["train"], truth[0]["val"]
    n, lam = len(phi), 0.05
    h = phi.T @ np.diag(q * (1 - q)) @ phi / n + lam * np.eye(phi.shape[1])
    expected = phi_t @ np.linalg.inv(h) @ phi.T * q[None, :] / n
    np.testing.assert_allclose(ProjectedInfluence(damping=lam).score(store), expected, rtol=1e-4, atol=1e-7)


def test_top_k_self_influence_and_grid(tmp_path):
    store, truth = fake_gradient_store(tmp_path / "s", [("fit_end", 0.1, 5)])
    scores = np.array([[0.1, 3.0, -2.0, 0.5], [1.0, -1.0, 0.0, 2.0]])
    top = top_k(scores, 2)
    assert top.helpful.tolist() == [[1, 3], [3, 0]] and top.harmful.tolist() == [[2, 0], [1, 2]]
    np.testing.assert_allclose(top.helpful_scores, [[3.0, 0.5], [2.0, 1.0]])
    full = TRAK(damping=0.1).score(store, test_split="train")
    np.testing.assert_allclose(self_influence(store, damping=0.1), np.diag(full), rtol=1e-5)
    fig = example_grid(torch.rand(5, 1, 8, 8), torch.rand(12, 1, 8, 8), top_k(GradDot().score(store), 3), [0, 2], k=3)
    assert len(fig.axes) == 2 * 7


def test_errors(tmp_path):
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
    with pytest.raises(ValueError, match="k must be in"):
        top_k(np.zeros((2, 3)), 4)
