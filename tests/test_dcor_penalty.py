"""DistanceCorrelationLoss and the DistanceCorrelationPenalty wrapper around a LightningModule."""

from __future__ import annotations

import copy
import pickle
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.dcor import functional as D
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor.penalty import DistanceCorrelationLoss, DistanceCorrelationPenalty, linear_warmup
from lightning_tda.models import DigitsCNN, ImageClassifier

from conftest import trainer_kwargs


# ------------------------------------------------------------------------- the loss


def test_loss_targets_normalisation_and_reference_lists():
    g = torch.Generator().manual_seed(0)
    x, y1, y2 = torch.randn(32, 6, generator=g), torch.randn(32, 2, 2, generator=g), torch.randn(32, 3, generator=g)
    y1 = y1 + x[:, :4].reshape(32, 2, 2)
    loss = DistanceCorrelationLoss()
    assert float(loss(x, y1)) == pytest.approx(float(D.distance_correlation_sqr(x, y1)))
    both = (D.distance_correlation_sqr(x, y1) + D.distance_correlation_sqr(x, y2)) / 2
    assert float(loss(x, [y1, y2])) == pytest.approx(float(both))
    correlate = DistanceCorrelationLoss(statistic="distance_correlation", target="correlate")
    assert float(correlate(x, y1)) == pytest.approx(1 - float(D.distance_correlation(x, y1)))
    normalised = DistanceCorrelationLoss(normalize=True)
    unit = lambda t: t.reshape(32, -1) / t.reshape(32, -1).norm(dim=1, keepdim=True)  # noqa: E731
    assert float(normalised(x, y1)) == pytest.approx(float(D.distance_correlation_sqr(unit(x), unit(y1))))
    xg = x.clone().requires_grad_()
    DistanceCorrelationLoss(statistic="u_distance_correlation_sqr")(xg, y1).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_loss_errors():
    with pytest.raises(ValueError, match="target must be one of"):
        DistanceCorrelationLoss(target="anticorrelate")
    with pytest.raises(ValueError, match="unknown statistic"):
        DistanceCorrelationLoss(statistic="pearson")
    with pytest.raises(ValueError, match="empty sequence"):
        DistanceCorrelationLoss()(torch.randn(5, 2), [])
    with pytest.raises(ValueError, match="non-finite"):
        DistanceCorrelationLoss()(torch.full((5, 2), float("nan")), torch.randn(5, 2))


def test_linear_warmup():
    w = linear_warmup(0.5, 10)
    assert [w(0), w(5), w(10), w(100)] == [0.0, 0.25, 0.5, 0.5]
    with pytest.raises(ValueError):
        linear_warmup(1.0, 0)


# ------------------------------------------------------------------------- the wrapper


def _digits(n_train=320, batch_size=64):
    return DigitsDataModule(batch_size=batch_size, n_train=n_train)


def _model(seed, width=8):
    torch.manual_seed(seed)
    return ImageClassifier(DigitsCNN(width=width), lr=0.05)


def _fit(module, tmp_path, datamodule, epochs=2, **kw):
    kw.setdefault("limit_val_batches", 0)
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, **trainer_kwargs(tmp_path, **kw))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval mode.*")
        trainer.fit(module, datamodule=datamodule)
    return trainer


@torch.no_grad()
def _features(model, layer, x):
    out = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: out.append(o))
    model.eval()
    model(x)
    handle.remove()
    return out[0]


def test_unknown_layer_lists_the_layers_it_could_find():
    with pytest.raises(ValueError, match=r"the wrapped module has no layer 'model.fc3'.*'model.fc1', 'model.relu', 'model.fc2'"):
        DistanceCorrelationPenalty(_model(0), "model.fc3", reference=_model(1))
    with pytest.raises(ValueError, match=r"reference 0 \(DigitsCNN\) has no layer 'model.fc1'.*'fc1'"):
        DistanceCorrelationPenalty(_model(0), "model.fc1", reference=DigitsCNN())
    with pytest.raises(ValueError, match="pass reference_layer"):
        DistanceCorrelationPenalty(_model(0), "model.fc1")
    with pytest.raises(ValueError, match="fully correlated with itself"):
        DistanceCorrelationPenalty(_model(0), "model.fc1", reference_layer="model.fc1")
    with pytest.raises(TypeError, match="must be a LightningModule"):
        DistanceCorrelationPenalty(DigitsCNN(), "fc1", reference=DigitsCNN())
    manual = _model(0)
    manual.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization"):
        DistanceCorrelationPenalty(manual, "model.fc1", reference=_model(1))
    with pytest.raises(ValueError, match="reference_input must be"):
        DistanceCorrelationPenalty(_model(0), "model.fc1", reference=_model(1), reference_input="labels")


def test_training_step_returns_module_loss_plus_weighted_penalty():
    inner, ref = _model(0), _model(1)
    wrapper = DistanceCorrelationPenalty(inner, "model.relu", reference=ref, weight=0.3, normalize=True)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        total = wrapper.training_step((x, y), 0)
        own = inner.training_step((x, y), 0)
    f_inner = nn.functional.normalize(_features(inner, "model.relu", x), dim=1)
    f_ref = nn.functional.normalize(_features(ref, "model.relu", x), dim=1)
    want = own + 0.3 * D.distance_correlation_sqr(f_inner, f_ref)
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert total.requires_grad


def test_wrapped_module_code_is_unchanged_and_its_hooks_and_logs_still_run(tmp_path):
    class Counting(ImageClassifier):
        def on_train_epoch_end(self):
            self.epochs_seen = getattr(self, "epochs_seen", 0) + 1
            self.log("own/epoch_hook", float(self.epochs_seen))

    torch.manual_seed(0)
    inner = Counting(DigitsCNN(width=8))
    code_before = {k: v.__code__ for k, v in vars(ImageClassifier).items() if callable(v) and hasattr(v, "__code__")}
    attrs_before = set(vars(inner))
    wrapper = DistanceCorrelationPenalty(inner, "model.fc1", reference=_model(1), weight=0.5)
    trainer = _fit(wrapper, tmp_path, _digits(n_train=128), epochs=2, limit_val_batches=2)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/acc", "own/epoch_hook", "dcor_penalty/dcor",
                "dcor_penalty/weight", "dcor_penalty/penalty"):
        assert key in metrics, key
    assert inner.epochs_seen == 2
    assert float(metrics["dcor_penalty/weight"]) == 0.5
    code_after = {k: v.__code__ for k, v in vars(ImageClassifier).items() if callable(v) and hasattr(v, "__code__")}
    assert code_after == code_before
    assert set(vars(inner)) - attrs_before <= {"epochs_seen"}
    assert all(name not in vars(inner) for name in ("training_step", "forward", "configure_optimizers"))
    wrapper.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in inner.modules())
    # unwrapped, the module trains on its own as before
    _fit(inner, tmp_path / "alone", _digits(n_train=128), epochs=1)


def test_penalty_reduces_dcor_to_a_frozen_reference(tmp_path):
    dm = _digits(n_train=256)
    model_a = _model(0)
    _fit(model_a, tmp_path / "a", dm, epochs=2)
    a_params = [p.detach().clone() for p in model_a.parameters()]

    with_penalty = _model(1)
    wrapper = DistanceCorrelationPenalty(with_penalty, "model.relu", reference=model_a, weight=1.0, normalize=True)
    _fit(wrapper, tmp_path / "b", dm, epochs=2)
    without = _model(1)
    _fit(without, tmp_path / "c", dm, epochs=2)

    dm.setup()
    x = torch.stack([dm.val_dataset[i][0] for i in range(len(dm.val_dataset))])
    fa = _features(model_a, "model.relu", x)
    d_with = float(D.distance_correlation(_features(with_penalty, "model.relu", x), fa))
    d_without = float(D.distance_correlation(_features(without, "model.relu", x), fa))
    assert d_with < d_without - 0.2, (d_with, d_without)  # about 0.4 against 0.8
    # the frozen reference was not trained
    assert all(torch.equal(p, q) for p, q in zip(a_params, model_a.parameters()))
    assert not any(p.requires_grad for p in model_a.parameters())


class TwoBranch(L.LightningModule):
    """Two feature branches feeding one head; training_step calls self.net (not self(...))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.branch_a = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.branch_b = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def net(self, x):
        return self.head(torch.cat([self.branch_a(x), self.branch_b(x)], 1)).squeeze(1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return {"loss": loss, "mse": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def _regression(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, 0] + torch.sin(x[:, 1])


def _branch_dcor(model, x):
    with torch.no_grad():
        return float(D.distance_correlation(model.branch_a(x), model.branch_b(x)))


def test_two_layers_of_one_module_trained_jointly(tmp_path):
    x, y = _regression()
    loader = lambda: DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)  # noqa: E731
    start = _branch_dcor(TwoBranch(), x)  # about 0.8
    found = {}
    for target in ("none", "decorrelate", "correlate"):
        inner = TwoBranch()
        module = inner if target == "none" else DistanceCorrelationPenalty(
            inner, "branch_a", reference_layer="branch_b", weight=2.0, target=target, statistic="distance_correlation",
        )
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_epochs=5, **trainer_kwargs(tmp_path / target))
        trainer.fit(module, loader())
        assert ("dcor_penalty/dcor" in trainer.callback_metrics) == (target != "none")
        found[target] = _branch_dcor(inner, x)
    # about 0.87 without the penalty, 0.18 decorrelated, 0.98 correlated
    assert found["decorrelate"] < min(found["none"], start) - 0.3, (start, found)
    assert found["correlate"] > max(found["none"], start) + 0.05, (start, found)


def test_trainable_reference_joins_the_optimizer_and_learns(tmp_path):
    x, y = _regression()
    inner = TwoBranch()
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    before = [p.detach().clone() for p in reference.parameters()]
    wrapper = DistanceCorrelationPenalty(
        inner, "branch_a", reference=reference, reference_layer="", freeze_reference=False,
        reference_input=lambda batch: batch[0], weight=1.0,
    )
    opt = wrapper.configure_optimizers()
    assert {id(p) for p in reference.parameters()} <= {id(p) for g in opt.param_groups for p in g["params"]}
    L.Trainer(max_epochs=2, **trainer_kwargs(tmp_path)).fit(wrapper, DataLoader(TensorDataset(x, y), batch_size=64))
    assert reference.training
    assert any(not torch.equal(p, q) for p, q in zip(before, reference.parameters()))


def test_reference_input_modes():
    x, y = _regression(n=32)
    for mode in ("auto", "batch"):  # TwoBranch calls self.net, so "auto" falls back to the batch's x
        wrapper = DistanceCorrelationPenalty(TwoBranch(), "branch_a", reference=nn.Linear(6, 3), reference_layer="",
                                             reference_input=mode)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            out = wrapper.training_step((x, y), 0)
        assert set(out) == {"loss", "mse"} and out["loss"] > out["mse"]
    strict = DistanceCorrelationPenalty(TwoBranch(), "branch_a", reference=nn.Linear(6, 3), reference_layer="",
                                        reference_input="forward")
    with pytest.raises(RuntimeError, match="was not called as module"):
        strict.training_step((x, y), 0)


def test_layer_not_called_is_a_clear_error():
    class Unused(TwoBranch):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(6, 2)

    wrapper = DistanceCorrelationPenalty(Unused(), "spare", reference_layer="branch_b")
    with pytest.raises(RuntimeError, match="layer 'spare' of the wrapped module was not called"):
        wrapper.training_step(_regression(n=16), 0)


def test_diverse_from_is_the_seed_recipe(tmp_path):
    earlier = [_model(0), _model(1)]
    wrapper = DistanceCorrelationPenalty.diverse_from(_model(2), earlier, layer="model.relu")
    assert wrapper.weight == 0.05 and wrapper.loss_fn.normalize and wrapper.loss_fn.target == "decorrelate"
    assert wrapper.loss_fn.statistic == "distance_correlation_sqr" and wrapper.freeze_reference
    assert not any(p.requires_grad for m in earlier for p in m.parameters())
    schedule = DistanceCorrelationPenalty.diverse_from(_model(2), earlier, layer="model.relu",
                                                       weight=linear_warmup(0.05, 4))
    trainer = _fit(schedule, tmp_path, _digits(n_train=128, batch_size=32), epochs=1, limit_val_batches=0)
    metrics = trainer.callback_metrics
    assert {"dcor_penalty/dcor_0", "dcor_penalty/dcor_1"} <= set(metrics)
    assert float(metrics["dcor_penalty/dcor"]) == pytest.approx(
        (float(metrics["dcor_penalty/dcor_0"]) + float(metrics["dcor_penalty/dcor_1"])) / 2, rel=1e-5)
    assert float(metrics["dcor_penalty/weight"]) == pytest.approx(0.05 * 3 / 4)  # 4 steps: last at step 3
    # picklable (ddp_spawn sends the module to its workers) and copyable
    restored = pickle.loads(pickle.dumps(schedule))
    assert isinstance(restored.module, ImageClassifier)
    copy.deepcopy(schedule)


def test_docstring_examples():
    import doctest

    import lightning_tda.dcor.penalty as module

    assert doctest.testmod(module).failed == 0
