"""What the dCor recipes evaluate on: an evaluation set given as tensors, a Dataset or a DataLoader,
walked in order (row ``i`` is example ``i``), and the quiet training they share."""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.data import BatchFn, BatchParser

EvalData = Tensor | tuple[Tensor, Tensor] | Dataset | DataLoader
"""An evaluation set: inputs ``x`` [n, ...], a pair ``(x, y)``, a ``Dataset`` of ``(x, y)``
items, or a ``DataLoader`` that walks it in a fixed order."""


def data_length(data: EvalData, name: str) -> int | None:
    """The number of examples in ``data`` (None for a loader over a dataset without a length)."""
    if isinstance(data, Tensor):
        if data.ndim == 0:
            raise ValueError(f"{name} is a scalar tensor; pass inputs [n, ...], (x, y), a Dataset or a DataLoader")
        return int(data.shape[0])
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
            raise TypeError(f"{name} as a pair must be two tensors (x, y), got {[type(t).__name__ for t in data]}")
        if data[0].shape[0] != data[1].shape[0]:
            raise ValueError(f"{name}: x has {data[0].shape[0]} rows but y has {data[1].shape[0]}")
        return int(data[0].shape[0])
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        try:
            return len(data)  # type: ignore[arg-type]
        except TypeError:
            return None
    raise TypeError(
        f"{name} must be a tensor [n, ...], a pair (x, y), a Dataset or a DataLoader, got {type(data).__name__}"
    )


def iterate_batches(
    data: EvalData, batch_size: int = 256, batch_fn: BatchFn | None = None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(x, y)`` batches of ``data`` in order (``y`` None when ``data`` is inputs alone)."""
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    if isinstance(data, (tuple, list)):
        x, y = data
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    parser = BatchParser(batch_fn=batch_fn)
    for batch in loader:
        x, y = parser(batch)
        yield x, y


def labels_of(data: EvalData, batch_size: int = 256, batch_fn: BatchFn | None = None) -> Tensor:
    """All labels of ``data`` in order; a clear error when it holds inputs alone."""
    labels = []
    for _, y in iterate_batches(data, batch_size, batch_fn):
        if y is None:
            raise ValueError(
                "the evaluation set holds inputs alone, so it has no labels; pass (x, y), a Dataset "
                "or a DataLoader of (x, y), or give the signal as a tensor"
            )
        labels.append(torch.as_tensor(y))
    return torch.cat(labels)


def check_positive(value: Any, name: str) -> int:
    """``value`` as an int >= 1, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def fit_quietly(
    module: L.LightningModule, datamodule: L.LightningDataModule, epochs: int, seed: int,
    trainer_kwargs: dict[str, Any] | None = None,
) -> None:
    """Train ``module`` for ``epochs`` on the CPU, seeded (same seed: same data order), without
    logger, checkpoints or progress bars; validation is left to the recipes."""
    L.seed_everything(seed, workers=True, verbose=False)
    settings: dict[str, Any] = dict(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, limit_val_batches=0,
    )
    settings.update(trainer_kwargs or {})
    with warnings.catch_warnings():
        # frozen references (a penalty's earlier models) are in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
        L.Trainer(**settings).fit(module, datamodule=datamodule)


@torch.no_grad()
def predict(model: nn.Module, data: EvalData, batch_size: int = 512) -> Tensor:
    """Logits of ``model`` (in eval mode) over ``data``, in order."""
    model.eval()
    return torch.cat([model(x) for x, _ in iterate_batches(data, batch_size)])


def names_unique(names: Sequence[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} lists {name!r} twice")
        seen.add(name)
