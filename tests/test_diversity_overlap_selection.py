"""Representation overlap (linear CKA against its kernel form, probes on mixes and concatenation,
dCor/pdCor) and greedy ensemble selection (against brute force on a constructed pool)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tda.diversity import greedy_ensemble_selection, linear_cka, linear_probe_accuracy, representation_overlap
from lightning_tda.diversity.overlap import layer_embeddings


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from the kernel form: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with linear kernels."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_equals_the_kernel_form_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = np.hstack([x[:, :2] ** 2, rng.normal(size=(40, 7))])
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-10)
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    assert linear_cka(x, 2.0 * x @ q + 3.0) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
    assert linear_cka(torch.from_numpy(x), y) == pytest.approx(linear_cka(x, y))
    assert linear_cka(x, np.ones((40, 3))) == 0.0


def _split_features(n: int, seed: int):
    """Embedding a carries classes 0-4 (a one-hot-ish signal), b classes 5-9; each has noise dims."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    signal = np.eye(10)[y] * 3.0
    a = np.hstack([signal[:, :5], rng.normal(size=(n, 11))]) + 0.5 * rng.normal(size=(n, 16))
    b = np.hstack([signal[:, 5:], rng.normal(size=(n, 11))]) + 0.5 * rng.normal(size=(n, 16))
    return a, b, y


def test_overlapping_but_different_features_make_mixes_and_concatenation_win():
    tr_a, tr_b, tr_y = _split_features(600, 0)
    te_a, te_b, te_y = _split_features(300, 1)
    result = representation_overlap(tr_a, tr_b, tr_y, te_a, te_b, te_y, names=("a", "b"), repeats=2, seed=0)
    acc = dict(zip(result.feature_sets, result.accuracy_mean))
    assert result.feature_sets == ("a", "b", "concatenation", "a at 16", "mix 75/25", "mix 50/50", "mix 25/75", "b at 16")
    assert acc["a"] == pytest.approx(linear_probe_accuracy(tr_a, tr_y, te_a, te_y))
    assert acc["concatenation"] > max(acc["a"], acc["b"]) + 0.2  # neither contains the other
    assert acc["mix 50/50"] > max(acc["a at 16"], acc["b at 16"])
    # each embedding knows about the labels what the other does not
    assert result.partial_dcor_a_labels_given_b > 0.1 and result.partial_dcor_b_labels_given_a > 0.1
    assert 0 <= result.distance_correlation <= 1 and 0 <= result.linear_cka <= 1
    assert result.summary()["probe_concatenation"] == acc["concatenation"]
    fig, _ = result.plot()
    assert len(fig.axes[0].patches) == len(result.feature_sets)


def test_overlap_errors_and_layer_embeddings():
    a, b, y = _split_features(50, 0)
    with pytest.raises(ValueError, match="total_dim=20 at rate 1.0 needs 20 dimensions of a \\(has 16\\)"):
        representation_overlap(a, b[:, :10], y, a, b[:, :10], y, total_dim=20, names=("a", "b"))
    with pytest.raises(ValueError, match="same examples"):
        representation_overlap(a, b[:40], y, a, b, y)
    from lightning_tda.data import TensorImageDataset
    from lightning_tda.models import DigitsCNN

    model = DigitsCNN(width=4).eval()
    data = TensorImageDataset(torch.rand(7, 1, 8, 8), torch.zeros(7, dtype=torch.long))
    emb = layer_embeddings(model, "fc1", data, batch_size=3)
    with torch.no_grad():
        want = model.fc1(model.flatten(model.features(data.images)))
    torch.testing.assert_close(emb, want)
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        layer_embeddings(model, "fc9", data)


# ------------------------------------------------------------------------------ selection


def _pool(n: int = 100):
    """Model 0 best (errs on 0-19), model 1 a near copy of it (errs on 0-20), model 2 low-accuracy
    (errs on 40-79) but confident where right and unsure where wrong."""
    y = torch.zeros(n, dtype=torch.long)
    probs = torch.empty(3, n, 2)
    probs[:, :, 0] = 0.9
    probs[0, :20, 0] = 0.4
    probs[1, :21, 0] = 0.35
    probs[2, :, 0] = 0.99
    probs[2, 40:80, 0] = 0.45
    probs[:, :, 1] = 1 - probs[:, :, 0]
    return probs, y


def test_greedy_selection_picks_the_divergent_low_accuracy_model():
    probs, y = _pool()
    result = greedy_ensemble_selection(probs, y, probs, y, names=["best", "twin", "weak"],
                                       descriptions=[{"architecture": "a"}, {"architecture": "a", "seed": 1}, {"architecture": "b"}])
    assert [result.pool_names[m] for m in result.members] == ["best", "weak"]
    assert result.pool_accuracy.tolist() == pytest.approx([0.8, 0.79, 0.6])
    assert result.member_rank.tolist() == [1, 3]
    assert result.low_accuracy_picks() == ["weak"]
    assert result.categories == ("first", "architecture")
    # brute force: the second pick maximises the accuracy of the pairs with the first
    pair_acc = [float(((probs[0] + probs[m]).argmax(-1) == y).double().mean()) for m in (1, 2)]
    assert result.selection_accuracy[1] == pytest.approx(max(pair_acc)) == pytest.approx(1.0)
    assert result.inconsistency_with_ensemble[1] == pytest.approx(0.6)  # 0-19 and 40-79
    assert result.summary()["low_accuracy_picks"] == 1.0
    assert len(result.to_frame()) == 2
    one = greedy_ensemble_selection(probs, y, max_size=1)
    assert one.members.tolist() == [0] and np.isnan(one.evaluation_accuracy[0])


def test_selection_errors():
    probs, y = _pool()
    with pytest.raises(ValueError, match="max_size must be an integer in \\[1, 3\\]"):
        greedy_ensemble_selection(probs, y, max_size=4)
    with pytest.raises(ValueError, match="do not match"):
        greedy_ensemble_selection(probs, y, probs[:2], y)
    with pytest.raises(ValueError, match="needs probabilities or logits"):
        greedy_ensemble_selection(probs.argmax(-1), y)
