"""GradientRecorder: recorded features equal the engine on the recorded weights; bad input errors."""

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_tda.attribution import TRAK, GradDot, TracIn
from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.grads import make_gradient_engine
from lightning_tda.models import DigitsCNN, ImageClassifier
from lightning_tda.outputs import out_to_loss_from_logits
from lightning_tda.store import RunStore, StoreError

from conftest import trainer_kwargs


def fit(tmp_path, callbacks, model=None, epochs=2):
    L.seed_everything(0, verbose=False)
    model = model or ImageClassifier(DigitsCNN(width=8), lr=0.05)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(model, DigitsDataModule(batch_size=32, n_train=160))
    return model


@pytest.mark.parametrize("engine", ["factored", "exact"])
def test_recorded_features_equal_engine_on_checkpoint(tmp_path, engine):
    path = tmp_path / "s"
    fit(tmp_path, [GradientRecorder(path, proj_dim=96, engine=engine, every_n_epochs=1, block_rows=64), CheckpointRecorder(path)])
    store = RunStore(path)
    records = store.manifest["records"]["grads"]
    assert [r["tag"] for r in records] == ["epoch=0", "epoch=1"] and records[0]["learning_rates"] == [[0.05]]
    assert store.manifest["projection"]["proj_dim"] == 96
    dm = DigitsDataModule(n_train=160)
    for record, tag in zip(records, store.checkpoint_tags()):
        module = ImageClassifier(DigitsCNN(width=8))
        module.load_state_dict(store.load_checkpoint(tag)[0])
        ref = make_gradient_engine(engine, module, proj_dim=96, seed=0, output_fn="margin")
        for split in ("train", "val"):
            ds = dm.recording_dataset(split)
            expected = ref.project(ds.images, ds.targets)
            got = store.read(f"grads/{split}/{record['tag']}")
            np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                q = out_to_loss_from_logits(module.eval()(ds.images), ds.targets)
            np.testing.assert_allclose(store.read(f"out_to_loss/{split}/{record['tag']}"), q.numpy(), rtol=1e-5, atol=1e-6)
    # the scorers run on what was recorded
    scores = TRAK().score(store)
    assert scores.shape == (359, 160) and np.isfinite(scores).all()
    assert GradDot(checkpoints=1).score(store).shape == (359, 160)


def test_final_model_only_by_default(tmp_path):
    path = tmp_path / "s"
    fit(tmp_path, [GradientRecorder(path, proj_dim=32, splits=("val",))])
    assert [r["tag"] for r in RunStore(path).manifest["records"]["grads"]] == ["fit_end"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_dim must be a positive integer"):
        GradientRecorder("s", proj_dim=0)
    with pytest.raises(ValueError, match="engine must be"):
        GradientRecorder("s", engine="fast")
    with pytest.raises(ValueError, match="nothing would be recorded"):
        GradientRecorder("s", on_fit_end=False)


class NoLayers(L.LightningModule):
    """A classifier with no Linear/Conv layer: the factored engine has nothing to factor."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(64, 10))

    def forward(self, x):
        return x.flatten(1) @ self.table

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_supported_layers(tmp_path):
    with pytest.raises((ValueError, TypeError), match="(?i)linear|conv"):
        fit(tmp_path, [GradientRecorder(tmp_path / "s", proj_dim=8, engine="factored")], model=NoLayers(), epochs=1)


def test_nan_gradients_name_the_examples(tmp_path):
    x = torch.rand(50, 1, 8, 8)
    x[[7, 12]] = float("nan")  # one batch of 16: both reported
    ds = TensorDataset(x, torch.randint(0, 10, (50,)))
    rec = GradientRecorder(tmp_path / "s", proj_dim=16, splits=("odd",), datasets={"odd": ds}, batch_size=16, block_rows=25)
    with pytest.raises(FloatingPointError, match=r"dataset rows \[7, 12\]"):
        fit(tmp_path, [rec], epochs=1)


def test_store_with_another_projection_is_refused(tmp_path):
    path = tmp_path / "s"
    fit(tmp_path / "a", [GradientRecorder(path, proj_dim=32, splits=("val",))], epochs=1)
    with pytest.raises(StoreError, match="another projection"):
        fit(tmp_path / "b", [GradientRecorder(path, proj_dim=64, splits=("val",))], epochs=1)


def test_trak_with_identity_projection_equals_closed_form(tmp_path):
    """No projection at all (a 610-parameter MLP): recorded features are the full per-example
    margin gradients, and TRAK from the store equals the formula computed directly here."""
    from lightning_tda.models import MLP
    from lightning_tda.outputs import margin_from_logits

    path = tmp_path / "s"
    model = ImageClassifier(MLP(64, 8, 10), lr=0.1)
    rec = GradientRecorder(path, proj_dim=1, engine="exact", engine_options={"projection": "identity"}, dtype="float32")
    fit(tmp_path, [rec], model=model, epochs=2)
    store = RunStore(path)
    assert store.manifest["projection"]["projector"] == "identity"
    model.eval()
    params = [p for p in model.parameters()]
    dm = DigitsDataModule(n_train=160)

    def features(split):
        ds = dm.recording_dataset(split)
        rows = []
        for i in range(len(ds)):
            out = margin_from_logits(model(ds.images[i:i + 1]), ds.targets[i:i + 1])[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
        with torch.no_grad():
            q = out_to_loss_from_logits(model(ds.images), ds.targets)
        return torch.stack(rows).double(), q.double()

    phi, q = features("train")
    phi_test, _ = features("val")
    np.testing.assert_allclose(store.read("grads/train/fit_end"), phi.numpy(), rtol=1e-4, atol=1e-6)
    lam = float((phi * phi).sum()) / phi.shape[0]
    expected = phi_test @ torch.linalg.inv(phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=phi.dtype)) @ phi.T * q[None, :]
    np.testing.assert_allclose(TRAK().score(store), expected.numpy(), rtol=1e-3, atol=1e-6)


class TwoRateClassifier(ImageClassifier):
    """Plain SGD with the first layer at one learning rate and the rest at another."""

    def configure_optimizers(self):
        first = list(self.model.net[1].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD([{"params": first, "lr": 0.2}, {"params": rest, "lr": 0.05}], lr=0.05)


def test_tracin_equals_brute_force_per_example_loss_gradients(tmp_path):
    """TracIn from the store (identity projection, two checkpoints, two parameter groups at their
    own rates) equals sum_c sum_params -lr_p <grad margin_j, grad loss_i>, from per-example
    gradients of the loss and of the margin computed by a plain autograd loop on each saved
    checkpoint: the loss weight q and every group's rate are in."""
    from lightning_tda.models import MLP
    from lightning_tda.outputs import loss_from_logits, margin_from_logits

    path = tmp_path / "s"
    model = TwoRateClassifier(MLP(64, 8, 10))
    rec = GradientRecorder(path, proj_dim=1, engine="exact", engine_options={"projection": "identity"}, every_n_epochs=1)
    fit(tmp_path, [rec, CheckpointRecorder(path, every_n_epochs=1)], model=model, epochs=2)
    store = RunStore(path)
    records = store.manifest["records"]["grads"]
    assert len(records) == 2 and records[0]["learning_rate_columns"] == [[0, 520, 0.2], [520, 610, 0.05]]
    dm = DigitsDataModule(n_train=160)
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    n_test = 20
    expected = torch.zeros(n_test, len(train), dtype=torch.float64)
    steps = {meta["global_step"]: tag for tag, meta in store.checkpoints().items()}
    for record in records:
        module = TwoRateClassifier(MLP(64, 8, 10)).double()
        state, _ = store.load_checkpoint(steps[record["global_step"]])
        module.load_state_dict({k: v.double() for k, v in state.items()})
        module.eval()
        params = list(module.parameters())
        rates = torch.cat([torch.full((p.numel(),), 0.2 if i < 2 else 0.05, dtype=torch.float64) for i, p in enumerate(params)])

        def gradients(fn, ds, count):
            rows = []
            for i in range(count):
                out = fn(module(ds.images[i:i + 1].double()), ds.targets[i:i + 1])[0]
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
            return torch.stack(rows)

        loss_grads = gradients(loss_from_logits, train, len(train))
        margin_grads = gradients(margin_from_logits, val, n_test)
        expected += -(margin_grads * rates) @ loss_grads.T
    got = TracIn(progress=False).score(store)[:n_test]
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=1e-5 * float(expected.abs().max()))


def test_recorded_output_is_named_and_its_out_to_loss_term_stored(tmp_path):
    """The margin passed as a function is the margin (q = 1 - p_y, not 1); a loss record stores
    q = -1 and TRAK refuses it; a custom output stores NaN and TracIn refuses it."""
    from lightning_tda import outputs

    def half_margin(module, x, y):
        return 0.5 * outputs.margin(module, x, y)

    cases = [(outputs.margin, "margin"), ("loss", "loss"), (half_margin, "custom")]
    for i, (output_fn, name) in enumerate(cases):
        path = tmp_path / f"s{i}"
        model = fit(tmp_path / f"f{i}", [GradientRecorder(path, proj_dim=32, splits=("val",), output_fn=output_fn)], epochs=1)
        store = RunStore(path)
        assert store.manifest["records"]["grads"][0]["output"] == name
        q = store.read("out_to_loss/val/fit_end")
        ds = DigitsDataModule(n_train=160).recording_dataset("val")
        if name == "margin":
            with torch.no_grad():
                expected = out_to_loss_from_logits(model.eval()(ds.images), ds.targets)
            np.testing.assert_allclose(q, expected.numpy(), rtol=1e-5, atol=1e-6)
        elif name == "loss":
            assert (q == -1).all()
            with pytest.raises(ValueError, match="TRAK needs gradients of 'margin'"):
                TRAK(progress=False).score(store, train_split="val")
        else:
            assert np.isnan(q).all()
            with pytest.raises(ValueError, match="TracIn needs gradients"):
                TracIn(progress=False).score(store, train_split="val")
