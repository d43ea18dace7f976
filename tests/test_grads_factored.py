"""The factored engine against the exact engine under the same Kronecker-structured projection."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_tda.grads import FactoredEngine, make_gradient_engine
from lightning_tda.grads.reference import naive_per_example_gradients
from lightning_tda.models import MLP, DigitsCNN


def batch(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def assert_same_as_exact(engine: FactoredEngine, x: torch.Tensor, y: torch.Tensor | None, **kw) -> torch.Tensor:
    feats = engine.project(x, y)
    exact = make_gradient_engine("exact", engine.model, projection=engine.projection, **kw)
    torch.testing.assert_close(feats, exact.project(x, y), atol=1e-4, rtol=1e-4)
    return feats


@pytest.mark.parametrize("projector", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_factored_equals_exact_under_the_same_projection(name, projector):
    torch.manual_seed(0)
    model = DigitsCNN() if name == "cnn" else MLP(64, 48, 10, depth=3)
    x, y = batch(32, (1, 8, 8))
    engine = make_gradient_engine("factored", model, proj_dim=512, seed=5, projector=projector, chunk_size=13)
    feats = assert_same_as_exact(engine, x, y)
    assert feats.shape == (32, 512)
    assert engine.param_names == [n for n, _ in model.named_parameters()]  # biases covered too
    assert engine.excluded_param_names == []
    # the same as the dense equivalent of the Kronecker projection applied to naive gradients
    grads = naive_per_example_gradients(model, x, y, engine.param_names)
    flat = torch.cat([grads[n].reshape(32, -1) for n in engine.param_names], 1)
    torch.testing.assert_close(feats, flat @ engine.projection.matrix(), atol=1e-4, rtol=1e-4)
    # "kronecker" builds the same projection from the model alone
    same = make_gradient_engine("exact", model, proj_dim=512, seed=5, projector=projector, projection="kronecker")
    torch.testing.assert_close(same.projection.matrix(), engine.projection.matrix())


class Zoo(nn.Module):
    """Every layer kind the factored engine handles, and a few it must route elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.c3 = nn.Conv2d(8, 12, 2, padding="same", dilation=2, padding_mode="circular")
        self.dw = nn.Conv2d(12, 12, 3, groups=12, padding=1)
        self.c1d = nn.Conv1d(12, 6, 3, stride=2, padding=2)
        self.ln = nn.LayerNorm(6)
        self.seq = nn.Linear(6, 6)  # called twice, on [batch, positions, 6]
        self.offset = nn.Parameter(0.1 * torch.randn(6))  # a free parameter: not factorable
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.bn1(self.c1(x)))  # in-place ops on hooked outputs
        h = self.gn(self.c2(h)).relu_()
        h = self.dw(self.c3(h)).mean(-1)
        h = torch.relu(self.c1d(h)).transpose(1, 2)
        h = self.ln(h) + self.offset
        h = self.seq(torch.tanh(self.seq(h)))
        return self.head(self.drop(h.mean(1)))


def zoo() -> Zoo:
    torch.manual_seed(0)
    model = Zoo()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_every_layer_kind_and_the_exact_fallback():
    model = zoo().train()
    x, y = batch(10, (3, 12, 12), classes=5)
    running_mean = model.bn1.running_mean.clone()
    engine = make_gradient_engine("factored", model, proj_dim=300)
    assert_same_as_exact(engine, x, y)
    info = engine.describe()
    json.dumps(info)
    how = {g["name"]: (g["kind"], g["computed_by"]) for g in info["groups"]}
    assert how["c2"] == ("kronecker", "hooks") and how["bn1"] == ("dense", "hooks")
    assert how["<root>"] == ("dense", "exact")  # the free parameter, explicitly
    assert sorted(engine.param_names) == sorted(n for n, _ in model.named_parameters())
    assert [g["columns"] for g in info["groups"]][-1][1] == 300
    assert sum(g["k"] for g in info["groups"]) == 300
    assert model.training and torch.equal(model.bn1.running_mean, running_mean)  # eval inside


def test_excluded_parameters_are_listed_and_left_out():
    model = zoo()
    x, y = batch(6, (3, 12, 12), classes=5)
    engine = make_gradient_engine("factored", model, proj_dim=200, unsupported="exclude")
    assert engine.excluded_param_names == ["offset"]
    assert "offset" not in engine.param_names and engine.describe()["excluded_params"] == ["offset"]
    assert_same_as_exact(engine, x, y)


class TokenModel(nn.Module):
    """Integer inputs, a frozen embedding (unsupported) in front of hooked layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.emb.weight.requires_grad_(False)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.emb(tokens)).relu_().mean(1))


def test_integer_inputs_behind_a_frozen_layer():
    torch.manual_seed(0)
    model = TokenModel()
    tokens, y = torch.randint(0, 20, (9, 5)), torch.randint(0, 4, (9,))
    engine = make_gradient_engine("factored", model, proj_dim=40)
    assert engine.param_names == ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    assert_same_as_exact(engine, tokens, y)
    assert not model.emb.weight.requires_grad
    # the embedding itself (selected explicitly) goes through the exact engine
    with_emb = make_gradient_engine("factored", model, proj_dim=60, params=["emb.weight", "fc.weight"])
    assert_same_as_exact(with_emb, tokens, y)
    assert not model.emb.weight.requires_grad


class PartlyNoGrad(nn.Module):
    """A layer run under no_grad inside forward has no gradient, in both engines."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.frozen(x.flatten(1))
        return self.head(torch.relu(h))


def test_layer_run_under_no_grad_has_zero_features():
    torch.manual_seed(0)
    model = PartlyNoGrad()
    x, y = batch(5, (1, 8, 8))
    engine = make_gradient_engine("factored", model, proj_dim=40)
    feats = assert_same_as_exact(engine, x, y)
    frozen = engine.projection.blocks[0]
    assert frozen.group.name == "frozen" and feats[:, frozen.columns].abs().sum() == 0
    assert feats[:, engine.projection.blocks[1].columns].abs().sum() > 0


def test_layers_behind_a_trainable_unhooked_layer():
    """fc's input depends only on the (exact-engine) embedding: the backward must ask for every
    hooked output directly; the engine finds that out and remembers it."""
    torch.manual_seed(0)
    model = TokenModel()
    model.emb.weight.requires_grad_(True)
    tokens, y = torch.randint(0, 20, (9, 5)), torch.randint(0, 4, (9,))
    engine = make_gradient_engine("factored", model, proj_dim=60)
    assert engine.describe()["groups"][0]["computed_by"] == "exact"
    assert_same_as_exact(engine, tokens, y)
    assert engine._direct
    assert_same_as_exact(engine, tokens, y)


def test_model_state_and_hooks_are_restored_even_on_errors():
    torch.manual_seed(0)
    model = DigitsCNN()
    model.train()
    model.features[0].eval()
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x, y = batch(8, (1, 8, 8))

    def broken(m, xb, yb):
        m(xb)
        raise KeyError("boom")

    for engine in (
        make_gradient_engine("factored", model, proj_dim=64),
        make_gradient_engine("factored", model, proj_dim=64, output_fn=broken),
    ):
        try:
            engine.project(x, y)
        except KeyError:
            pass
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


class NoSupportedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x).mean(1) * self.scale


class Functional(nn.Module):
    """Uses a Linear's weight functionally: hooks would never see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.flatten(1), self.fc.weight, self.fc.bias)


class SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 8, 8] -> [8, batch, 8]
        return self.fc(x.transpose(0, 1)).mean(0)


def test_clear_errors():
    with pytest.raises(ValueError, match="supports none of the selected parameters.*engine='exact'"):
        make_gradient_engine("factored", NoSupportedLayer())
    with pytest.raises(ValueError, match="params is empty"):
        make_gradient_engine("factored", DigitsCNN(), params=[])
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        make_gradient_engine("factored", DigitsCNN(), proj_dim=0)
    with pytest.raises(ValueError, match="exceeds"):
        make_gradient_engine("factored", MLP(4, 2, 2), proj_dim=100)
    with pytest.raises(ValueError, match="unsupported must be"):
        make_gradient_engine("factored", DigitsCNN(), unsupported="drop")  # type: ignore[arg-type]
    x, y = batch(4, (1, 8, 8))
    with pytest.raises(RuntimeError, match="not called by the forward pass"):
        make_gradient_engine("factored", Functional(), proj_dim=16).project(x, y)
    with pytest.raises(RuntimeError, match="batch as dimension 0"):
        make_gradient_engine("factored", SequenceFirst(), proj_dim=16).project(x[:, 0], y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factored_features_keep_full_rank_on_digits(seed):
    """With more examples than dimensions, the factored features span all k dimensions, as a dense
    JL projection's do. Splitting k equally among layers lost dimensions: a small layer got
    nearly all its parameters' worth of columns, so a side of its Kronecker block was a square
    +-1 matrix (singular with probability 0.38 at size 10), and the last layer's output side
    spanned all 10 logits while the margin's gradient is orthogonal to the all-ones vector.
    ``Phi^T Phi`` was then singular, and TRAK without a ridge on float32 features was noise
    (digits LDS 0.04 against 0.11 for the dense projection)."""
    from lightning_tda.data import load_digits_tensors

    images, labels = load_digits_tensors()
    torch.manual_seed(seed)
    model = DigitsCNN()
    engine = make_gradient_engine("factored", model, proj_dim=512, seed=seed, dtype=torch.float64)
    phi = engine.project(images[:700], labels[:700])
    # singular values under 1e-6 of the largest are float32 rounding (the model runs in float32)
    assert int(torch.linalg.matrix_rank(phi, rtol=1e-6)) == 512
    dense = make_gradient_engine("exact", model, proj_dim=512, seed=seed, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(dense.project(images[:700], labels[:700]), rtol=1e-6)) == 512
