"""The further-training gold standard: the batched copies equal separate, sequential further
trainings; the batch order; bad input; result save/load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_tda.data import TensorImageDataset
from lightning_tda.further_training import (
    BatchOrder,
    FurtherTrainingResult,
    SameOrderBatchSampler,
    epoch_steps,
    further_training_scores,
)
from lightning_tda.store import RunStore


def tiny_problem(n=30, n_test=7, d=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n + n_test,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes)).to(dtype)
    return model, TensorImageDataset(x[:n], y[:n]), TensorImageDataset(x[n:], y[n:])


def sequential_reference(model, train, test, instances, steps, seeds, *, lr, batch_size, weight_decay=0.0,
                         momentum=0.0, optimizer="sgd", mode="remove", eps=None):
    """Separate further trainings, one plain torch loop per (seed, run): per-seed test-loss
    differences ``[n_seeds, len(steps), n_test, m]``."""
    x, y = train.images, train.targets
    n = len(y)
    out = np.zeros((len(seeds), len(steps), len(test), len(instances)))

    def run(seed, instance):
        net = copy.deepcopy(model)
        if optimizer == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
        leave_out = instance if mode == "remove" else None
        sampler = SameOrderBatchSampler(n, batch_size, seed, steps[-1], leave_out=leave_out)
        losses = {}
        for t, batch in enumerate(sampler):
            index = torch.tensor(batch, dtype=torch.int64)
            net.train()
            per_example = nn.functional.cross_entropy(net(x[index]), y[index], reduction="none")
            if mode == "upweight" and instance is not None:
                weights = 1.0 + (index == instance).to(x.dtype) * n * eps
                loss = (weights * per_example).sum() / len(index)
            else:
                loss = per_example.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t + 1 in steps:
                net.eval()
                with torch.no_grad():
                    losses[t + 1] = nn.functional.cross_entropy(net(test.images), test.targets, reduction="none")
        return losses

    for s, seed in enumerate(seeds):
        full = run(seed, None)
        for j, i in enumerate(instances):
            loo = run(seed, i)
            for k, step in enumerate(steps):
                out[s, k, :, j] = (loo[step] - full[step]).numpy()
    return out


@pytest.mark.parametrize(
    "settings",
    [
        dict(optimizer="sgd", momentum=0.9, weight_decay=1e-2, mode="remove"),
        dict(optimizer="adam", weight_decay=1e-3, mode="remove"),
        dict(optimizer="sgd", mode="upweight", eps=0.02),
    ],
    ids=["sgd-momentum-remove", "adam-remove", "sgd-upweight"],
)
def test_batched_copies_equal_sequential_further_trainings(settings):
    model, train, test = tiny_problem()
    instances, steps, seeds = [0, 4, 17, 29], (1, 4, 9), (3, 11)
    lr = 0.05 if settings["optimizer"] == "sgd" else 0.01
    ours = further_training_scores(
        model, train, test, instances, steps, seeds, lr=lr, batch_size=8, keep_per_seed=True, progress=False,
        **settings,
    )
    ref = sequential_reference(model, train, test, instances, steps, seeds, lr=lr, batch_size=8, **settings)
    # float64 throughout: the stacked, vmapped copies agree with separate loops to rounding
    assert np.abs(ref).max() > 1e-4  # the runs do differ
    np.testing.assert_allclose(ours.per_seed, ref, rtol=0, atol=1e-10 + 1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(ours.scores, ref.mean(0), atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(ours.sem, ref.std(0, ddof=1) / np.sqrt(2), atol=1e-6 * np.abs(ref).max())


def test_float32_batched_copies_match_float64_reference_to_stated_tolerance():
    model, train, test = tiny_problem()
    instances, steps, seeds = [1, 2, 3], (2, 6), (0,)
    ref = sequential_reference(model, train, test, instances, steps, seeds, lr=0.05, batch_size=8)
    train32 = TensorImageDataset(train.images.float(), train.targets)
    test32 = TensorImageDataset(test.images.float(), test.targets)
    ours = further_training_scores(model.float(), train32, test32, instances, steps, seeds, lr=0.05,
                                   batch_size=8, keep_per_seed=True, progress=False)
    # float32: a loss difference of ~1e-3 between losses of ~1 keeps ~1e-6 absolute precision
    np.testing.assert_allclose(ours.per_seed, ref, atol=2e-6)


def test_chunked_copies_give_the_same_scores():
    model, train, test = tiny_problem()
    kwargs = dict(instances=[0, 1, 2, 3, 4], steps=(3, 5), seeds=2, lr=0.05, batch_size=8, progress=False)
    whole = further_training_scores(model, train, test, **kwargs)
    chunked = further_training_scores(model, train, test, chunk_size=2, **kwargs)
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=1e-12)


def test_leave_one_out_batches_are_the_full_runs_batches_without_the_instance():
    n, b, seed, num_steps = 23, 5, 7, 17  # 5 steps an epoch, the last one of 3 examples
    full = list(SameOrderBatchSampler(n, b, seed, num_steps))
    for i in (0, 11, 22):
        loo = list(SameOrderBatchSampler(n, b, seed, num_steps, leave_out=i))
        assert len(loo) == len(full) == num_steps
        for f, batch in zip(full, loo):
            assert i not in batch
            assert batch == [e for e in f if e != i]  # same examples, same order
        changed = sum(f != batch for f, batch in zip(full, loo))
        # once in each of the 3 whole epochs, and in the 2 steps of the 4th if i is there
        assert changed == sum(i in f for f in full) and 3 <= changed <= 4
    # every epoch is a permutation of the whole set, drawn from (seed, epoch) alone
    for epoch in range(3):
        batch = sorted(sum(full[5 * epoch : 5 * epoch + 5], []))
        assert batch == list(range(n))
    assert full[:5] != full[5:10]
    assert [b.tolist() for b in (BatchOrder(n, b, seed).batch(t) for t in range(5))] == full[:5]
    assert list(SameOrderBatchSampler(n, b, seed + 1, 5)) != full[:5]


def test_the_engine_trains_each_copy_on_the_samplers_batches():
    from lightning_tda.further_training.replicas import Replicas
    from lightning_tda.further_training.settings import FurtherTrainingSettings

    model, train, _ = tiny_problem()
    instances = torch.tensor([3, 8, 20])
    replicas = Replicas(model, instances, 30, FurtherTrainingSettings(batch_size=8))
    order = BatchOrder(30, 8, seed=5)
    for t in range(8):
        index = order.batch(t)
        coef = replicas.coefficients(index)
        assert torch.allclose(coef[0], torch.full((len(index),), 1 / len(index), dtype=coef.dtype))
        for j, i in enumerate(instances.tolist(), start=1):
            expected = SameOrderBatchSampler(30, 8, 5, t + 1, leave_out=i)
            batch = list(expected)[t]
            used = index[coef[j] > 0].tolist()
            assert used == batch and i not in used
            assert torch.allclose(coef[j][coef[j] > 0], torch.tensor(1 / len(batch), dtype=coef.dtype))


def test_epoch_steps_and_full_batch():
    assert epoch_steps([1, 2, 5], 23, 5) == (5, 10, 25)
    assert epoch_steps(3, 23, None) == (3,)
    order = BatchOrder(10, None, seed=0)
    assert sorted(order.batch(0).tolist()) == list(range(10))


# ----------------------------------------------------------------------------- bad input


def test_bad_steps_are_refused():
    model, train, test = tiny_problem()
    for steps, message in ((0, "steps must be >= 1"), ((2, 2, 5), "strictly increasing"), ((5, 3), "strictly increasing"),
                           ((), "empty")):
        with pytest.raises(ValueError, match=message):
            further_training_scores(model, train, test, [0], steps, 1, progress=False)


def test_instance_out_of_range_is_refused():
    model, train, test = tiny_problem()
    with pytest.raises(IndexError, match="instance index 30 is out of range for a training set of 30"):
        further_training_scores(model, train, test, [0, 30], 2, 1, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        further_training_scores(model, train, test, [-1], 2, 1, progress=False)


def test_test_set_without_labels_is_refused():
    model, train, test = tiny_problem()
    unlabeled = TensorDataset(test.images)  # items are (x,) only
    with pytest.raises(ValueError, match="the test set has no labels"):
        further_training_scores(model, train, unlabeled, [0], 2, 1, progress=False)


def test_final_model_that_does_not_match_the_module_is_refused(tmp_path):
    model, train, test = tiny_problem()
    other = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    store = RunStore.create(tmp_path / "run")
    store.save_checkpoint("final", other.state_dict(), {"global_step": 10})
    with pytest.raises(ValueError, match=r"do not match the module Sequential: .*shape mismatches \['0.bias"):
        further_training_scores(model, train, test, [0], 2, 1, store=store, progress=False)
    with pytest.raises(ValueError, match=r"missing \['2.bias', '2.weight'\]"):
        further_training_scores(model, train, test, [0], 2, 1, checkpoint={"0.weight": model[0].weight,
                                                                         "0.bias": model[0].bias}, progress=False)


def test_a_store_checkpoint_gives_the_final_weights(tmp_path):
    model, train, test = tiny_problem()
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3)
    store = RunStore.create(tmp_path / "run")
    # as a LightningModule wrapping the network under `model.` would save it
    store.save_checkpoint("epoch=0-step=5", {f"model.{k}": v for k, v in trained.state_dict().items()},
                          {"global_step": 5})
    kwargs = dict(instances=[1, 2], steps=3, seeds=1, lr=0.05, batch_size=8, progress=False)
    via_store = further_training_scores(model, train, test, store=str(tmp_path / "run"), **kwargs)
    direct = further_training_scores(trained, train, test, **kwargs)
    np.testing.assert_allclose(via_store.scores, direct.scores, atol=1e-12)


def test_eps_that_makes_a_weight_negative_is_refused():
    model, train, test = tiny_problem()
    with pytest.raises(ValueError, match=r"eps must be >= -1/n"):
        further_training_scores(model, train, test, [0], 2, 1, mode="upweight", eps=-0.05, progress=False)
    further_training_scores(model, train, test, [0], 2, 1, mode="upweight", eps=-1 / 30, progress=False)  # weight 0
    with pytest.raises(ValueError, match="needs a nonzero eps"):
        further_training_scores(model, train, test, [0], 2, 1, mode="upweight", progress=False)
    with pytest.raises(ValueError, match="takes no eps"):
        further_training_scores(model, train, test, [0], 2, 1, eps=0.1, progress=False)


def test_other_bad_settings_are_refused():
    model, train, test = tiny_problem()
    for kwargs, message in ((dict(lr=0), "lr must be"), (dict(optimizer="lbfgs"), "optimizer must be"),
                            (dict(batch_size=0), "batch_size"), (dict(seeds=0), "seeds must be >= 1")):
        with pytest.raises(ValueError, match=message):
            further_training_scores(model, train, test, [0], **{"steps": 2, "progress": False, **kwargs})
    with pytest.raises(ValueError, match="distinct"):
        further_training_scores(model, train, test, [1, 1], 2, 1, progress=False)


# ----------------------------------------------------------------------------- the result


def test_centering_seeds_and_save_load(tmp_path):
    model, train, test = tiny_problem()
    result = further_training_scores(model, train, test, [0, 5, 9], (2, 4), seeds=3, lr=0.05, batch_size=8,
                                     keep_per_seed=True, progress=False)
    centred = result.averaged(center=True)
    np.testing.assert_allclose(centred.scores.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(centred.scores, result.scores - result.scores.mean(-1, keepdims=True), atol=1e-9)
    one = result.averaged(seeds=1)
    np.testing.assert_allclose(one.scores, result.per_seed[0], atol=1e-9)
    assert np.isnan(one.sem).all() and one.seeds == (0,)
    frame = result.to_frame()
    assert len(frame) == 2 * 7 * 3 and set(frame.columns) == {"step", "test", "instance", "score", "sem"}
    fig, _ = result.plot()
    assert fig.axes
    loaded = FurtherTrainingResult.load(result.save(tmp_path / "result"))
    np.testing.assert_array_equal(loaded.scores, result.scores)
    np.testing.assert_array_equal(loaded.per_seed, result.per_seed)
    assert loaded.steps == (2, 4) and loaded.settings["lr"] == 0.05
    no_seeds = further_training_scores(model, train, test, [0], 2, 1, progress=False)
    with pytest.raises(ValueError, match="keep_per_seed=True"):
        no_seeds.averaged(seeds=1)
