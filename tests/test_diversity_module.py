"""EnsembleDiversity: running models equals the analysis of their logits; reading their
MarginRecorder stores equals running them; stores of different datasets and the other bad inputs
are refused with clear errors; 2-process DDP equals one process."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_tda.callbacks import MarginRecorder
from lightning_tda.data import DigitsDataModule
from lightning_tda.diversity import EnsembleDiversity, analyze_diversity
from lightning_tda.ensemble import EnsembleModule, indexed_loader
from lightning_tda.models import MLP, DigitsCNN, ImageClassifier
from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError, StoreNotFoundError

from conftest import trainer_kwargs


def _models(seed=0, classes=10):
    torch.manual_seed(seed)
    return [DigitsCNN(width=4).eval(), MLP(hidden=16, num_classes=classes).eval(), DigitsCNN(width=4).eval()]


def _logits(models, dataset):
    x = dataset.images
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


def test_evaluate_equals_the_analysis_of_the_logits(tmp_path):
    dm = DigitsDataModule()
    dm.setup()
    evaluation, held = dm.val_dataset, dm.train_dataset.without_transform()
    models = _models()
    names, desc = ["cnn0", "mlp", "cnn1"], [{"seed": 0, "architecture": "cnn"}, {"seed": 0, "architecture": "mlp"}, {"seed": 1, "architecture": "cnn"}]
    module = EnsembleDiversity(models, names=names, descriptions=desc)
    got = module.evaluate(evaluation, held_out=held, batch_size=100)
    want = analyze_diversity(_logits(models, evaluation), evaluation.targets, (_logits(models, held), held.targets),
                             names=names, descriptions=desc)
    for name in ("accuracy", "temperatures", "error_inconsistency", "ensemble_accuracy", "conversion_rate", "nll_after"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5, equal_nan=True, err_msg=name)
    assert got.pair_categories() == ["architecture", "seed", "architecture"]
    # a fraction of the evaluation examples as the held-out split
    frac = EnsembleDiversity(models, names=names).evaluate(evaluation, held_out=0.5)
    assert frac.n_held_out == round(0.5 * len(evaluation)) and frac.predictions.shape[1] == len(evaluation) - frac.n_held_out


def test_module_bad_inputs():
    dm = DigitsDataModule()
    dm.setup()
    models = _models()
    nine = _models(classes=9)[1]
    with pytest.raises(ValueError, match="different class counts.*model_1 has 9"):
        EnsembleDiversity([models[0], nine]).evaluate(dm.val_dataset, held_out=0.5)
    with pytest.raises(ValueError, match="temperature scaling needs a held-out split"):
        EnsembleDiversity(models).evaluate(dm.val_dataset)
    with pytest.raises(ValueError, match="at least 2 models"):
        EnsembleDiversity(models[:1])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EnsembleDiversity([models[0], "resnet"])
    with pytest.raises(ValueError, match="one unique name per model"):
        EnsembleDiversity(models, names=["a", "a", "b"])
    with pytest.raises(ValueError, match="factors \\['optimizer'\\] that category_order"):
        EnsembleDiversity(models[:2], descriptions=[{"optimizer": "sgd"}, {}]).evaluate(dm.val_dataset, held_out=0.5)


# ------------------------------------------------------------------------------ stores


def _record(tmp_path, name, seed, split_seed=0, ensemble=False):
    dm = DigitsDataModule(n_train=128, batch_size=32, split_seed=split_seed)
    dm.setup()
    store = tmp_path / name
    recorder = MarginRecorder(str(store), splits=("val",), every_n_epochs=None, on_fit_end=True, logits=True,
                              datasets={"val": dm.recording_dataset("val")})
    trainer = L.Trainer(max_epochs=1, callbacks=[recorder], **trainer_kwargs(tmp_path / f"fit_{name}"))
    L.seed_everything(seed, verbose=False)
    if ensemble:
        module = EnsembleModule(lambda: DigitsCNN(width=4), seeds=[seed, seed + 1], lr=0.05)
        trainer.fit(module, train_dataloaders=indexed_loader(dm.train_dataset, 32))
        models = module.members()
    else:
        module = ImageClassifier(DigitsCNN(width=4) if seed % 2 == 0 else MLP(hidden=16), lr=0.05)
        trainer.fit(module, dm)
        models = [module.eval()]
    return store, models, dm


def test_from_stores_equals_running_the_models(tmp_path):
    store_a, (model_a,), dm = _record(tmp_path, "a", seed=0)
    store_b, (model_b,), _ = _record(tmp_path, "b", seed=1)
    store_e, copies, _ = _record(tmp_path, "e", seed=5, ensemble=True)
    val = dm.recording_dataset("val")
    models = [model_a, model_b, *copies]
    result = EnsembleDiversity.from_stores([store_a, str(store_b), RunStore(store_e)], val, held_out=0.5)
    assert result.names == ("a", "b", "e/0", "e/1")
    assert result.descriptions[2]["seed"] == 0 and result.descriptions[3]["seed"] == 1
    want = EnsembleDiversity(models, names=list(result.names)).evaluate(val, held_out=0.5)
    for name in ("accuracy", "temperatures", "error_inconsistency", "ensemble_accuracy", "disagreement"):
        np.testing.assert_allclose(getattr(result, name), getattr(want, name), atol=1e-4, err_msg=name)


def test_from_stores_bad_inputs(tmp_path):
    store_a, _, dm = _record(tmp_path, "a", seed=0)
    store_other, _, dm_other = _record(tmp_path, "other", seed=0, split_seed=1)  # another val split
    val = dm.recording_dataset("val")
    with pytest.raises(FingerprintMismatchError, match=f"{store_a} and the RunStore at {store_other} were recorded on different datasets for the .val. split"):
        EnsembleDiversity.from_stores([store_a, store_other], val, held_out=0.5)
    with pytest.raises(FingerprintMismatchError, match="labels given .* are not those of split 'val'"):
        EnsembleDiversity.from_stores([store_a, store_a], dm_other.recording_dataset("val"), held_out=0.5)
    with pytest.raises(ValueError, match="labels are required"):
        EnsembleDiversity.from_stores([store_a, store_a], None, held_out=0.5)
    with pytest.raises(ValueError, match="temperature scaling needs a held-out split"):
        EnsembleDiversity.from_stores([store_a, store_a], val)
    with pytest.raises(StoreNotFoundError):
        EnsembleDiversity.from_stores([store_a, tmp_path / "typo"], val, held_out=0.5)
    assert not (tmp_path / "typo").exists()  # opening never creates
    plain = tmp_path / "plain"
    trainer = L.Trainer(max_epochs=1, callbacks=[MarginRecorder(str(plain), splits=("val",), every_n_epochs=None)],
                        **trainer_kwargs(tmp_path / "fit_plain"))
    trainer.fit(ImageClassifier(DigitsCNN(width=4)), DigitsDataModule(n_train=64, batch_size=32))
    with pytest.raises(StoreError, match="no recorded logits.*MarginRecorder\\(..., logits=True\\)"):
        EnsembleDiversity.from_stores([store_a, plain], val, held_out=0.5)


# ------------------------------------------------------------------------------ DDP


class SavingDiversity(EnsembleDiversity):
    """Saves its result from global rank 0 (the forked workers' results do not come back)."""

    def __init__(self, models, out: str, **kwargs):
        super().__init__(models, **kwargs)
        self.out = out

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.trainer.is_global_zero:
            self.result.save(self.out)


@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(tmp_path):
    from lightning_tda.diversity import DiversityResult

    dm = DigitsDataModule()
    dm.setup()
    models = _models()
    evaluation = Subset(dm.val_dataset, range(301))  # odd: the distributed sampler pads one example
    held = Subset(dm.train_dataset.without_transform(), range(200))
    single = EnsembleDiversity(models).evaluate(evaluation, held_out=held, batch_size=64)
    module = SavingDiversity(_models(), str(tmp_path / "ddp_result"))
    trainer = L.Trainer(strategy="ddp_fork", **trainer_kwargs(tmp_path, devices=2, deterministic=False))
    trainer.test(module, dataloaders=[DataLoader(evaluation, batch_size=32), DataLoader(held, batch_size=32)], verbose=False)
    ddp = DiversityResult.load(tmp_path / "ddp_result")
    np.testing.assert_array_equal(ddp.target, single.target)
    for name in ("accuracy", "temperatures", "error_inconsistency", "ensemble_accuracy", "error_consistency"):
        np.testing.assert_allclose(getattr(ddp, name), getattr(single, name), atol=1e-5, err_msg=name)

