"""Layer-by-layer comparison: a model against itself, blockwise against dense, CKA against its
n x n definition, bad input, and the result's files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_tda.data import TensorImageDataset, load_digits_tensors
from lightning_tda.dcor import functional as D
from lightning_tda.dcor.layers import LayerComparison, compare_layers, default_layers, layer_activations, linear_cka
from lightning_tda.models import DigitsCNN


def _digits(n: int = 80, dtype=torch.float32):
    x, y = load_digits_tensors()
    return x[:n].to(dtype), y[:n]


def _cnn(seed: int, dtype=torch.float32) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN(width=4).to(dtype)


def test_default_layers_skip_reshapes():
    assert default_layers(DigitsCNN()) == ["features.0", "features.1", "features.2", "features.3", "features.4",
                                           "fc1", "relu", "fc2"]


def test_model_against_itself_has_one_on_the_diagonal():
    x, y = _digits(120)
    model = _cnn(0)
    result = compare_layers(model, model, (x, y), signal="labels")
    np.testing.assert_allclose(np.diagonal(result.dcor), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(result.cka), 1.0, atol=1e-6)
    assert (result.dcor <= 1 + 1e-6).all() and (result.dcor > 0).all()
    np.testing.assert_allclose(result.dcor, result.dcor.T, atol=1e-6)
    # a layer tells nothing about the labels beyond itself
    np.testing.assert_allclose(np.diagonal(result.partial_a_given_b), 0.0, atol=1e-6)
    # another copy of the same data (a second hooked pass) gives the same diagonal
    again = compare_layers(model, model, (x.clone(), y), (x.clone(), y), method="blockwise", block_size=32)
    np.testing.assert_allclose(np.diagonal(again.dcor), 1.0, atol=1e-6)
    assert result.summary()["dcor_diagonal_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("partial", ["partial_distance_correlation", "semi_partial_distance_correlation"])
def test_blockwise_equals_dense_pairwise(partial):
    x, y = _digits(70, torch.float64)
    model_a, model_b = _cnn(0, torch.float64), _cnn(1, torch.float64)
    layers_a, layers_b = ["features.1", "features.4", "fc1", "fc2"], ["features.3", "relu", "fc2"]
    result = compare_layers(model_a, model_b, (x, y), layers_a=layers_a, layers_b=layers_b, signal="labels",
                            partial=partial, method="blockwise", block_size=16, dtype=torch.float64, batch_size=32)
    acts_a = layer_activations(model_a, x, layers_a, dtype=torch.float64)
    acts_b = layer_activations(model_b, x, layers_b, dtype=torch.float64)
    labels = nn.functional.one_hot(y).double()
    stat = D.resolve_statistic(partial, partial=True)
    for i, la in enumerate(layers_a):
        a = acts_a[la]
        assert result.dcor_signal_a[i] == pytest.approx(float(D.distance_correlation(a, labels, method="dense")),
                                                        abs=1e-9)
        for j, lb in enumerate(layers_b):
            b = acts_b[lb]
            assert result.dcor[i, j] == pytest.approx(float(D.distance_correlation(a, b, method="dense")), abs=1e-9)
            assert result.partial_a_given_b[i, j] == pytest.approx(float(stat(a, labels, b, method="dense")), abs=1e-9)
            assert result.partial_b_given_a[i, j] == pytest.approx(float(stat(b, labels, a, method="dense")), abs=1e-9)
    # and the dense path of the comparison itself
    dense = compare_layers(model_a, model_b, (x, y), layers_a=layers_a, layers_b=layers_b, signal="labels",
                           partial=partial, method="dense", dtype=torch.float64)
    np.testing.assert_allclose(dense.dcor, result.dcor, atol=1e-10)
    np.testing.assert_allclose(dense.partial_a_given_b, result.partial_a_given_b, atol=1e-10)


def test_linear_cka_equals_its_gram_definition():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 7, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64)]
    ys = [xs[0] @ torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(40, 60, generator=g,
                                                                                   dtype=torch.float64)]

    def reference(a, b):  # HSIC with centred linear kernels, n x n
        n = a.shape[0]
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        k, m = h @ a @ a.T @ h, h @ b @ b.T @ h
        return float((k * m).sum() / torch.sqrt((k * k).sum() * (m * m).sum()))

    for form in ("feature", "gram", "auto"):
        got = linear_cka(xs, ys, form=form, block_rows=7)
        for i, a in enumerate(xs):
            for j, b in enumerate(ys):
                assert float(got[i, j]) == pytest.approx(reference(a, b), abs=1e-12), form
    assert float(linear_cka([torch.ones(5, 2)], [torch.randn(5, 2)])[0, 0]) == 0.0  # constant input


def test_bad_input_is_a_clear_error(tmp_path):
    x, y = _digits(40)
    model_a, model_b = _cnn(0), _cnn(1)
    with pytest.raises(ValueError, match=r"model A \(DigitsCNN\) has no layer 'fc3'.*'fc1', 'relu', 'fc2'"):
        compare_layers(model_a, model_b, x, layers_a=["fc1", "fc3"])
    with pytest.raises(ValueError, match=r"model B \(DigitsCNN\) has no layer 'head'"):
        compare_layers(model_a, model_b, x, layers_b=["head"])
    with pytest.raises(ValueError, match="no layer 'nope'"):
        layer_activations(model_a, x, ["nope"])
    with pytest.raises(ValueError, match="different lengths: data_a has 40 examples, data_b has 39"):
        compare_layers(model_a, model_b, x, x[:39])
    with pytest.raises(ValueError, match="different lengths: data_a has 40 examples, data_b has 30"):
        compare_layers(model_a, model_b, TensorImageDataset(x, y), (x[:30], y[:30]))
    with pytest.raises(ValueError, match="signal has 39 rows but the evaluation set has 40"):
        compare_layers(model_a, model_b, x, signal=torch.randn(39, 2))
    with pytest.raises(ValueError, match="holds inputs alone, so it has no labels"):
        compare_layers(model_a, model_b, x, signal="labels")
    with pytest.raises(ValueError, match="partial must be one of"):
        compare_layers(model_a, model_b, x, partial="pearson")
    with pytest.raises(ValueError, match="lists 'fc1' twice"):
        compare_layers(model_a, model_b, x, layers_a=["fc1", "fc1"])

    class Shared(nn.Module):  # one ReLU used twice in a forward pass
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(64, 8), nn.ReLU()

        def forward(self, t):
            return self.act(self.fc(self.act(t.flatten(1))))

    with pytest.raises(ValueError, match="ran 2 times in 1 forward passes"):
        layer_activations(Shared(), x, ["act"])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_result_saves_loads_and_reports_files(tmp_path):
    from lightning_tda.reporting import Reporter

    x, y = _digits(60)
    result = compare_layers(_cnn(0), _cnn(1), (x, y), layers_a=["fc1", "fc2"], layers_b=["relu", "fc2"],
                            signal="labels", model_names=("left", "right"))
    loaded = LayerComparison.load(result.save(tmp_path / "saved"))
    assert loaded.layers_a == ("fc1", "fc2") and loaded.model_names == ("left", "right")
    np.testing.assert_array_equal(loaded.partial_b_given_a, result.partial_b_given_a)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer_a", "layer_b", "dcor", "cka", "pdcor_a_given_b", "pdcor_b_given_a"]
    assert len(frame) == 4
    no_signal = compare_layers(_cnn(0), _cnn(1), x, layers_a=["fc2"], layers_b=["fc2"])
    assert no_signal.partial_a_given_b is None and "pdcor_a_given_b" not in no_signal.to_frame()
    LayerComparison.load(no_signal.save(tmp_path / "plain"))

    reporter = Reporter(tmp_path / "report")
    result.log(reporter, "layers")
    assert (tmp_path / "report" / "figures" / "layers.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "tables" / "layers_table.csv").read_text().startswith("layer_a,layer_b,dcor,cka")
    assert "layers/dcor_last_layers" in (tmp_path / "report" / "metrics.csv").read_text()
