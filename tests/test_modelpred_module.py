"""ModelPred's set network, LightningModule and one-call fit: padding, batching, save/load and
the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tda.modelpred import ModelPred, ModelPredModule, SetNetwork, make_target
from lightning_tda.modelpred.pairs import permutation_prefix_masks, random_size_masks, sample_masks

TINY = {"num_permutations": 4, "prefixes_per_permutation": 8, "num_random_subsets": 32, "num_validation_subsets": 16,
        "max_epochs": 3, "hidden": 16, "set_features": 16, "batch_size": 16}


def blobs(n=40, d=4, k=3, seed=0):
    centers = np.random.default_rng(100 + d * 10 + k).normal(size=(k, d))  # one distribution for train and test
    y = np.arange(n) % k
    return centers[y] + np.random.default_rng(seed).normal(size=(n, d)), y


@pytest.fixture(scope="module")
def fitted():
    x, y = blobs()
    return ModelPred.fit(x, y, target="logistic", seed=0, progress=False, **TINY), x, y


@pytest.mark.parametrize("pooling", ["sum", "sum+mean"])
def test_zero_padded_rows_add_nothing_and_masks_equal_padded_sets(pooling):
    torch.manual_seed(0)
    net = SetNetwork(7, 5, hidden=8, set_features=6, pool_size=10, pooling=pooling)
    assert net.embed(torch.zeros(3, 7)).abs().max() == 0  # bias-free phi: zero in, zero out
    elements = torch.randn(10, 7)
    masks = torch.zeros(2, 10)
    masks[0, [1, 4, 5]] = 1
    masks[1, [0, 9]] = 1
    padded = torch.zeros(2, 4, 7)  # sets padded with zero rows to length 4
    padded[0, :3] = elements[[1, 4, 5]]
    padded[1, :2] = elements[[0, 9]]
    torch.testing.assert_close(net(masks, elements), net.forward_sets(padded))
    # permutation invariance
    torch.testing.assert_close(net.forward_sets(padded[:, [2, 0, 1, 3]]), net.forward_sets(padded))


def test_samplers_make_prefixes_and_random_sizes():
    rng = np.random.default_rng(0)
    prefixes = permutation_prefix_masks(12, 3, 4, rng)
    assert prefixes.shape == (12, 12)
    for p in range(3):  # the prefixes of one permutation are nested
        block = prefixes[4 * p : 4 * p + 4]
        order = block.sum(1).argsort()
        assert all((block[order[i]] <= block[order[i + 1]]).all() for i in range(3))
    sizes = random_size_masks(12, 50, rng, min_size=2).sum(1)
    assert sizes.min() >= 2 and sizes.max() <= 12
    assert sample_masks(12, 2, 3, 5, seed=1).shape == (11, 12)
    np.testing.assert_array_equal(sample_masks(12, 2, 3, 5, seed=1), sample_masks(12, 2, 3, 5, seed=1))


def test_fit_predicts_every_subset_in_one_batched_call(fitted):
    mp, x, y = fitted
    assert isinstance(mp.module, ModelPredModule) and len(mp.history) >= 1
    masks = sample_masks(40, 2, 5, 5, seed=3)
    batched = mp.predict_params(masks)
    assert batched.shape == (len(masks), mp.target.num_params)
    one_by_one = torch.cat([mp.predict_params(m[None]) for m in masks])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mp.predict_params(masks, chunk_size=3), batched, rtol=1e-5, atol=1e-6)
    assert mp.logits(batched, x).shape == (len(masks), 40, 3)
    assert mp.solve(masks).shape == batched.shape
    assert {"val/mse", "val/r_global", "val/r_local", "val/relative_error"} <= set(mp.history[-1])


def test_training_lowers_the_validation_error():
    x, y = blobs(seed=1)
    settings = {"num_permutations": 0, "num_random_subsets": 256, "num_validation_subsets": 32, "hidden": 32,
                "set_features": 32, "max_epochs": 30, "patience": 30}
    mp = ModelPred.fit(x, y, seed=0, progress=False, **settings)
    first, best = mp.history[0]["val/mse"], min(h["val/mse"] for h in mp.history)
    assert best < 0.75 * first and best < 0.5  # standardised MSE: predicting the mean scores about 1


def test_save_and_load_round_trip_and_refuse_mismatches(fitted, tmp_path):
    mp, x, y = fitted
    mp.save(tmp_path / "mp")
    loaded = ModelPred.load(tmp_path / "mp", target="logistic", x=x, y=y)
    masks = sample_masks(40, 1, 4, 4, seed=5)
    torch.testing.assert_close(loaded.predict_params(masks), mp.predict_params(masks))
    assert loaded.settings == mp.settings
    with pytest.raises(ValueError, match="holds a ModelPred for target 'logistic', not 'svm'"):
        ModelPred.load(tmp_path / "mp", target="svm")
    with pytest.raises(ValueError, match="have 5 columns but .* was fitted on 4"):
        ModelPred.load(tmp_path / "mp", x=np.zeros((40, 5)), y=y)
    with pytest.raises(ValueError, match="is not the one .* was fitted on"):
        ModelPred.load(tmp_path / "mp", x=x + 1.0, y=y)
    with pytest.raises(FileNotFoundError, match="no saved ModelPred"):
        ModelPred.load(tmp_path / "nothing")


def test_bad_input_errors(fitted):
    mp, x, y = fitted
    with pytest.raises(ValueError, match="are empty"):
        mp.predict_params(np.zeros((2, 40), dtype=bool))
    with pytest.raises(ValueError, match=r"masks must be \[subsets, 40\]"):
        mp.predict_params(np.ones((1, 39), dtype=bool))
    with pytest.raises(ValueError, match="has 5 features but the logistic target was built on 4"):
        mp.logits(torch.zeros(mp.target.num_params), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="outside the target's classes 0..2"):
        ModelPred.fit(x, np.r_[y[:-1], 3], num_classes=3, progress=False, **TINY)
    with pytest.raises(TypeError, match="unknown ModelPred settings"):
        ModelPred.fit(x, y, epochs=3, progress=False)
    with pytest.raises(ValueError, match="target must be one of"):
        ModelPred.fit(x, y, target="forest", progress=False)
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        ModelPred.fit(x, y, max_epochs=0, progress=False)


def test_svm_target_fits_too():
    x, y = blobs(30, 3, 2)
    mp = ModelPred.fit(x, y, target="svm", progress=False, **{**TINY, "max_epochs": 1})
    assert mp.predict_params(np.ones((1, 30), dtype=bool)).shape == (1, make_target("svm", x, y).num_params)


def test_features_from_a_recorded_store(tmp_path):
    import lightning as L

    from lightning_tda.callbacks import MarginRecorder
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.modelpred import embeddings_from_store
    from lightning_tda.models import DigitsCNN, ImageClassifier

    dm = DigitsDataModule(n_train=64)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[MarginRecorder(tmp_path / "with", splits=("train",), every_n_epochs=None, embeddings="model.fc1"),
                                                               MarginRecorder(tmp_path / "without", splits=("train",), every_n_epochs=None)])
    trainer.fit(ImageClassifier(DigitsCNN()), dm)
    features = embeddings_from_store(tmp_path / "with", "train")
    assert features.shape == (64, 64) and np.isfinite(features).all()
    mp = ModelPred.fit(features, dm.recording_dataset("train").targets.numpy(), num_classes=10, progress=False, **{**TINY, "max_epochs": 1})
    assert mp.target.num_features == 64
    with pytest.raises(ValueError, match="no complete embeddings record"):
        embeddings_from_store(tmp_path / "without", "train")


def test_elu_is_torchs_elu_in_value_and_gradient():
    from lightning_tda.modelpred.network import ELU

    x = torch.linspace(-30, 30, 2001, dtype=torch.float64).requires_grad_()
    ours, ref = ELU()(x), torch.nn.functional.elu(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_cached_pool_embedding_follows_the_weights(fitted):
    mp, x, y = fitted
    masks = random_size_masks(len(y), 6, np.random.default_rng(3), min_size=1)
    module = mp.module
    direct = lambda: module.network(torch.as_tensor(masks, dtype=torch.float32), module.elements) * module.theta_std + module.theta_mean  # noqa: E731
    torch.testing.assert_close(mp.predict_params(masks), direct().detach())
    assert mp.embedded_pool() is mp.embedded_pool()  # computed once
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            module.network.phi[0].weight.mul_(1.5)  # an in-place change, as an optimiser step makes
        torch.testing.assert_close(mp.predict_params(masks), direct().detach())
        module.load_state_dict(before)
        torch.testing.assert_close(mp.predict_params(masks), direct().detach())
    finally:
        module.load_state_dict(before)
    # bool masks take the fast check and still refuse an empty subset with the target's message
    masks[2] = False
    with pytest.raises(ValueError, match=r"subsets \[2\] are empty"):
        mp.predict_params(masks)
    with pytest.raises(ValueError, match=r"subsets \[2\] are empty"):
        mp.predict_params(torch.as_tensor(masks))


def test_sum_and_mean_pooling_gives_rho_the_sum_the_mean_and_the_log_size():
    torch.manual_seed(0)
    net = SetNetwork(3, 2, hidden=4, set_features=5, pool_size=8, pooling="sum+mean")
    embedded = torch.randn(8, 5)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 0, 0, 0]])
    pooled = net.pool(mask, embedded)[0]
    total = embedded[[0, 2, 3]].sum(0)
    torch.testing.assert_close(pooled, torch.cat([total / 8**0.5, total / 3, torch.tensor([np.log(3) / np.log(8)], dtype=torch.float32)]))
    assert net.rho[0].in_features == 11
    with pytest.raises(ValueError, match="pooling must be one of"):
        SetNetwork(3, 2, pooling="max")


def test_pooling_is_a_setting_that_survives_save_and_load(tmp_path):
    x, y = blobs()
    mp = ModelPred.fit(x, y, target="logistic", seed=0, progress=False, **{**TINY, "max_epochs": 1, "pooling": "sum+mean"})
    assert mp.module.network.pooling == "sum+mean"
    loaded = ModelPred.load(mp.save(tmp_path / "mp"))
    masks = random_size_masks(len(y), 5, np.random.default_rng(0), min_size=1)
    torch.testing.assert_close(loaded.predict_params(masks), mp.predict_params(masks))
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelPred.fit(x, y, progress=False, pooling="max")


def test_a_predictor_saved_before_pooling_was_a_setting_loads_as_sum(tmp_path):
    import json

    x, y = blobs()
    mp = ModelPred.fit(x, y, target="logistic", seed=0, progress=False, **{**TINY, "max_epochs": 1, "pooling": "sum"})
    path = mp.save(tmp_path / "old")
    meta = json.loads((path / "modelpred.json").read_text())
    del meta["settings"]["pooling"]  # as written before the setting existed
    (path / "modelpred.json").write_text(json.dumps(meta))
    loaded = ModelPred.load(path)
    assert loaded.module.network.pooling == "sum"
    masks = random_size_masks(len(y), 4, np.random.default_rng(1), min_size=1)
    torch.testing.assert_close(loaded.predict_params(masks), mp.predict_params(masks))
