"""Feature transformations and the counterfactual verification: closed forms on hand-made models,
the bootstrap interval against a plain loop, models from stores, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_tda.data import TensorImageDataset
from lightning_tda.modeldiff import (
    ChangeIntensity,
    Compose,
    GaussianBlur,
    PastePatch,
    PerImage,
    RandomShift,
    Rotate,
    Shift,
    VerificationResult,
    checker_patch,
    square_patch,
    verify,
)
from lightning_tda.modeldiff.verification import apply_transformation, bootstrap_interval
from lightning_tda.store import RunStore


def batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ transformations


def test_paste_patch_fixed_and_random():
    x = batch()
    out = PastePatch(square_patch(2, 1.0), (0, 0))(x)
    assert out.shape == x.shape and (out[:, :, :2, :2] == 1).all()
    torch.testing.assert_close(out[:, :, 2:, :], x[:, :, 2:, :])
    assert not torch.equal(x[:, :, :2, :2], out[:, :, :2, :2])  # the input is not changed in place
    corner = PastePatch(checker_patch(3), (-3, -3))(x)
    torch.testing.assert_close(corner[0, 0, 5:, 5:], checker_patch(3)[0])
    torch.manual_seed(0)
    moved = PastePatch(square_patch(2, 5.0), "random")(torch.zeros(50, 8, 8))  # [b, h, w] works too
    assert moved.shape == (50, 8, 8) and ((moved == 5).sum((1, 2)) == 4).all()
    rows = torch.nonzero(moved == 5)[:, 1]
    assert rows.min() == 0 and rows.max() == 7  # positions vary
    with pytest.raises(ValueError, match="does not fit"):
        PastePatch(square_patch(3), (6, 6))(x)


def test_shift_rotate_blur_intensity_closed_forms():
    x = batch()
    shifted = Shift(1, -2)(x)
    torch.testing.assert_close(shifted[:, :, 1:, :6], x[:, :, :7, 2:])
    assert (shifted[:, :, 0, :] == 0).all() and (shifted[:, :, :, 6:] == 0).all()
    torch.testing.assert_close(Rotate(0.0)(x), x, atol=1e-6, rtol=0)
    quarter = Rotate(90.0)(x)
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    point = torch.zeros(1, 1, 9, 9)
    point[0, 0, 4, 4] = 1
    blurred = GaussianBlur(1.0)(point)[0, 0]
    grid = torch.arange(9.0) - 4
    kernel = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 2)
    kernel = kernel * (kernel.sum() ** -1)  # a 9x9 window holds the whole 5x5 kernel (radius 2)
    kernel = torch.where((grid[:, None].abs() <= 2) & (grid[None, :].abs() <= 2), kernel, 0.0)
    torch.testing.assert_close(blurred, kernel / kernel.sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ChangeIntensity(0.5, 0.1)(x), (x * 0.5 + 0.1).clamp(0, 1))
    torch.testing.assert_close(Compose([Shift(0, 1), Shift(0, -1)])(x)[..., :7], x[..., :7])
    torch.manual_seed(1)
    assert RandomShift(1)(x).shape == x.shape and PerImage(Rotate(10.0, random=True))(x[0]).shape == x[0].shape


def test_apply_transformation_is_seeded_and_keeps_the_global_generator():
    x = batch(20)
    state = torch.get_rng_state()
    first = apply_transformation(PastePatch(square_patch(2), "random"), x, batch_size=7, seed=3)
    second = apply_transformation(PastePatch(square_patch(2), "random"), x, batch_size=7, seed=3)
    torch.testing.assert_close(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_transformation_that_changes_the_shape_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        apply_transformation(lambda x: x[:, :, :4, :4], batch())
    models = [nn.Sequential(nn.Flatten(), nn.Linear(64, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match="same shape"):
        verify(models, models, batch(), lambda x: x[:-1], target_class=0)


# ------------------------------------------------------------------ verification


class PixelModel(nn.Module):
    """Logits ``[0, w * x[0, 0, 0]]``: Pr(class 1) = sigmoid(w * corner pixel)."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, 0, 0] * self.weight
        return torch.stack([torch.zeros_like(corner), corner], 1)


def test_verify_equals_a_plain_computation():
    x = batch(30)
    labels = torch.tensor([0, 1] * 15)
    data = TensorImageDataset(x, labels)
    weights_a, weights_b = [2.0, 3.0, 4.0], [0.0, 0.1]
    transform = PastePatch(square_patch(1, 1.0), (0, 0))
    result = verify([PixelModel(w) for w in weights_a], [PixelModel(w) for w in weights_b], data, transform, target_class=1,
                    names=("uses", "ignores"), n_bootstrap=300, seed=4)
    kept = x[labels != 1]  # examples of the target class are left out
    def effect(w: float) -> float:
        return float((torch.sigmoid(torch.tensor(w)) - torch.sigmoid(w * kept[:, 0, 0, 0])).mean())
    np.testing.assert_allclose(result.effects_a, [effect(w) for w in weights_a], rtol=1e-5)
    np.testing.assert_allclose(result.effects_b, [effect(w) for w in weights_b], rtol=1e-5)
    assert result.mean_a == pytest.approx(np.mean(result.effects_a)) and result.n_examples == 15
    assert result.excludes_zero_a and result.ci_a[0] <= result.mean_a <= result.ci_a[1]
    assert result.difference == pytest.approx(result.mean_a - result.mean_b)
    # the interval is a percentile bootstrap over models: the same draws by hand
    rng = np.random.default_rng(4)
    draws = rng.integers(0, 3, size=(300, 3))
    means = result.effects_a[draws].mean(1)
    assert result.ci_a == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    # own-label target: every example counted
    own = verify([PixelModel(w) for w in weights_a], [PixelModel(w) for w in weights_b], data, transform, "label", n_bootstrap=50)
    assert own.n_examples == 30 and own.target_class == -1 and own.target == "own label"


def test_bootstrap_interval_covers_and_shrinks():
    rng = np.random.default_rng(0)
    wide = bootstrap_interval(rng.normal(1.0, 1.0, 5), 2000, 0.95, np.random.default_rng(1))
    narrow = bootstrap_interval(rng.normal(1.0, 1.0, 500), 2000, 0.95, np.random.default_rng(1))
    assert wide[1] - wide[0] > narrow[1] - narrow[0] and narrow[0] < 1.0 < narrow[1]
    assert bootstrap_interval(np.array([0.3, 0.3]), 100, 0.9, rng) == (0.3, 0.3)


def test_verify_result_views_and_save_load(tmp_path):
    data = TensorImageDataset(batch(12), torch.tensor([0, 1] * 6))
    result = verify([PixelModel(2.0), PixelModel(3.0)], [PixelModel(0.0), PixelModel(0.1)], data,
                    PastePatch(square_patch(1), (0, 0)), 1, n_bootstrap=100)
    frame = result.to_frame()
    assert list(frame["algorithm"]) == ["A", "B", "A - B"] and frame["ci_excludes_zero"].iloc[0]
    fig, ax = result.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    loaded = VerificationResult.load(result.save(tmp_path / "v"))
    assert loaded.ci_a == result.ci_a and loaded.names == ("A", "B")
    np.testing.assert_array_equal(loaded.transformed_images, result.transformed_images)


def test_verify_loads_models_from_stores(tmp_path):
    stores = []
    for i, w in enumerate([2.0, 3.0]):
        store = RunStore.create(tmp_path / f"s{i}")
        store.save_checkpoint("final", PixelModel(w).state_dict(), {"global_step": 1})
        stores.append(store)
    data = TensorImageDataset(batch(10), torch.tensor([0] * 10))
    transform = PastePatch(square_patch(1), (0, 0))
    from_stores = verify(stores, [PixelModel(0.0), PixelModel(0.0)], data, transform, 1,
                         model_fn=lambda: PixelModel(0.0), n_bootstrap=50)
    direct = verify([PixelModel(2.0), PixelModel(3.0)], [PixelModel(0.0), PixelModel(0.0)], data, transform, 1, n_bootstrap=50)
    np.testing.assert_allclose(from_stores.effects_a, direct.effects_a)
    with pytest.raises(ValueError, match="model_fn"):
        verify(stores, stores, data, transform, 1)


def test_verify_bad_input():
    models = [PixelModel(1.0), PixelModel(2.0)]
    data = TensorImageDataset(batch(6), torch.tensor([1] * 6))
    transform = PastePatch(square_patch(1), (0, 0))
    with pytest.raises(ValueError, match="at least 2"):
        verify(models[:1], models, data, transform, 0)
    with pytest.raises(ValueError, match="no examples"):
        verify(models, models, data, transform, 1)
    with pytest.raises(ValueError, match="target_class"):
        verify(models, models, data, transform, 1.5)
    with pytest.raises(ValueError, match="labels"):
        verify(models, models, batch(4), transform, "label")
    with pytest.raises(TypeError, match="callable"):
        verify(models, models, data, "paste", 0)
