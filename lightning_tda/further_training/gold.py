"""The further-training gold standard (Wei et al. 2024, "Final-model-only data attribution"):
:func:`further_training_scores`, and the inputs it shares with the LightningModule."""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_tda.data import BatchFn, BatchParseError, BatchParser
from lightning_tda.further_training.replicas import LossFn, cross_entropy
from lightning_tda.further_training.result import FurtherTrainingResult
from lightning_tda.further_training.run import FurtherTrainingRun
from lightning_tda.further_training.settings import (
    FurtherTrainingSettings,
    check_instances,
    check_seeds,
    check_steps,
)
from lightning_tda.store import RunStore, StoreError


def dataset_tensors(dataset: Dataset, what: str, batch_fn: BatchFn | None = None) -> tuple[Tensor, Tensor]:
    """All of ``dataset`` as ``(x, y)`` tensors, in order (examples are their positions)."""
    if not hasattr(dataset, "__len__") or len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"the {what} set must be a non-empty map-style dataset (with __len__)")
    parser = BatchParser(batch_fn=batch_fn)
    no_labels = (
        f"the {what} set has no labels: its items must be (x, y) pairs or dicts with 'x' and 'y' "
        "(further training and its test losses need the labels); pass batch_fn for other layouts"
    )
    try:
        first = parser(dataset[0])
    except (BatchParseError, TypeError, KeyError) as err:
        raise ValueError(f"{no_labels} ({err})") from err
    if first[1] is None:
        raise ValueError(no_labels)
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=1024, shuffle=False):
        x, y = parser(batch)
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def _strip_common_prefix(tensors: Mapping[str, Tensor], expected: set[str]) -> Mapping[str, Tensor]:
    """``tensors`` with one leading component (e.g. ``model.``) removed from every key, when that
    makes the keys exactly ``expected`` (a LightningModule's checkpoint for its inner network)."""
    heads = {k.split(".", 1)[0] for k in tensors if "." in k}
    if len(heads) == 1 and all("." in k for k in tensors):
        stripped = {k.split(".", 1)[1]: v for k, v in tensors.items()}
        if set(stripped) == expected:
            return stripped
    return tensors


def load_final_model(
    model: nn.Module, store: RunStore | str | None = None, checkpoint: str | Mapping[str, Tensor] | None = None
) -> nn.Module:
    """``model`` with the final weights: from a RunStore checkpoint (``checkpoint`` its tag, the
    last one by default), from a state mapping, or ``model`` itself when neither is given.

    The checkpoint must match the module exactly (every name and shape; a common leading
    ``<name>.`` from a LightningModule wrapper is removed when that makes it match); otherwise a
    ``ValueError`` lists what differs. The given module is not modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the final model's architecture), got {type(model).__name__}")
    if store is None and checkpoint is None:
        return model
    source = "the given state"
    if store is not None:
        store = store if isinstance(store, RunStore) else RunStore(store)
        tags = store.checkpoint_tags()
        if not tags:
            raise StoreError(f"the RunStore at {store.path} has no checkpoints; record one with CheckpointRecorder")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise TypeError("with a store, checkpoint is a tag (str); without one, a mapping of tensors")
        tag = checkpoint if checkpoint is not None else tags[-1]
        tensors, _ = store.load_checkpoint(tag)
        source = f"checkpoint {tag!r} of {store.path}"
    else:
        if not isinstance(checkpoint, Mapping):
            raise TypeError("checkpoint without a store must be a mapping name -> tensor (a state dict)")
        tensors = dict(checkpoint)
    target = copy.deepcopy(model)
    state = target.state_dict()
    tensors = _strip_common_prefix(tensors, set(state))
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(state[k].shape)}"
        for k in sorted(set(state) & set(tensors)) if tuple(tensors[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the final model's parameters ({source}) do not match the module {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}; "
            "pass the architecture the run trained"
        )
    target.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()})
    return target


def _check_loss(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = loss_fn(model(x[:2]), y[:2])
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (min(2, len(y)),):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [batch], reduction='none'), got "
            f"{getattr(out, 'shape', type(out).__name__)}"
        )


def build_run(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    instances: Sequence[int] | Tensor,
    steps: Sequence[int] | int,
    seeds: Sequence[int] | int,
    settings: FurtherTrainingSettings,
    loss_fn: LossFn | None = None,
    batch_fn: BatchFn | None = None,
    store: RunStore | str | None = None,
    checkpoint: str | Mapping[str, Tensor] | None = None,
) -> FurtherTrainingRun:
    """Validate the inputs and build the computation (shared by the function and the module)."""
    steps = check_steps(steps)
    seeds = check_seeds(seeds)
    final = load_final_model(model, store, checkpoint)
    x_train, y_train = dataset_tensors(train_dataset, "training", batch_fn)
    x_test, y_test = dataset_tensors(test_dataset, "test", batch_fn)
    instances = check_instances(instances, len(y_train))
    settings.check_weights(len(y_train))
    param = next(final.parameters(), None)
    if param is None:
        raise ValueError("the model has no parameters to further train")
    device = param.device
    if x_train.dtype.is_floating_point:
        x_train, x_test = x_train.to(param.dtype), x_test.to(param.dtype)
    loss_fn = loss_fn or cross_entropy
    _check_loss(final, loss_fn, x_test.to(device), y_test.to(device))
    run = FurtherTrainingRun(
        final, x_train, y_train, x_test, y_test, instances, steps, seeds, settings, loss_fn
    )
    return run.to(device)


def further_training_scores(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    instances: Sequence[int] | Tensor,
    steps: Sequence[int] | int = (1, 10, 100),
    seeds: Sequence[int] | int = 5,
    *,
    store: RunStore | str | None = None,
    checkpoint: str | Mapping[str, Tensor] | None = None,
    loss_fn: LossFn | None = None,
    optimizer: str = "sgd",
    lr: float = 0.01,
    batch_size: int | None = 64,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    mode: str = "remove",
    eps: float | None = None,
    center: bool = False,
    chunk_size: int | None = None,
    keep_per_seed: bool = False,
    batch_fn: BatchFn | None = None,
    progress: bool = True,
) -> FurtherTrainingResult:
    """Further-training scores ``tau_K(i, z)`` of every instance ``i`` on every test example ``z``
    at every ``K`` in ``steps`` (definition: :class:`FurtherTrainingResult`).

    For each seed, the full run and the run without each instance (same batches, the instance
    taken out; :mod:`~lightning_tda.further_training.order`) are copies of the final model
    trained together in one vmapped step per batch
    (:mod:`~lightning_tda.further_training.replicas`); the test losses of all copies are taken
    after each ``K`` in ``steps``, so the whole curve over ``K`` comes from one run.

    Args:
        model: the final model (its weights are the starting point), or its architecture with
            ``store``/``checkpoint`` giving the weights (:func:`load_final_model`).
        train_dataset, test_dataset: ``(x, y)`` datasets; examples are their positions.
        instances: training positions to leave out (or up-weight).
        steps: optimizer-step counts ``K`` to evaluate at, strictly increasing
            (:func:`~lightning_tda.further_training.order.epoch_steps` converts epochs).
        seeds: seeds (batch orders) to average over; an int ``S`` means ``0..S-1``.
        loss_fn: per-example training loss ``(outputs, y) -> [batch]``; cross-entropy by default.
            The same loss is the test loss.
        optimizer, lr, batch_size, weight_decay, momentum, betas, mode, eps, center, chunk_size,
            keep_per_seed: see :class:`~lightning_tda.further_training.settings.FurtherTrainingSettings`.
        batch_fn: ``batch_fn(item_or_batch) -> (x, y)`` for other dataset layouts.
        progress: show a progress bar.

    Runs on the model's device. Memory: ``(1 + len(instances))`` copies of the parameters and
    optimizer state, activations of ``chunk_size`` copies on one batch, and
    ``len(seeds) * len(steps) * n_test * len(instances)`` scores.
    """
    settings = FurtherTrainingSettings(
        optimizer=optimizer, lr=lr, batch_size=batch_size, weight_decay=weight_decay,  # type: ignore[arg-type]
        momentum=momentum, betas=tuple(betas), mode=mode, eps=eps, center=center,  # type: ignore[arg-type]
        chunk_size=chunk_size, keep_per_seed=keep_per_seed,
    )
    run = build_run(
        model, train_dataset, test_dataset, instances, steps, seeds, settings, loss_fn, batch_fn, store, checkpoint
    )
    optim = run.build_optimizer()
    bar = tqdm(total=run.total_steps, desc="further training", disable=not progress)
    for t in range(run.total_steps):
        run.advance(t, optim)
        bar.update(1)
    bar.close()
    result = run.result()
    check_finite(result)
    return result


def check_finite(result: FurtherTrainingResult) -> None:
    """Refuse a diverged computation (NaN or infinite test losses)."""
    if not (np.isfinite(result.scores).all() and np.isfinite(result.full_loss).all()):
        raise FloatingPointError(
            "further training produced non-finite test losses (it diverged); lower lr or the number of steps"
        )
