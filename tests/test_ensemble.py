"""The ensemble engine equals separate trainings.

Reference ("separate training", see lightning_tda/ensemble/module.py): one model,
``torch.manual_seed(seed); model_fn()``, trained by a plain loop with a plain ``torch.optim``
optimizer on the same batch stream (``indexed_loader`` with the same seed), loss =
``sum(mask * weight * loss_i) / Z``. Parameters are compared with ``rtol=1e-5, atol=1e-6``
(float32; the stacked forward/backward sums in another order, e.g. grouped convolutions).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import stack_module_state

from lightning_tda.data import DigitsDataModule, synthetic_images
from lightning_tda.ensemble import (
    BatchRandomShift,
    EnsembleModule,
    IndexedDataModule,
    IndexedDataset,
    SeededShuffleSampler,
    augmentation_generator,
    indexed_loader,
    random_subset_masks,
)
from lightning_tda.outputs import loss as loss_output
from lightning_tda.outputs import margin

from conftest import TinyCNN, trainer_kwargs

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*no `val_dataloader`", "ignore:.*BatchNorm and masks", "ignore:.*LeafSpec"
)

TOL = dict(rtol=1e-5, atol=1e-6)
N, BATCH, M, CLASSES = 40, 10, 4, 5


def tiny() -> nn.Module:
    return TinyCNN()


def tiny_bn() -> nn.Module:
    return TinyCNN("batch")


@pytest.fixture(scope="module")
def dataset():
    return synthetic_images(N, CLASSES, (1, 8, 8), seed=3)


def trainer(tmp_path, epochs: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, **trainer_kwargs(tmp_path, deterministic=None, num_sanity_val_steps=0, **kwargs)
    )


def fit(ens: EnsembleModule, dataset, tmp_path, epochs: int = 2, loader_seed: int = 7) -> EnsembleModule:
    trainer(tmp_path, epochs).fit(ens, indexed_loader(dataset, BATCH, seed=loader_seed))
    return ens


def reference(
    model_fn, seed, dataset, mask=None, weights=None, optimizer="sgd", lr=0.1, momentum=0.0,
    weight_decay=0.0, nesterov=False, normalization="mask_count", epochs=2, loader_seed=7,
    augment=None, augmentation_seed=None, clip=None, scheduler=None,
):
    """One separate training by a plain loop."""
    torch.manual_seed(seed)
    model = model_fn()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                              weight_decay=weight_decay, nesterov=nesterov)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = scheduler(opt) if scheduler else None
    loader = indexed_loader(dataset, BATCH, seed=loader_seed)
    step = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y, idx in loader:
            if augment is not None:
                x = augment(x, augmentation_generator(augmentation_seed, step))
            per_example = nn.functional.cross_entropy(model(x), y, reduction="none")
            m = torch.ones(len(y)) if mask is None else mask[idx].float()
            w = m if weights is None else m * weights[idx]
            z = {"mask_count": m.sum().clamp(min=1), "batch_size": len(y),
                 "weight_sum": w.sum() if w.sum() != 0 else 1.0}[normalization]
            opt.zero_grad()
            ((w * per_example).sum() / z).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            step += 1
        if sched is not None:
            sched.step()
    return model


def assert_same_state(a: nn.Module, b: nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **(tol or TOL), msg=lambda s: f"{k}: {s}")


def masks_and_weights(n=N, seed=0):
    masks = random_subset_masks(M, n, 0.5, seed=seed)
    weights = torch.rand(M, n, generator=torch.Generator().manual_seed(seed)) * 2
    return masks, weights


# ---------------------------------------------------------------------------------- init


def test_init_equals_seeded_model_fn():
    seeds = [11, 3, 5, 8]
    before = torch.random.get_rng_state()
    ens = EnsembleModule(tiny, seeds=seeds)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG must be left alone"
    assert ens.num_models == 4
    copies = []
    for m, seed in enumerate(seeds):
        torch.manual_seed(seed)
        copies.append(tiny())
        assert_same_state(ens.member(m), copies[-1], rtol=0, atol=0)
    params, _ = stack_module_state(copies)
    for name, p in ens.stacked_model.stacked.named_parameters():
        assert torch.equal(p, params[name])


def test_template_and_sequence_construction():
    torch.manual_seed(0)
    template = tiny()
    same = EnsembleModule(template, num_models=3)  # init="copy": replicas of one model
    for m in range(3):
        assert_same_state(same.member(m), template, rtol=0, atol=0)
    reset = EnsembleModule(template, num_models=2, seeds=[4, 9], init="reset")
    torch.manual_seed(9)
    expected = copy.deepcopy(template)
    for sub in expected.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    assert_same_state(reset.member(1), expected, rtol=0, atol=0)
    models = [tiny(), tiny()]
    given = EnsembleModule(models)
    assert given.num_models == 2
    assert_same_state(given.member(1), models[1], rtol=0, atol=0)
    member = given.member(0)
    with torch.no_grad():
        member.fc.weight.add_(1.0)  # a member is a copy, not a view
    assert_same_state(given.member(0), models[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- equivalence

OPTIMIZERS = {
    "sgd-momentum": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": dict(optimizer="adam", lr=0.01, weight_decay=1e-3),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equals_separate_trainings(name, dataset, tmp_path):
    """M = 4 copies with their own seeds, masks and example weights == 4 sequential trainings."""
    hp = OPTIMIZERS[name]
    masks, weights = masks_and_weights()
    seeds = [0, 1, 2, 3]
    ens = EnsembleModule(tiny, seeds=seeds, masks=masks, example_weights=weights, **hp)
    fit(ens, dataset, tmp_path)
    for m in range(M):
        ref = reference(tiny, seeds[m], dataset, masks[m], weights[m], **hp)
        # float32 over 2 epochs at lr 0.1 with momentum: rounding of the batched and the plain
        # step (summation order) grows to ~1e-6 on a few weights; a wrong step is off by >1e-2
        assert_same_state(ens.member(m), ref, rtol=1e-4, atol=5e-6)
    assert not torch.allclose(ens.member(0).fc.weight, ens.member(1).fc.weight)


@pytest.mark.parametrize("normalization", ["batch_size", "weight_sum"])
def test_normalizations(normalization, dataset, tmp_path):
    masks, weights = masks_and_weights(seed=1)
    hp = dict(optimizer="sgd", lr=0.2, momentum=0.5, weight_decay=0.0)
    ens = EnsembleModule(tiny, num_models=M, masks=masks, example_weights=weights,
                         normalization=normalization, **hp)
    fit(ens, dataset, tmp_path)
    for m in (0, 3):
        ref = reference(tiny, m, dataset, masks[m], weights[m], normalization=normalization, **hp)
        assert_same_state(ens.member(m), ref)


def test_chunk_size_does_not_change_results(dataset, tmp_path):
    masks, weights = masks_and_weights(seed=2)
    states = []
    for chunk_size in (None, 1, 3):
        ens = EnsembleModule(tiny_bn, num_models=M, masks=masks, example_weights=weights,
                             optimizer="adam", lr=0.01, chunk_size=chunk_size)
        states.append(fit(ens, dataset, tmp_path, epochs=1))
        if chunk_size is not None:
            assert_same_state(states[-1], states[0])
            torch.testing.assert_close(states[-1].outputs(dataset), states[0].outputs(dataset), **TOL)


def test_batch_norm_running_stats_per_copy(dataset, tmp_path):
    """BatchNorm copies (running statistics included) == separate trainings on the same batches."""
    hp = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    ens = fit(EnsembleModule(tiny_bn, num_models=2, **hp), dataset, tmp_path)
    for m in range(2):
        ref = reference(tiny_bn, m, dataset, **hp)
        assert_same_state(ens.member(m), ref)  # includes running_mean/var, num_batches_tracked
        assert int(ens.member(m).norm.num_batches_tracked) == 2 * N // BATCH
    outputs = ens.outputs(dataset, "loss")  # eval mode: running statistics
    ref_eval = ens.member(1).eval()
    torch.testing.assert_close(outputs[1], loss_output(ref_eval, dataset.images, dataset.targets), **TOL)
    assert ens.training


def test_batch_norm_with_masks_warns():
    with pytest.warns(UserWarning, match="BatchNorm"):
        EnsembleModule(tiny_bn, masks=random_subset_masks(2, N, 0.5))


def test_per_copy_learning_rates_and_scheduler(dataset, tmp_path):
    lrs = [0.05, 0.2, 0.0, 0.1]
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    hp = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3)
    ens = fit(EnsembleModule(tiny, lr=lrs, lr_scheduler=sched, **hp), dataset, tmp_path)
    for m in range(M):
        ref = reference(tiny, m, dataset, lr=lrs[m], scheduler=sched, **hp)
        assert_same_state(ens.member(m), ref)
    torch.manual_seed(2)
    assert_same_state(ens.member(2), tiny(), rtol=0, atol=0)  # lr 0: never moves


def test_per_copy_augmentation_and_clipping(dataset, tmp_path):
    shift = BatchRandomShift(1)
    hp = dict(optimizer="adam", lr=0.05, weight_decay=0.0)
    ens = EnsembleModule(tiny, seeds=[0, 1, 2, 3], augment=shift, augmentation_seeds=[5, 6, 7, 8],
                         gradient_clip_norm=0.05, **hp)
    fit(ens, dataset, tmp_path)
    for m in range(M):
        ref = reference(tiny, m, dataset, augment=shift, augmentation_seed=5 + m, clip=0.05, **hp)
        assert_same_state(ens.member(m), ref)


@pytest.mark.parametrize("augment", [None, BatchRandomShift(1)])
def test_compacted_batches_equal_full_batches(augment, dataset, tmp_path):
    """Skipping each copy's out-of-subset examples changes nothing but summation order."""
    masks, weights = masks_and_weights(seed=5)
    hp = dict(masks=masks, example_weights=weights, optimizer="sgd", lr=0.1, momentum=0.9,
              weight_decay=0.0, augment=augment)
    compact = EnsembleModule(tiny, num_models=M, chunk_size=3, **hp)
    full = EnsembleModule(tiny, num_models=M, compact_batches=False, **hp)
    _, _, index = next(iter(indexed_loader(dataset, BATCH, seed=7)))
    select = compact.compaction(compact.example_coefficients(index, BATCH))
    assert select is not None and select.shape[1] < BATCH  # compaction does run here
    assert full.compaction(full.example_coefficients(index, BATCH)) is None
    fit(compact, dataset, tmp_path)
    fit(full, dataset, tmp_path)
    assert_same_state(compact, full)
    if augment is not None:
        ref = reference(tiny, 2, dataset, masks[2], weights[2], optimizer="sgd", lr=0.1,
                        momentum=0.9, augment=augment, augmentation_seed=2)
        assert_same_state(compact.member(2), ref)


def test_batch_random_shift_matches_padding_shift():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = BatchRandomShift(1)(x, torch.Generator().manual_seed(0))
    dy, dx = torch.randint(-1, 2, (2, 2), generator=torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    for b in range(2):
        expected = padded[b, :, 1 + dy[b] : 5 + dy[b], 1 + dx[b] : 5 + dx[b]]
        assert torch.equal(out[b], expected)


# ---------------------------------------------------------------------------------- checkpoint


def test_checkpoint_resume_equals_uninterrupted(dataset, tmp_path):
    masks, weights = masks_and_weights(seed=4)

    def make():
        return EnsembleModule(
            tiny_bn, num_models=M, masks=masks, example_weights=weights, optimizer="adam",
            lr=[0.01, 0.02, 0.03, 0.04], augment=BatchRandomShift(1),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
        )

    whole = fit(make(), dataset, tmp_path / "whole", epochs=2)
    first = make()
    t1 = trainer(tmp_path / "a", epochs=1)
    t1.fit(first, indexed_loader(dataset, BATCH, seed=7))
    ckpt = tmp_path / "one_epoch.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = make()
    trainer(tmp_path / "b", epochs=2).fit(resumed, indexed_loader(dataset, BATCH, seed=7), ckpt_path=ckpt)
    assert_same_state(resumed, whole, rtol=0, atol=0)
    assert not torch.equal(resumed.member(0).fc.weight, first.member(0).fc.weight)

    loaded = EnsembleModule.load_from_checkpoint(ckpt, model=tiny_bn)  # masks, weights, lr from it
    assert_same_state(loaded, first, rtol=0, atol=0)
    assert loaded.hparams.lr == [0.01, 0.02, 0.03, 0.04]
    other_masks = ~masks
    with pytest.raises(ValueError, match="checkpoint's masks differ"):
        EnsembleModule.load_from_checkpoint(ckpt, model=tiny_bn, masks=other_masks)


# ---------------------------------------------------------------------------------- outputs


def test_forward_outputs_and_members(dataset):
    ens = EnsembleModule(tiny_bn, num_models=3, chunk_size=2)
    x, y = dataset.images, dataset.targets
    ens.eval()
    logits = ens(x[:7])
    assert logits.shape == (3, 7, CLASSES)
    for m, member in enumerate(ens.members()):
        member.eval()
        torch.testing.assert_close(logits[m], member(x[:7]), **TOL)
    ens.train()
    margins = ens.outputs(dataset, "margin", batch_size=16)
    assert margins.shape == (3, N) and margins.dtype == torch.float32
    assert ens.training
    for m in range(3):
        torch.testing.assert_close(margins[m], margin(ens.member(m).eval(), x, y), **TOL)

    def top_logit(module, xb, yb):
        return module(xb).max(dim=1).values

    custom = ens.outputs(dataset, top_logit)
    torch.testing.assert_close(custom[2], ens.member(2).eval()(x).max(dim=1).values, **TOL)


def test_indexed_datamodule_fit(tmp_path):
    dm = IndexedDataModule(DigitsDataModule(batch_size=32, n_train=96), seed=1)
    dm.setup("fit")
    masks = random_subset_masks(3, 96, 0.5)
    ens = EnsembleModule(lambda: TinyCNN(classes=10), masks=masks, lr=0.1)
    t = trainer(tmp_path, epochs=1, limit_val_batches=2)
    t.fit(ens, datamodule=dm)
    assert {"train/loss", "val/loss", "val/acc", "val/ensemble_acc"} <= set(t.logged_metrics)
    recording = dm.recording_dataset("train")  # passes through to the wrapped datamodule
    assert ens.outputs(recording).shape == (3, 96)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 8, bias=False)
        self.dec = nn.Linear(64, 8, bias=False)
        self.dec.weight = self.enc.weight  # tied, used transposed in forward
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        h = torch.relu(self.enc(x.flatten(1)))
        return self.head(h @ self.dec.weight)


def test_tied_weights_stay_tied(dataset, tmp_path):
    hp = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    ens = fit(EnsembleModule(Tied, num_models=2, **hp), dataset, tmp_path, epochs=1)
    for m in range(2):
        member = ens.member(m)
        assert member.dec.weight is member.enc.weight
        assert_same_state(member, reference(Tied, m, dataset, epochs=1, **hp))


def test_indexed_dataset_sampler_and_masks():
    pairs = IndexedDataset(synthetic_images(6, 2, (1, 2, 2)))
    x, y, i = pairs[4]
    assert i == 4 and torch.equal(pairs.targets, pairs.dataset.targets)
    assert IndexedDataset([{"x": 1, "y": 2}])[0] == {"x": 1, "y": 2, "index": 0}
    sampler = SeededShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    masks = random_subset_masks(5, 30, 0.4, seed=2)
    assert masks.sum(1).tolist() == [12] * 5
    assert torch.equal(random_subset_masks(3, 30, 0.4, seed=2), masks[:3])  # row m from (seed, m)
