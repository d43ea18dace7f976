"""Reading recorded gradient features out of RunStores for the scorers.

A *feature record* is what one GradientRecorder record holds for one split: projected gradients
``phi`` ``[n, k]`` and out-to-loss terms ``q`` ``[n]``, tied to a store, a record tag, a global
step and the learning rates in force. Train and test features are only ever combined when they
come from the same store and record (the same checkpoint and projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tda.store import RunStore, StoreError, join_name

RECORDS_KEY = "grads"


@dataclass(frozen=True)
class FeatureRecord:
    """Projected gradients of one split at one recorded checkpoint of one run."""

    store_path: str
    tag: str
    split: str
    global_step: int
    learning_rate: float
    phi: Tensor
    q: Tensor

    def check_pairs_with(self, other: "FeatureRecord") -> None:
        """Raise unless ``other`` comes from the same run, checkpoint and projection."""
        if (self.store_path, self.tag, self.global_step) != (other.store_path, other.tag, other.global_step):
            raise ValueError(
                f"train and test features come from different checkpoints: {self.split!r} from "
                f"{self.store_path} record {self.tag!r} (step {self.global_step}), {other.split!r} from "
                f"{other.store_path} record {other.tag!r} (step {other.global_step}); score each "
                "checkpoint's test features against the same checkpoint's train features"
            )
        if self.phi.shape[1] != other.phi.shape[1]:
            raise ValueError(f"feature widths differ: {self.phi.shape[1]} vs {other.phi.shape[1]}")


def gradient_records(store: RunStore) -> list[dict]:
    """The GradientRecorder records of ``store``; a clear error when there are none."""
    records = store.manifest["records"].get(RECORDS_KEY, [])
    if not records:
        raise StoreError(
            f"the RunStore at {store.path} has no recorded gradients; add a GradientRecorder to "
            "the training run (or run one over its checkpoints) before scoring"
        )
    return records


def load_features(
    store: RunStore, split: str, tag: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> FeatureRecord:
    """Load ``grads/<split>/<tag>`` and ``out_to_loss/<split>/<tag>``, checking completeness."""
    record = next((r for r in gradient_records(store) if r["tag"] == tag), None)
    if record is None:
        tags = [r["tag"] for r in gradient_records(store)]
        raise StoreError(f"no gradient record {tag!r} in {store.path}; it has {tags}")
    name, q_name = join_name("grads", split, tag), join_name("out_to_loss", split, tag)
    if not store.has_array(name):
        raise StoreError(
            f"record {tag!r} of {store.path} has no gradients for split {split!r}; recorded splits: "
            f"{record.get('splits')}"
        )
    if not (store.is_complete(name) and store.is_complete(q_name)):
        raise StoreError(
            f"gradients {name} in {store.path} are incomplete (blocks {store.incomplete_blocks(name)[:5]}); "
            "resume the recording run to finish them"
        )
    phi = torch.from_numpy(store.read(name)).to(device=device, dtype=dtype)
    q = torch.from_numpy(store.read(q_name)).to(device=device, dtype=dtype)
    lrs = [lr for group in record.get("learning_rates", [[1.0]]) for lr in group] or [1.0]
    return FeatureRecord(store.path, tag, split, int(record["global_step"]), float(np.mean(lrs)), phi, q)


def select_tags(store: RunStore, checkpoints: Sequence[str] | int | None) -> list[str]:
    """Record tags to use: all (None), the last ``n`` (an int), or the listed tags."""
    tags = [r["tag"] for r in sorted(gradient_records(store), key=lambda r: r["global_step"])]
    if checkpoints is None:
        return tags
    if isinstance(checkpoints, int):
        if checkpoints < 1:
            raise ValueError(f"checkpoints must be >= 1, got {checkpoints}")
        return tags[-checkpoints:]
    missing = [t for t in checkpoints if t not in tags]
    if missing:
        raise StoreError(f"no gradient records {missing} in {store.path}; it has {tags}")
    return list(checkpoints)
