"""Reading models' recorded outputs from their RunStores for the diversity analysis.

A MarginRecorder with ``logits=True`` records each model's logits per split; an ensemble's store
(an :class:`~lightning_tda.ensemble.EnsembleModule` run) holds one set per copy. Stores compared
together must hold the same dataset (equal fingerprints: refused otherwise, naming both stores),
and the labels given must be that dataset's (checked against the fingerprint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_tda import schema
from lightning_tda.callbacks.margin_recorder import read_logits
from lightning_tda.data import dataset_fingerprint, dataset_labels
from lightning_tda.store import FingerprintMismatchError, RunStore, StoreError, check_stores_share_datasets

__all__ = ["StoreOutputs", "read_store_outputs"]

StoreLike = RunStore | str | os.PathLike


@dataclass
class StoreOutputs:
    """What the stores hold for one split: ``logits [M, n, C]``, ``target [n]``, one name and
    description per model, and the store path each came from."""

    logits: Tensor
    target: Tensor
    names: list[str]
    descriptions: list[dict[str, Any]]
    sources: list[str] = field(default_factory=list)


def _open(store: StoreLike) -> RunStore:
    if isinstance(store, RunStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return RunStore(store)  # opens, never creates: a mistyped path raises StoreNotFoundError
    raise TypeError(f"stores must be RunStore objects or paths, got {type(store).__name__}")


def _labels(labels: Tensor | np.ndarray | Dataset | None) -> Tensor:
    if labels is None:
        raise ValueError(
            "labels are required: the stores hold outputs, not labels; pass the split's dataset "
            "or its labels in order (they are checked against the stores' fingerprint)"
        )
    if isinstance(labels, Dataset) and not isinstance(labels, (Tensor, np.ndarray)):
        return torch.from_numpy(dataset_labels(labels))
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)


class _LabelsOnly(Dataset):
    def __init__(self, labels: Tensor) -> None:
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)


def _check_fingerprints(stores: Sequence[RunStore], split: str, labels: Tensor) -> None:
    recorded = check_stores_share_datasets(stores, [split], "compare runs recorded on the same dataset split")[split]
    given = dataset_fingerprint(_LabelsOnly(labels))
    if given != recorded:
        raise FingerprintMismatchError(
            f"the labels given ({given[schema.FINGERPRINT_SIZE]} examples, hash {given[schema.FINGERPRINT_LABELS][:12]}...) are not "
            f"those of split {split!r} recorded in {stores[0].path} ({recorded.get(schema.FINGERPRINT_SIZE)} examples, hash "
            f"{str(recorded.get(schema.FINGERPRINT_LABELS))[:12]}...); pass that split's labels in recording order"
        )


def _store_name(store: RunStore) -> str:
    return str(store.manifest.get(schema.RUN_NAME) or PurePosixPath(str(store.path).rstrip("/")).name or "store")


def _store_description(store: RunStore) -> dict[str, Any]:
    m = store.manifest
    described = {"seed": m.get("seed"), "algorithm": m.get("algorithm"), "architecture": (m.get("model") or {}).get("class")}
    return {k: v for k, v in described.items() if v is not None}


def read_store_outputs(
    stores: Sequence[StoreLike],
    split: str,
    labels: Tensor | np.ndarray | Dataset | None,
    *,
    record: int = -1,
    names: Sequence[str] | None = None,
    descriptions: Sequence[Mapping[str, Any]] | None = None,
) -> StoreOutputs:
    """Read every model's recorded logits of ``split`` (record ``record`` of the complete ones,
    the last by default). An ensemble store gives one model per copy (``<run>/<copy>``, seed =
    the copy's index unless described otherwise). Default descriptions come from each manifest
    (seed, algorithm label, model class); pass ``descriptions`` (one per model) to say more."""
    if isinstance(stores, (str, os.PathLike, RunStore)) or len(stores) == 0:
        raise ValueError("stores must be a non-empty sequence of RunStores or paths")
    opened = [_open(s) for s in stores]
    y = _labels(labels)
    _check_fingerprints(opened, split, y)
    logits, out_names, out_desc, sources = [], [], [], []
    for store in opened:
        values, records = read_logits(store, split)
        if not records:
            raise StoreError(f"{store.path} has no complete record of logits for split {split!r}; finish or resume its run")
        try:
            chosen = values[record]
        except IndexError:
            raise ValueError(f"record {record} is out of range: {store.path} has {len(records)} complete records") from None
        base, desc = _store_name(store), _store_description(store)
        if chosen.ndim == 3:  # an ensemble: [n, C, copy]
            for m in range(chosen.shape[2]):
                logits.append(torch.from_numpy(np.ascontiguousarray(chosen[:, :, m])))
                out_names.append(f"{base}/{m}")
                out_desc.append({**desc, "seed": m})
                sources.append(store.path)
        else:
            logits.append(torch.from_numpy(np.ascontiguousarray(chosen)))
            out_names.append(base)
            out_desc.append(desc)
            sources.append(store.path)
    classes = {t.shape[1] for t in logits}
    if len(classes) > 1:
        shown = ", ".join(f"{src} has {t.shape[1]}" for src, t in zip(sources, logits))
        raise ValueError(f"models with different class counts ({shown} classes); compare models of one task")
    if len(set(out_names)) != len(out_names):  # e.g. two stores of the same run name
        out_names = [f"{name}#{k}" for k, name in enumerate(out_names)]
    if names is not None:
        if len(names) != len(logits):
            raise ValueError(f"got {len(names)} names for the {len(logits)} models the stores hold")
        out_names = [str(n) for n in names]
    if descriptions is not None:
        if len(descriptions) != len(logits):
            raise ValueError(f"got {len(descriptions)} descriptions for the {len(logits)} models the stores hold")
        out_desc = [dict(d) for d in descriptions]
    return StoreOutputs(torch.stack(logits), y, out_names, out_desc, sources)
