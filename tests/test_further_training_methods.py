"""Gradient methods on the final model: DataInf's closed form, and every method's sign convention
against the gold standard on L2-regularised logistic regression (where all of them approximate it
well, so a flipped sign shows as a cosine near -1)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from test_further_training_convex import WD, problem  # noqa: F401  (the fixture)

from lightning_tda.attribution import InfluenceProblem, influence_scores
from lightning_tda.further_training import further_training_scores
from lightning_tda.further_training.datainf import datainf_scores
from lightning_tda.further_training.methods import final_model_scores, loss_gradients, method_label


def explicit_datainf(train, test, sizes, factor):
    """DataInf with each layer's averaged inverse built as a matrix."""
    n, start = train.shape[0], 0
    total = torch.zeros(test.shape[0], n, dtype=train.dtype)
    for size in sizes:
        g, gz = train[:, start : start + size], test[:, start : start + size]
        start += size
        lam = factor * float((g * g).sum(1).mean()) / size
        inverse = sum(torch.eye(size, dtype=g.dtype) - torch.outer(gj, gj) / (lam + gj @ gj) for gj in g) / (n * lam)
        total += gz @ inverse @ g.T
    return total


def test_datainf_equals_its_explicit_form():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(9, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    sizes = [3, 4]
    for factor in (0.1, 1.0):
        np.testing.assert_allclose(datainf_scores(train, test, sizes, damping_factor=factor),
                                   explicit_datainf(train, test, sizes, factor), rtol=1e-10)
    cols = torch.tensor([5, 0])
    np.testing.assert_allclose(datainf_scores(train, test, sizes, cols), explicit_datainf(train, test, sizes, 0.1)[:, cols],
                               rtol=1e-10)


def test_datainf_with_one_training_example_is_the_exact_damped_inverse():
    # Sherman-Morrison: with n = 1 the average of rank-one inverses is the inverse itself
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    lam = 0.5 * float(train.pow(2).sum()) / 6
    exact = test @ torch.linalg.inv(torch.outer(train[0], train[0]) + lam * torch.eye(6, dtype=torch.float64)) @ train.T
    np.testing.assert_allclose(datainf_scores(train, test, [6], damping_factor=0.5), exact, rtol=1e-10)


METHODS = ("grad_dot", "grad_cos", "influence_exact:1e-06", "influence_cg:1e-06", "influence_lissa:1e-06",
           "influence_projected:1", "trak", "datainf:1")


def row_cosine(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_every_method_carries_the_gold_standards_sign(problem):  # noqa: F811
    final, train, test = problem
    instances = list(range(40))
    gold = further_training_scores(final, train, test, instances, steps=(1, 150), seeds=1, lr=1.0,
                                   batch_size=None, weight_decay=WD, progress=False)
    scores = final_model_scores(final, train, test, instances, METHODS, weight_decay=WD, proj_dim=64, progress=False)
    assert list(scores) == list(METHODS)
    for key, value in scores.items():
        assert value.shape == (len(test), 40)
        # positive = removing the instance raises the test loss, as the gold standard's tau
        assert row_cosine(gold.scores[-1], value) > 0.8, key
        assert row_cosine(gold.scores[0], value) > 0.8, key
    # the three solvers agree; Grad-Dot is the loss-gradient inner product itself
    np.testing.assert_allclose(scores["influence_cg:1e-06"], scores["influence_exact:1e-06"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(scores["influence_lissa:1e-06"], scores["influence_exact:1e-06"], rtol=1e-4, atol=1e-9)
    g_test, _ = loss_gradients(final, test.images, test.targets)
    g_train, _ = loss_gradients(final, train.images, train.targets)
    np.testing.assert_allclose(scores["grad_dot"], (g_test @ g_train.T).numpy(), rtol=1e-12)
    # influence is (1/n) g_z^T H^-1 g_i: exact leave-one-out to first order (cosine, at K large)
    assert row_cosine(gold.scores[-1], scores["influence_exact:1e-06"]) > 0.98


def test_a_damped_family_runs_its_sweep_and_bad_methods_are_refused(problem):  # noqa: F811
    final, train, test = problem
    scores = final_model_scores(final, train, test, [0, 1], ("datainf", "influence_exact:0.5"),
                                damping_factors=(0.1, 10), progress=False)
    assert list(scores) == ["datainf:0.1", "datainf:10", "influence_exact:0.5"]
    assert method_label("influence_cg:0.1") == "IF CG (damping 0.1x)" and method_label("grad_dot") == "Grad-Dot"
    for bad, message in (("grad_dot:1", "takes no damping"), ("newton", "unknown method"), ("datainf:0", "positive")):
        with pytest.raises(ValueError, match=message):
            final_model_scores(final, train, test, [0], (bad,), progress=False)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence (bench extra) not installed")
def test_kronfluence_ekfac_carries_the_gold_standards_sign(problem):  # noqa: F811
    final, train, test = problem
    instances = list(range(40))
    scores = final_model_scores(final, train, test, instances, ("influence_exact:1e-06", "ekfac", "ekfac:heuristic"),
                                weight_decay=WD, progress=False)
    for key in ("ekfac", "ekfac:heuristic"):
        assert row_cosine(scores["influence_exact:1e-06"], scores[key]) > 0.9, key


def test_blockwise_hessian_equals_torch_func_hessian(problem):  # noqa: F811
    from lightning_tda.further_training.methods import BlockwiseInfluenceProblem

    final, train, test = problem
    args = (final, train.images, train.targets, test.images, test.targets)
    blockwise = BlockwiseInfluenceProblem(*args, output="loss", weight_decay=WD)
    blockwise.block = 3  # several blocks for 10 parameters
    reference = InfluenceProblem(*args, output="loss", weight_decay=WD).hessian()
    np.testing.assert_allclose(blockwise.hessian(), reference, rtol=1e-10, atol=1e-12)


def test_blockwise_problem_serves_hessian_vector_products_from_the_assembled_hessian(problem):  # noqa: F811
    from lightning_tda.further_training.methods import BlockwiseInfluenceProblem

    final, train, test = problem
    args = (final, train.images, train.targets, test.images, test.targets)
    v = torch.randn(10, 3, dtype=torch.float64)
    reference = InfluenceProblem(*args, output="loss", weight_decay=WD).hvp(v)
    np.testing.assert_allclose(BlockwiseInfluenceProblem(*args, output="loss", weight_decay=WD).hvp(v), reference,
                               rtol=1e-10, atol=1e-12)


def test_influence_on_the_test_loss_and_on_the_test_margin_differ_in_sign_and_weighting(problem):  # noqa: F811
    # d loss_z = -q_z d margin_z with q_z = 1 - p_y: the up-weighting influence on the loss is minus
    # q_z times the influence on the margin, so a helpful instance lowers the loss and raises the margin
    from lightning_tda.outputs import out_to_loss_from_logits

    final, train, test = problem
    args = (final, train.images, train.targets, test.images, test.targets)
    on_loss = influence_scores(InfluenceProblem(*args, output="loss", weight_decay=WD), damping=0.0)
    on_margin = influence_scores(InfluenceProblem(*args, output="margin", weight_decay=WD), damping=0.0)
    q = out_to_loss_from_logits(final(test.images).detach(), test.targets)
    np.testing.assert_allclose(on_loss, -q[:, None] * on_margin, rtol=1e-8, atol=1e-14)
    # and the gold standard's convention is minus the loss influence
    scores = final_model_scores(final, train, test, list(range(40)), ("influence_exact:1e-12",), weight_decay=WD,
                                progress=False)["influence_exact:1e-12"]
    np.testing.assert_allclose(scores, -on_loss.numpy(), rtol=1e-6, atol=1e-12)
