"""The exact engine against a plain per-example loop of torch.autograd.grad; state and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tda.grads import NonFiniteGradientError, make_gradient_engine
from lightning_tda.grads.reference import naive_per_example_gradients, naive_projected_gradients
from lightning_tda.models import MLP, DigitsCNN
from lightning_tda.outputs import loss, margin_from_logits


def digits_batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = digits_batch()
    return (DigitsCNN(width=8), x, y) if name == "cnn" else (MLP(64, 32, 10, depth=3), x, y)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("projector", ["rademacher", "gaussian"])
def test_exact_equals_naive_loop(name, projector):
    model, x, y = model_and_batch(name)
    engine = make_gradient_engine("exact", model, proj_dim=256, seed=3, projector=projector, chunk_size=7)
    feats = engine.project(x, y)
    reference = naive_projected_gradients(model, x, y, engine.projection)
    assert feats.shape == (len(x), 256) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=1e-5)
    assert engine.param_names == [n for n, _ in model.named_parameters()]
    assert engine.excluded_param_names == []
    # the outputs of that pass: margins and logits, no second forward needed by the caller
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(engine.last_logits, logits)
    torch.testing.assert_close(engine.last_outputs, margin_from_logits(logits, y))


def test_exact_matches_naive_gradients_in_float64_through_the_dense_matrix():
    model, x, y = model_and_batch("cnn")
    model, x, y = model.double(), x[:8], y[:8]
    engine = make_gradient_engine("exact", model, proj_dim=64, dtype=torch.float64)
    grads = naive_per_example_gradients(model, x.double(), y, engine.param_names)
    flat = torch.cat([grads[n].reshape(len(x), -1) for n in engine.param_names], 1)
    torch.testing.assert_close(engine.project(x.double(), y), flat @ engine.projection.matrix(), atol=1e-10, rtol=1e-10)


def test_custom_output_fn_and_param_subset():
    model, x, y = model_and_batch("cnn")
    params = ["fc1.weight", "fc2.bias", "features.0.weight"]
    def custom_fn(m, xb, yb):  # vmap-compatible: no label checks
        return -2.0 * nn.functional.cross_entropy(m(xb), yb, reduction="none")

    custom = make_gradient_engine("exact", model, proj_dim=64, output_fn=custom_fn, params=params)
    builtin = make_gradient_engine("exact", model, proj_dim=64, output_fn="loss", params=params)
    assert custom.param_names == ["features.0.weight", "fc1.weight", "fc2.bias"]
    feats = custom.project(x, y)
    reference = naive_projected_gradients(model, x, y, custom.projection, lambda m, xb, yb: -2.0 * loss(m, xb, yb))
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(builtin.project(x, y), -feats / 2, atol=1e-5, rtol=1e-5)
    assert custom.last_logits is None
    torch.testing.assert_close(custom.last_outputs, -2 * builtin.last_outputs)
    # one with data-dependent Python control flow cannot run under vmap: same result by a loop
    def checked_fn(m, xb, yb):
        if int(yb.max()) >= 10:
            raise ValueError("bad label")
        return custom_fn(m, xb, yb)

    looped = make_gradient_engine("exact", model, proj_dim=64, output_fn=checked_fn, params=params)
    with pytest.warns(RuntimeWarning, match="falls back to a loop"):
        torch.testing.assert_close(looped.project(x, y), feats, atol=1e-5, rtol=1e-5)
    # an output function without labels
    unlabeled = make_gradient_engine("exact", model, proj_dim=64, output_fn=lambda m, xb, yb: m(xb)[:, 0])
    assert unlabeled.project(x).shape == (len(x), 64)
    with pytest.raises(ValueError, match="needs labels"):
        builtin.project(x)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_dropout_model_in_eval_mode_and_state_untouched():
    torch.manual_seed(0)
    model = DropoutNet()
    x, y = digits_batch()
    model.train()
    model.net[1].eval()  # mixed modes must come back exactly as they were
    model.net[1].bias.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    engine = make_gradient_engine("exact", model, proj_dim=128)
    assert engine.randomness == "different"
    assert "net.1.bias" not in engine.param_names  # default: trainable parameters only
    feats = engine.project(x, y)
    assert [m.training for m in model.modules()] == modes
    assert not model.net[1].bias.requires_grad and model.net[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(feats, engine.project(x, y))  # eval mode: no dropout noise
    torch.testing.assert_close(feats, naive_projected_gradients(model, x, y, engine.projection), atol=1e-5, rtol=1e-5)


def test_works_under_inference_mode_and_moves_inputs():
    model, x, y = model_and_batch("mlp")
    engine = make_gradient_engine("exact", model, proj_dim=32)
    expected = engine.project(x, y)
    with torch.inference_mode():
        torch.testing.assert_close(engine.project(x.clone(), y.clone()), expected)
    with torch.no_grad():
        torch.testing.assert_close(engine.project(x, y), expected)


class NaNAt(nn.Module):
    """An MLP whose output is NaN/inf where the input carries a marker."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("engine_name", ["exact", "factored"])
def test_nan_gradients_are_reported_with_indices(engine_name):
    torch.manual_seed(0)
    model = NaNAt()
    x, y = digits_batch(12)
    x[3, 0, 0, 0] = float("nan")
    x[7, 0, 1, 1] = float("inf")
    engine = make_gradient_engine(engine_name, model, proj_dim=32, chunk_size=5)
    with pytest.raises(NonFiniteGradientError, match=r"2 of 12 examples.*\[3, 7\]") as info:
        engine.project(x, y)
    assert info.value.indices == [3, 7]
    assert model.training and not model.fc._forward_hooks  # state restored after the error
    engine.project(x[:3], y[:3])  # the clean ones are fine


def test_bad_inputs():
    model, x, y = model_and_batch("mlp")
    engine = make_gradient_engine("exact", model, proj_dim=32)
    with pytest.raises(ValueError, match="one entry per example"):
        engine.project(x, y[:3])
    with pytest.raises(TypeError, match="batched Tensor"):
        engine.project([x], y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels out of range"):
        engine.project(x, y + 10)
    with pytest.raises(ValueError, match="one scalar per example"):
        make_gradient_engine("exact", model, proj_dim=32, output_fn=lambda m, xb, yb: m(xb)).project(x, y)
    with pytest.raises(ValueError, match="unknown projection"):
        make_gradient_engine("exact", model, projection="sparse")
    with pytest.raises(ValueError, match="chunk_size"):
        make_gradient_engine("exact", model, chunk_size=0)
