"""ModelDiff's comparison on attribution matrices: against a plain numpy/sklearn computation of the
paper's definitions, against MadryLab's ``modeldiff`` package (CPU), symmetry, nulls, the noise
floor, and bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from lightning_tda.modeldiff import DistinguishingDirections, ModelDiff, RankError, residual, residual_pca, variance_along
from lightning_tda.modeldiff.functional import ResidualOperator, check_pair


def matrices(n: int = 60, d: int = 150, seed: int = 0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """A shares B's low-rank structure and has two components of its own; both have noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 4)) @ rng.normal(size=(4, d))
    own = rng.normal(size=(n, 2)) @ (rng.normal(size=(2, d)) * np.array([[2.5], [1.5]]))
    a = shared + own + 0.3 * rng.normal(size=(n, d))
    b = shared + 0.3 * rng.normal(size=(n, d))
    return a.astype(dtype), b.astype(dtype)


def plain_residual(a: np.ndarray, b: np.ndarray, normalize: bool) -> np.ndarray:
    if normalize:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a - ((a * b).sum(1) / (b * b).sum(1))[:, None] * b


def plain_variance_fraction(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    xc = x - x.mean(0)
    return ((xc @ directions.T) ** 2).sum(0) / (xc**2).sum()


def assert_same_directions(ours: np.ndarray, theirs: np.ndarray, atol: float = 1e-6) -> None:
    """Equal up to the sign of each direction."""
    signs = np.sign((ours * theirs).sum(1))
    np.testing.assert_allclose(ours, signs[:, None] * theirs, atol=atol)


# ------------------------------------------------------------------ the definitions


@pytest.mark.parametrize("residual_of", ["normalized", "raw"])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_matches_plain_numpy_and_sklearn(residual_of, method):
    a, b = matrices()
    num = 3 if method == "exact" else 2  # randomized: the directions above the noise (A has 2 of its own)
    ours = residual_pca(a, b, num=num, residual_of=residual_of, method=method)
    r = plain_residual(a, b, normalize=residual_of == "normalized")
    np.testing.assert_allclose(residual(a, b, residual_of).numpy(), r, atol=1e-10)
    pca = PCA(n_components=num, svd_solver="full").fit(r)
    tol = 1e-8 if method == "exact" else 1e-5
    assert_same_directions(ours.directions.numpy(), pca.components_, atol=tol)
    signs = np.sign((ours.directions.numpy() * pca.components_).sum(1))
    np.testing.assert_allclose(ours.loadings.numpy(), pca.transform(r) * signs, atol=tol * 10)
    np.testing.assert_allclose(ours.residual_variance_ratio.numpy(), pca.explained_variance_ratio_, atol=tol)
    np.testing.assert_allclose(ours.variance_a.numpy(), plain_variance_fraction(a, pca.components_), atol=tol)
    np.testing.assert_allclose(ours.variance_b.numpy(), plain_variance_fraction(b, pca.components_), atol=tol)
    # the cosine of A's and B's attributions per test example
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(ours.cosine.numpy(), cos, atol=1e-12)


def test_the_two_residuals_differ_by_row_weights():
    """The package's raw residual is the paper's residual times ||a_i|| per test example."""
    a, b = matrices()
    raw, normalized = residual(a, b, "raw").numpy(), residual(a, b, "normalized").numpy()
    np.testing.assert_allclose(raw, normalized * np.linalg.norm(a, axis=1, keepdims=True), atol=1e-9)
    assert not np.allclose(raw, normalized)


def test_operator_products_equal_the_dense_residual():
    a, b = check_pair(*matrices(dtype=np.float64))
    op = ResidualOperator(a, b)
    dense = op.dense()
    x, y = torch.randn(150, 4, dtype=torch.float64), torch.randn(60, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmul(x), dense @ x)
    torch.testing.assert_close(op.rmatmul(y), dense.T @ y)
    assert op.frobenius_sq == pytest.approx(float((dense**2).sum()), rel=1e-10)


def test_randomized_matches_exact_in_float32():
    a, b = matrices(n=200, d=900, seed=3, dtype=np.float32)
    exact = residual_pca(a, b, num=2, method="exact")
    randomized = residual_pca(a, b, num=2, method="randomized", seed=5)
    assert randomized.directions.dtype == torch.float32
    assert_same_directions(randomized.directions.numpy(), exact.directions.numpy(), atol=1e-4)
    np.testing.assert_allclose(randomized.variance_a.numpy(), exact.variance_a.numpy(), atol=1e-5)


def test_variance_along_is_a_fraction_of_the_total():
    a, _ = matrices()
    basis = np.linalg.svd(a / np.linalg.norm(a, axis=1, keepdims=True) - (a / np.linalg.norm(a, axis=1, keepdims=True)).mean(0))[2]
    fractions, total = variance_along(a, basis[: min(a.shape) - 1])
    assert float(fractions.sum()) == pytest.approx(1.0, abs=1e-9)  # every direction of the row space
    normed = a / np.linalg.norm(a, axis=1, keepdims=True)
    assert total == pytest.approx(((normed - normed.mean(0)) ** 2).sum() / len(a), rel=1e-10)


# ------------------------------------------------------------------ MadryLab's package


@pytest.fixture
def madrylab_residual_pca(monkeypatch):
    """The package's ``residual_pca`` on the CPU (its variance helper defaults to CUDA)."""
    pca_module = pytest.importorskip("modeldiff.pca")
    cpu = functools.partial(pca_module.get_variance_along_directions, device="cpu")
    monkeypatch.setattr(pca_module, "get_variance_along_directions", cpu)
    return pca_module.residual_pca


@pytest.mark.parametrize("residual_of", ["raw", "normalized"])
def test_matches_madrylab_modeldiff_package(madrylab_residual_pca, residual_of):
    """``raw`` is the package's own residual; ``normalized`` (the paper) is the package run on
    row-normalised inputs, which is the same computation. Variances: the package reports
    ``||X_c v||^2 / n``, our ``variance * total_variance``."""
    from modeldiff import ModelDiff as MadryModelDiff

    a, b = matrices(dtype=np.float32)
    if residual_of == "normalized":
        inputs = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b)]
    else:
        inputs = [a, b]
    theirs = madrylab_residual_pca(torch.tensor(inputs[0]), torch.tensor(inputs[1]), 3)
    ours = residual_pca(a, b, num=3, residual_of=residual_of)
    assert_same_directions(ours.directions.numpy(), theirs["directions"], atol=2e-5)
    np.testing.assert_allclose(ours.variance_a.numpy() * ours.total_variance_a, theirs["variances"]["A"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.variance_b.numpy() * ours.total_variance_b, theirs["variances"]["B"], rtol=1e-4, atol=1e-6)
    signs = np.sign((ours.directions.numpy() * theirs["directions"]).sum(1))
    np.testing.assert_allclose(ours.loadings.numpy(), theirs["projections"] * signs, atol=1e-4)
    # its public API gives the same (B - A swaps the roles)
    other = MadryModelDiff().get_B_minus_A_from_scores(torch.tensor(inputs[0]), torch.tensor(inputs[1]), 3)
    mine = ModelDiff(a, b, residual_of=residual_of).directions(of="b", num=3)
    assert_same_directions(mine.train_weights, other["directions"], atol=2e-5)
    np.testing.assert_allclose(mine.variance_b * mine.total_variance_b, other["variances"]["A"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ symmetry, nulls, the floor


def per_model_scores(models: int, own: float, seed: int, n: int = 120, d: int = 400, noise: float = 1.0) -> tuple[list, list]:
    """Per-model attribution matrices: a shared rank-6 structure, per-model noise, and (with
    ``own > 0``) a component only algorithm A's models have, on a subset of test and training
    examples (a planted subpopulation)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 6)) @ rng.normal(size=(6, d)) / np.sqrt(6)
    plant = np.zeros((n, d))
    plant[: n // 8, : d // 10] = own
    a = [shared + plant + noise * rng.normal(size=(n, d)) for _ in range(models)]
    b = [shared + noise * rng.normal(size=(n, d)) for _ in range(models)]
    return a, b


def test_swapping_a_and_b_swaps_the_directions():
    a, b = per_model_scores(4, own=3.0, seed=1)
    forward = ModelDiff.from_model_scores(a, b, names=("A", "B"))
    backward = ModelDiff.from_model_scores(b, a, names=("B", "A"))
    for of, swapped in (("a", "b"), ("b", "a")):
        d1, d2 = forward.directions(of, 3), backward.directions(swapped, 3)
        np.testing.assert_array_equal(d1.train_weights, d2.train_weights)
        np.testing.assert_array_equal(d1.variance_a, d2.variance_b)
        np.testing.assert_array_equal(d1.variance_b, d2.variance_a)
        assert d1.name == d2.name and d1.noise_floor == d2.noise_floor
        np.testing.assert_array_equal(d1.distinguishing, d2.distinguishing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_algorithm_gives_no_direction_above_the_floor(seed):
    a, b = per_model_scores(6, own=0.0, seed=seed)
    diff = ModelDiff.from_model_scores(a, b)
    for of in ("a", "b"):
        d = diff.directions(of, 3)
        assert d.floor_measured and not d.distinguishing.any(), (d.gap, d.noise_floor)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_component_is_distinguishing_for_its_algorithm_only(seed):
    a, b = per_model_scores(6, own=3.0, seed=seed)
    diff = ModelDiff.from_model_scores(a, b)
    mine, theirs = diff.directions("a", 3), diff.directions("b", 3)
    assert mine.distinguishing[0] and not theirs.distinguishing.any()
    assert set(mine.top_train(0, 20).positive) <= set(range(40))  # the planted training examples
    assert set(mine.top_test(0, 10)[0]) <= set(range(15))  # the planted test examples
    assert mine.variance_a[0] > 5 * mine.variance_b[0]


def test_without_halves_nothing_is_called_distinguishing():
    a, b = per_model_scores(4, own=3.0, seed=0)
    d = ModelDiff(np.mean(a, 0), np.mean(b, 0)).directions("a", 2)
    assert not d.floor_measured and not d.distinguishing.any()
    assert np.isnan(d.summary()["noise_floor"])


def test_identical_halves_give_a_zero_floor():
    a, b = matrices()
    diff = ModelDiff(a, b, halves_a=(a, a), halves_b=(b, 2 * b))
    assert diff.noise_floor(3) == 0.0


# ------------------------------------------------------------------ the result


def test_result_views_and_save_load(tmp_path):
    a, b = per_model_scores(4, own=3.0, seed=0, n=40, d=80)
    d = ModelDiff.from_model_scores(a, b, names=("plain", "augmented")).directions("a", 3)
    assert isinstance(d, DistinguishingDirections) and d.name == "plain" and d.other == "augmented"
    assert d.train_weights.shape == (3, 80) and d.test_loadings.shape == (40, 3)
    np.testing.assert_allclose(np.linalg.norm(d.train_weights, axis=1), 1.0, atol=1e-5)
    top = d.top_train(0, 5)
    assert (np.diff(top.positive_weights) <= 0).all() and (np.diff(top.negative_weights) >= 0).all()
    assert top.positive_weights[0] == d.train_weights[0].max()
    frame = d.to_frame()
    assert list(frame["direction"]) == [0, 1, 2] and "variance_plain" in frame and "distinguishing" in frame
    images = torch.rand(80, 1, 8, 8)
    with_images = d.with_images(images, torch.rand(40, 1, 8, 8), k=4)
    assert with_images.top_train_images.shape == (3, 2, 4, 8, 8) and with_images.top_test_images.shape == (3, 4, 8, 8)
    loaded = DistinguishingDirections.load(with_images.save(tmp_path / "d"))
    np.testing.assert_array_equal(loaded.train_weights, d.train_weights)
    np.testing.assert_array_equal(loaded.top_train_images, with_images.top_train_images)
    assert loaded.names == ("plain", "augmented") and loaded.noise_floor == d.noise_floor
    fig, ax = d.plot()
    assert ax.get_title() and len(ax.patches) == 6
    with pytest.raises(ValueError, match="with_images"):
        d.plot_examples()
    assert len(with_images.plot_examples().axes) == 3  # one mosaic per direction


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused_clearly():
    a, b = matrices()
    with pytest.raises(ValueError, match=r"shape \(60, 150\) but scores_b has shape \(60, 149\)"):
        ModelDiff(a, b[:, :149])
    with pytest.raises(ValueError, match="2-D"):
        ModelDiff(a[0], b[0])
    with pytest.raises(ValueError, match="larger than the rank"):
        ModelDiff(a[:5], b[:5]).directions("a", num=5)  # at most n_test - 1 = 4
    with pytest.raises(RankError, match="up to scale"):
        ModelDiff(a, 3 * a).directions("a", num=1)
    rng = np.random.default_rng(0)
    rank_two = np.hstack([rng.normal(size=(30, 2)) @ rng.normal(size=(2, 50)), np.zeros((30, 1))])
    orthogonal = np.hstack([np.zeros((30, 50)), np.ones((30, 1))])  # the residual is A itself (normalised)
    with pytest.raises(RankError, match="numerical rank 2"):
        residual_pca(rank_two, orthogonal, num=3)
    zero = a.copy()
    zero[3] = 0
    with pytest.raises(ValueError, match="all-zero test rows"):
        ModelDiff(zero, b).directions()
    nan = a.copy()
    nan[2, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ModelDiff(nan, b).directions()
    with pytest.raises(ValueError, match="of must be"):
        ModelDiff(a, b).directions(of="c")
    with pytest.raises(ValueError, match="names"):
        ModelDiff(a, b, names=("A", "A"))
    with pytest.raises(ValueError, match="at least 2 models"):
        ModelDiff.from_model_scores([a], [b, b])
    with pytest.raises(ValueError, match="halves_a"):
        ModelDiff(a, b, halves_a=(a, b, a))
