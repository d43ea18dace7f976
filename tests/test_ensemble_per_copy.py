"""Per-copy batch streams (``per_copy_loader``) equal separate trainings on each copy's subset.

Reference: copy ``m`` is one model, ``torch.manual_seed(seed_m); model_fn()``, trained by a plain
loop on ``indexed_loader(Subset(dataset, subset_m), b, seed=per_copy_seed(seed, m))`` (its own
seeded shuffle of its own subset). Parameters compared with ``rtol=1e-5, atol=1e-6`` (float32;
the stacked forward/backward sums in another order, e.g. grouped convolutions).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from lightning_tda.data import synthetic_images
from lightning_tda.ensemble import (
    BatchRandomShift,
    EnsembleModule,
    PerCopyBatchSampler,
    augmentation_generator,
    indexed_loader,
    per_copy_loader,
    per_copy_seed,
    random_subset_masks,
)

from conftest import TinyCNN, trainer_kwargs

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*no `val_dataloader`", "ignore:.*LeafSpec", "ignore:.*BatchNorm and masks"
)

TOL = dict(rtol=1e-5, atol=1e-6)
N, B, M, CLASSES, SEED = 40, 6, 4, 5, 11


@pytest.fixture(scope="module")
def dataset():
    return synthetic_images(N, CLASSES, (1, 8, 8), seed=3)


@pytest.fixture(scope="module")
def masks():
    return random_subset_masks(M, N, 0.5, seed=0)  # 20 examples each: 4 steps of 6, the last of 2


def fit(ens: EnsembleModule, loader, tmp_path, epochs: int = 2) -> EnsembleModule:
    L.Trainer(max_epochs=epochs, **trainer_kwargs(tmp_path, deterministic=None)).fit(ens, loader)
    return ens


def reference(model_fn, seed, dataset, subset, stream_seed, weights=None, momentum=0.9,
              weight_decay=5e-4, epochs=2, augment=None, augmentation_seed=None):
    """Copy ``m`` trained alone on its own subset's loader by a plain loop."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    loader = indexed_loader(Subset(dataset, subset.tolist()), B, seed=stream_seed)
    step = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y, local in loader:
            if augment is not None:
                x = augment(x, augmentation_generator(augmentation_seed, step))
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            w = torch.ones(len(y)) if weights is None else weights[subset[local]]
            opt.zero_grad()
            ((w * losses).sum() / len(y)).backward()
            opt.step()
            step += 1
    return model


def assert_copies_equal_references(ens, references) -> None:
    for m, ref in enumerate(references):
        mine, theirs = ens.member(m).state_dict(), ref.state_dict()
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], **TOL, msg=lambda s: f"copy {m} {k}: {s}")


# ---------------------------------------------------------------------------------- the stream


def test_each_copy_streams_its_own_subset_in_its_own_shuffle(dataset, masks):
    loader = per_copy_loader(dataset, B, masks, seed=SEED)
    assert len(loader) == 4  # ceil(20 / 6)
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader)
        for m in range(M):
            subset = masks[m].nonzero().flatten()
            ref = indexed_loader(Subset(dataset, subset.tolist()), B, seed=per_copy_seed(SEED, m))
            ref.sampler.set_epoch(epoch)
            for (x, y, index), (rx, ry, rlocal) in zip(batches, ref, strict=True):
                assert torch.equal(index[m], subset[rlocal])
                assert torch.equal(x[m], rx) and torch.equal(y[m], ry)
    assert [b[2].shape for b in batches] == [(M, 6)] * 3 + [(M, 2)]


def test_preload_serves_the_same_batches(dataset, masks):
    plain = list(per_copy_loader(dataset, B, masks, seed=SEED))
    fast = list(per_copy_loader(dataset, B, masks, seed=SEED, preload=True))
    for a, b in zip(plain, fast, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_sampler_epochs_drop_last_and_no_masks():
    sampler = PerCopyBatchSampler(None, 4, n=10, num_models=3, seed=1, drop_last=True)
    assert len(sampler) == 2
    first = sampler.orders()
    assert sorted(first[0].tolist()) == list(range(10)) and not torch.equal(first[0], first[1])
    sampler.set_epoch(1)
    assert not torch.equal(sampler.orders(), first)
    assert all(len(batch) == 12 for batch in sampler)


def test_unequal_subsets_and_bad_batches_are_refused(dataset, masks):
    uneven = masks.clone()
    uneven[0, uneven[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same, nonzero size"):
        per_copy_loader(dataset, B, uneven)
    with pytest.raises(ValueError, match="columns"):
        per_copy_loader(dataset, B, random_subset_masks(M, N + 1, 0.5))
    ens = EnsembleModule(TinyCNN, num_models=M + 1)
    x, y, index = next(iter(per_copy_loader(dataset, B, masks)))
    with pytest.raises(ValueError, match="per_copy_loader"):
        ens.training_step((x, y, index), 0)


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ensemble_equals_separate_trainings_on_own_streams(dataset, masks, tmp_path, chunk_size):
    weights = torch.rand(M, N, generator=torch.Generator().manual_seed(5)) * 2
    ens = EnsembleModule(TinyCNN, seeds=list(range(M)), masks=masks, example_weights=weights,
                         lr=0.1, normalization="batch_size", chunk_size=chunk_size)
    fit(ens, per_copy_loader(dataset, B, masks, seed=SEED), tmp_path)
    refs = [
        reference(TinyCNN, m, dataset, masks[m].nonzero().flatten(), per_copy_seed(SEED, m), weights[m])
        for m in range(M)
    ]
    assert_copies_equal_references(ens, refs)


def test_batch_norm_and_augmentation_per_copy_equal_separate_trainings(dataset, masks, tmp_path):
    """With per-copy batches, BatchNorm statistics are each copy's own: exact separate runs."""
    shift = BatchRandomShift(1)
    model_fn = lambda: TinyCNN("batch")  # noqa: E731
    ens = EnsembleModule(model_fn, seeds=list(range(M)), masks=masks, lr=0.1, augment=shift,
                         augmentation_seeds=[20 + m for m in range(M)])
    fit(ens, per_copy_loader(dataset, B, masks, seed=SEED, preload=True), tmp_path, epochs=1)
    refs = [
        reference(model_fn, m, dataset, masks[m].nonzero().flatten(), per_copy_seed(SEED, m),
                  epochs=1, augment=shift, augmentation_seed=20 + m)
        for m in range(M)
    ]
    assert_copies_equal_references(ens, refs)
