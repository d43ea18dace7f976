"""Partial dCor as a training term (DistanceCorrelationLoss / Penalty with a signal) and the
conditioning recipe: B trained on what A does not capture knows more about the labels beyond A."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lightning_tda.dcor.loss as loss_module
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor import functional as D
from lightning_tda.dcor.conditioning import ConditioningResult, condition_on_model
from lightning_tda.dcor.loss import DistanceCorrelationLoss
from lightning_tda.dcor.penalty import DistanceCorrelationPenalty
from lightning_tda.models import DigitsCNN, ImageClassifier


def _model(seed: int) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(DigitsCNN(width=8))


def test_partial_loss_values_and_errors():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    s = torch.cat([x[:, :2], z[:, :1]], 1)
    loss = DistanceCorrelationLoss("semi_partial_distance_correlation", target="correlate")
    values = loss.values(x, s, given=[z, z[:, :2]])
    want = [D.semi_partial_distance_correlation(x, s, z), D.semi_partial_distance_correlation(x, s, z[:, :2])]
    torch.testing.assert_close(values, torch.stack(want))
    assert float(loss(x, s, given=z)) == pytest.approx(1 - float(want[0]))
    normalised = DistanceCorrelationLoss("partial_distance_correlation", normalize=True)
    unit = nn.functional.normalize
    assert float(normalised(x, s, given=z)) == pytest.approx(
        float(D.partial_distance_correlation(unit(x, dim=1), s, unit(z, dim=1))))  # the signal is not normalised
    with pytest.raises(ValueError, match="is partial: pass given="):
        loss(x, s)
    with pytest.raises(TypeError, match="y is one tensor"):
        loss(x, [s, s], given=z)
    with pytest.raises(ValueError, match="given= is for partial statistics"):
        DistanceCorrelationLoss()(x, s, given=z)
    with pytest.raises(ValueError, match="empty sequence"):
        loss(x, s, given=[])
    assert doctest.testmod(loss_module).failed == 0


def test_penalty_with_a_signal_adds_the_partial_term():
    inner, given = _model(0), _model(1)
    wrapper = DistanceCorrelationPenalty.conditioned_on(inner, given, "model.relu", weight=0.7)
    assert wrapper.loss_fn.statistic == "semi_partial_distance_correlation" and wrapper.loss_fn.target == "correlate"
    x, y = torch.rand(24, 1, 8, 8), torch.arange(24) % 10
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        total = wrapper.training_step((x, y), 0)
        own = inner.training_step((x, y), 0)

    def features(model):
        out = []
        handle = model.get_submodule("model.relu").register_forward_hook(lambda m, a, o: out.append(o))
        with torch.no_grad():
            model.eval()
            model(x)
        handle.remove()
        return out[0]

    value = D.semi_partial_distance_correlation(features(inner), nn.functional.one_hot(y).float(), features(given))
    assert float(total.detach()) == pytest.approx(float(own.detach()) + 0.7 * (1 - float(value)), rel=1e-5)
    assert total.requires_grad

    custom = DistanceCorrelationPenalty(_model(0), "model.relu", _model(1), signal=lambda b: b[0].flatten(1),
                                        statistic="partial_distance_correlation", target="correlate")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        assert torch.isfinite(custom.training_step((x, y), 0))


def test_penalty_signal_errors():
    with pytest.raises(ValueError, match="a signal makes the penalty partial"):
        DistanceCorrelationPenalty(_model(0), "model.relu", _model(1), signal="labels",
                                   statistic="distance_correlation_sqr")
    with pytest.raises(ValueError, match="is partial: pass signal='labels'"):
        DistanceCorrelationPenalty(_model(0), "model.relu", _model(1), statistic="partial_distance_correlation")
    with pytest.raises(ValueError, match="signal must be None, 'labels' or a function"):
        DistanceCorrelationPenalty(_model(0), "model.relu", _model(1), signal="targets")
    # the penalty reads labels through its own batch_fn: here float ones, which cannot be one-hot
    wrapper = DistanceCorrelationPenalty.conditioned_on(_model(0), _model(1), "model.relu",
                                                        batch_fn=lambda b: (b[0], b[1].float()))
    with pytest.raises(TypeError, match="needs integer class labels"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            wrapper.training_step((torch.rand(8, 1, 8, 8), torch.arange(8)), 0)
    with pytest.raises(ValueError, match="statistic must be one of"):
        condition_on_model(statistic="distance_correlation")
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        condition_on_model(epochs=0)


def test_conditioned_model_knows_more_beyond_the_given_one(tmp_path):
    # weight 1, Adam, 3 epochs on 480 images: a small run where the effect must show
    result = condition_on_model(lambda: ImageClassifier(DigitsCNN(width=8), optimizer="adam", lr=0.01),
                                DigitsDataModule(batch_size=64, n_train=480), epochs=3, weight=1.0, seeds=(0,))
    assert result.accuracy.shape == (1, 2) and result.n_examples == 359
    beyond = result.pdcor_beyond_given[0]
    assert beyond[0] > beyond[1] + 0.2, beyond  # conditioned B vs its independent twin B'
    assert result.pdcor_given_beyond[0, 0] < result.pdcor_given_beyond[0, 1]  # A adds less to B than to B'
    assert (result.accuracy > 0.7).all() and 0 < result.dcor_to_given.min() <= result.dcor_to_given.max() < 1
    loaded = ConditioningResult.load(result.save(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.pdcor_beyond_given, result.pdcor_beyond_given)
    assert "R*(B given A, signal)" in result.to_markdown()

    from lightning_tda.reporting import Reporter

    result.log(Reporter(tmp_path / "report"), "conditioning")
    assert (tmp_path / "report" / "figures" / "conditioning.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "tables" / "conditioning_summary.csv").exists()
