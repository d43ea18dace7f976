"""Diversity metrics, functional form: hand computations (ties, all-correct, all-wrong), a
brute-force reference and scikit-learn/numpy for kappa and correlation, and the bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_tda.diversity import functional as F

Y = torch.tensor([0, 1, 2, 0, 1, 2])
# model A predicts 0 1 2 1 1 0 (right, right, right, wrong, right, wrong)
PA = torch.tensor([
    [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.7, 0.0], [0.0, 0.9, 0.1], [0.5, 0.1, 0.4],
])
# model B predicts 0 2 2 0 0 2 (right, wrong, right, right, wrong, right)
PB = torch.tensor([
    [0.5, 0.25, 0.25], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.2, 0.2, 0.6],
])
# averages: [.55 .275 .175] -> 0 right; [.15 .4 .45] -> 2 wrong; -> 2 right;
# [.5 .5 0] a tie -> 0 (lowest index) right; [.3 .65 .05] -> 1 right; [.35 .15 .5] -> 2 right


def test_hand_computed_pair():
    assert float(F.error_inconsistency(PA, PB, Y)) == pytest.approx(4 / 6)  # examples 1, 3, 4, 5
    # c_obs = 2/6 (both right at 0, 2; never both wrong); c_exp = (2/3)^2 + (1/3)^2 = 5/9
    assert float(F.error_consistency(PA, PB, Y)) == pytest.approx((2 / 6 - 5 / 9) / (1 - 5 / 9))
    assert float(F.error_correlation(PA, PB, Y)) == pytest.approx((6 * 2 - 4 * 4) / math.sqrt(4 * 2 * 4 * 2))
    assert float(F.disagreement(PA, PB)) == pytest.approx(4 / 6)
    assert float(F.ensemble_accuracy(PA, PB, Y)) == pytest.approx(5 / 6)  # the tie at 3 goes to class 0
    assert float(F.ensemble_gain(PA, PB, Y)) == pytest.approx(5 / 6 - 4 / 6)
    assert float(F.ensemble_gain(PA, PB, Y, reference="best")) == pytest.approx(5 / 6 - 4 / 6)
    assert float(F.conversion_rate(PA, PB, Y)) == pytest.approx(3 / 4)  # 3, 4, 5 of 1, 3, 4, 5


def test_labels_logits_and_probabilities_agree():
    labels_a, labels_b = PA.argmax(1), PB.argmax(1)
    for metric in (F.error_inconsistency, F.error_consistency, F.error_correlation):
        want = float(metric(PA, PB, Y))
        assert float(metric(labels_a, labels_b, Y)) == pytest.approx(want)
        assert float(metric(labels_a, PB, Y)) == pytest.approx(want)  # mixed kinds: labels for both
        assert float(metric(PA.numpy(), PB.numpy(), Y.numpy())) == pytest.approx(want)
    # logits whose softmax is the probabilities give the same probability ensemble
    za, zb = (p.clamp_min(1e-12).log() + 3.0 for p in (PA, PB))
    assert float(F.ensemble_accuracy(za.double(), zb.double(), Y)) == pytest.approx(5 / 6)


def test_ties_inside_one_model_go_to_the_lowest_class():
    y = torch.tensor([1, 0])
    tied = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # predicts 0 twice: wrong, right
    right = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    assert float(F.error_inconsistency(tied, right, y)) == pytest.approx(0.5)
    assert float(F.disagreement(tied, right)) == pytest.approx(0.5)
    # the ensemble: [.3 .7] -> 1 right, [.7 .3] -> 0 right
    assert float(F.ensemble_accuracy(tied, right, y)) == 1.0


def test_all_correct_models():
    y = torch.tensor([0, 1, 1])
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    b = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    assert float(F.error_inconsistency(a, b, y)) == 0.0
    assert math.isnan(float(F.error_consistency(a, b, y)))  # c_exp = 1: kappa undefined
    assert math.isnan(float(F.error_correlation(a, b, y)))  # constant indicators
    assert float(F.disagreement(a, b)) == 0.0
    assert float(F.ensemble_gain(a, b, y)) == 0.0
    assert math.isnan(float(F.conversion_rate(a, b, y)))  # never inconsistent


def test_all_wrong_models_whose_ensemble_is_right():
    y = torch.tensor([0, 0])
    a = torch.tensor([[0.45, 0.55, 0.0], [0.45, 0.55, 0.0]])  # predicts 1
    b = torch.tensor([[0.45, 0.0, 0.55], [0.45, 0.0, 0.55]])  # predicts 2
    assert float(F.error_inconsistency(a, b, y)) == 0.0
    assert math.isnan(float(F.error_consistency(a, b, y)))
    assert float(F.disagreement(a, b)) == 1.0
    assert float(F.ensemble_accuracy(a, b, y)) == 1.0  # [.45 .275 .275] -> 0
    assert float(F.ensemble_gain(a, b, y)) == 1.0
    assert math.isnan(float(F.conversion_rate(a, b, y)))


def test_one_all_correct_one_all_wrong():
    y = torch.tensor([0, 1, 0, 1])
    right, wrong = y.clone(), 1 - y
    assert float(F.error_inconsistency(right, wrong, y)) == 1.0
    assert float(F.error_consistency(right, wrong, y)) == 0.0  # c_obs = c_exp = 0
    assert math.isnan(float(F.error_correlation(right, wrong, y)))
    assert float(F.disagreement(right, wrong)) == 1.0


def test_logit_averaging_differs_from_probability_averaging():
    y = torch.tensor([0])
    za = torch.tensor([[0.0, -1.0, -2.0]])  # probabilities [.665 .245 .090]
    zb = torch.tensor([[-2.0, 0.0, 0.0]])  # [.063 .468 .468]
    # mean probabilities [.364 .357 .279] -> 0; mean logits [-1 -.5 -1] -> 1
    assert float(F.ensemble_accuracy(za, zb, y, combine="probabilities")) == 1.0
    assert float(F.ensemble_accuracy(za, zb, y, combine="logits")) == 0.0


def _reference(probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Every pairwise metric by explicit loops over pairs and examples."""
    M, n, _ = probs.shape
    out = {k: np.zeros((M, M)) for k in ("ei", "dis", "ens", "conv")}
    right = probs.argmax(-1) == y
    for i in range(M):
        for j in range(M):
            ens = (probs[i] + probs[j]).argmax(-1) == y
            inconsistent = [k for k in range(n) if right[i, k] != right[j, k]]
            out["ei"][i, j] = len(inconsistent) / n
            out["dis"][i, j] = np.mean(probs[i].argmax(-1) != probs[j].argmax(-1))
            out["ens"][i, j] = ens.mean()
            out["conv"][i, j] = np.mean([ens[k] for k in inconsistent]) if inconsistent else np.nan
    return out


def test_pairwise_equals_brute_force_sklearn_and_numpy():
    from sklearn.metrics import cohen_kappa_score

    g = torch.Generator().manual_seed(0)
    M, n, C = 5, 60, 4
    y = torch.randint(0, C, (n,), generator=g)
    logits = torch.randn(M, n, C, generator=g, dtype=torch.float64)
    logits[torch.arange(M)[:, None], torch.arange(n), y] += torch.linspace(0.0, 2.0, M)[:, None]
    probs = logits.softmax(-1)
    got = F.pairwise_diversity(logits, y)
    ref = _reference(probs.numpy(), y.numpy())
    np.testing.assert_allclose(got["error_inconsistency"].numpy(), ref["ei"], atol=1e-6)
    np.testing.assert_allclose(got["disagreement"].numpy(), ref["dis"], atol=1e-6)
    np.testing.assert_allclose(got["ensemble_accuracy"].numpy(), ref["ens"], atol=1e-6)
    np.testing.assert_allclose(got["conversion_rate"].numpy(), ref["conv"], atol=1e-6)
    acc = (probs.argmax(-1) == y).double().mean(1).numpy()
    np.testing.assert_allclose(got["ensemble_gain_mean"].numpy(), ref["ens"] - (acc[:, None] + acc[None]) / 2, atol=1e-6)
    np.testing.assert_allclose(got["ensemble_gain_best"].numpy(), ref["ens"] - np.maximum(acc[:, None], acc[None]), atol=1e-6)
    right = (probs.argmax(-1) == y).numpy().astype(int)
    for i in range(M):
        for j in range(i + 1, M):
            kappa = cohen_kappa_score(right[i], right[j])
            assert float(got["error_consistency"][i, j]) == pytest.approx(kappa, abs=1e-6)
            assert float(got["error_correlation"][i, j]) == pytest.approx(np.corrcoef(right[i], right[j])[0, 1], abs=1e-6)
            assert float(F.error_inconsistency(logits[i], logits[j], y)) == pytest.approx(ref["ei"][i, j])
    # the pairwise_* functions give the matrices of pairwise_diversity
    np.testing.assert_allclose(F.pairwise_error_inconsistency(logits, y), got["error_inconsistency"])
    np.testing.assert_allclose(F.pairwise_error_consistency(list(logits), y), got["error_consistency"])
    np.testing.assert_allclose(F.pairwise_error_correlation(logits, y), got["error_correlation"])
    np.testing.assert_allclose(F.pairwise_disagreement(logits.argmax(-1)), got["disagreement"])
    np.testing.assert_allclose(F.pairwise_ensemble_gain(logits, y, "best"), got["ensemble_gain_best"])
    np.testing.assert_allclose(F.pairwise_conversion_rate(logits, y), got["conversion_rate"], equal_nan=True)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="different class counts.*has 3.*has 4"):
        F.error_inconsistency(torch.rand(5, 3), torch.rand(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="different class counts"):
        F.pairwise_diversity([torch.rand(5, 3), torch.rand(5, 3), torch.rand(5, 2)], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="different lengths.*has 5.*has 4"):
        F.error_inconsistency(torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="different lengths.*target has 4"):
        F.error_consistency(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs probabilities or logits"):
        F.ensemble_gain(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="has label 3 but the predictions have 3 classes"):
        F.error_inconsistency(torch.rand(2, 3), torch.rand(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        F.error_inconsistency(torch.tensor([[float("nan"), 1.0]]), torch.rand(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="no examples"):
        F.error_inconsistency(torch.rand(0, 3), torch.rand(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="combine must be one of"):
        F.ensemble_accuracy(PA, PB, Y, combine="votes")
    with pytest.raises(ValueError, match="reference must be one of"):
        F.ensemble_gain(PA, PB, Y, reference="worst")
    with pytest.raises(TypeError, match="integer labels or float"):
        F.error_inconsistency(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))


def test_docstring_examples():
    import doctest

    from lightning_tda.diversity import categories, inputs, overlap, temperature

    for module in (F, inputs, temperature, categories, overlap):
        assert doctest.testmod(module).failed == 0, module.__name__
