"""Reading recorded gradient features out of RunStores for the scorers.

A *feature record* is what one GradientRecorder record holds for one split: projected gradients
``phi`` ``[n, k]`` of the recorded output and out-to-loss terms ``q`` ``[n]`` (``q = -d loss /
d output``), tied to a store, a record tag, a global step, the recorded output's name and the
learning rates in force. Train and test features are only ever combined when they come from the
same store and record (the same checkpoint and projection).

:class:`FeatureSource` reads a record in row ranges (scorers stream it); :func:`load_features`
reads a whole record into memory (small stores, inspection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_tda import schema
from lightning_tda.store import RunStore, StoreError

RECORDS_KEY = schema.GRADIENT_RECORDS


def gradient_records(store: RunStore) -> list[dict]:
    """The GradientRecorder records of ``store``; a clear error when there are none."""
    records = store.manifest[schema.RECORDS].get(RECORDS_KEY, [])
    if not records:
        raise StoreError(
            f"the RunStore at {store.path} has no recorded gradients; add a GradientRecorder to "
            "the training run (or run one over its checkpoints) before scoring"
        )
    return records


def _record(store: RunStore, tag: str) -> dict[str, Any]:
    record = next((r for r in gradient_records(store) if r[schema.TAG] == tag), None)
    if record is None:
        tags = [r[schema.TAG] for r in gradient_records(store)]
        raise StoreError(f"no gradient record {tag!r} in {store.path}; it has {tags}")
    return record


class FeatureSource:
    """One split of one gradient record, read in row ranges (checked complete on opening)."""

    def __init__(self, store: RunStore, split: str, tag: str) -> None:
        self.store, self.split, self.tag = store, split, tag
        self.record = _record(store, tag)
        self.name, self.q_name = schema.gradients_array(split, tag), schema.out_to_loss_array(split, tag)
        if not store.has_array(self.name):
            raise StoreError(
                f"record {tag!r} of {store.path} has no gradients for split {split!r}; recorded splits: "
                f"{self.record.get(schema.SPLITS)}"
            )
        if not (store.is_complete(self.name) and store.is_complete(self.q_name)):
            raise StoreError(
                f"gradients {self.name} in {store.path} are incomplete (blocks "
                f"{store.incomplete_blocks(self.name)[:5]}); resume the recording run to finish them"
            )
        self.n, self.k = store.layout(self.name).shape

    @property
    def global_step(self) -> int:
        return int(self.record[schema.GLOBAL_STEP])

    @property
    def output(self) -> str | None:
        """The recorded output ("margin", "loss", ...), None for a record that does not say."""
        return self.record.get(schema.OUTPUT)

    def rows(
        self, start: int, stop: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        out: Tensor | None = None,
    ) -> Tensor:
        """Features of rows ``start..stop`` as a ``[stop - start, k]`` tensor of ``dtype`` (into
        ``out`` when given: a buffer reused block after block)."""
        values = torch.from_numpy(self.store.read(self.name, slice(start, stop)))
        if out is not None:
            return out.copy_(values)
        return values.to(device=device, dtype=dtype)

    def q(self, start: int, stop: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Out-to-loss terms of rows ``start..stop``."""
        return torch.from_numpy(self.store.read(self.q_name, slice(start, stop))).to(device=device, dtype=dtype)

    def column_learning_rates(self) -> Tensor:
        """The learning rate of every feature column ``[k]`` (float64).

        Raises when the record holds no learning rate, or when one projection block mixes
        parameters trained at different rates (their columns cannot be weighted apart)."""
        ranges = self.record.get(schema.LEARNING_RATE_COLUMNS)
        if ranges is None:
            rates = [lr for group in self.record.get(schema.LEARNING_RATES) or [] for lr in group]
            if not rates:
                raise StoreError(
                    f"record {self.tag!r} of {self.store.path} holds no learning rate (recorded outside "
                    "fit, without an optimizer?); TracIn weights each checkpoint by it: record during "
                    "training, or use GradDot"
                )
            if len(set(rates)) > 1:
                raise StoreError(
                    f"record {self.tag!r} of {self.store.path} was taken with several learning rates "
                    f"{sorted(set(rates))} but does not say which feature columns each applies to (recorded "
                    "by an older GradientRecorder); record again to weight each parameter group by its rate"
                )
            return torch.full((self.k,), float(rates[0]), dtype=torch.float64)
        out = torch.full((self.k,), float("nan"), dtype=torch.float64)
        for start, stop, lr in ranges:
            if lr is None:
                raise StoreError(
                    f"record {self.tag!r} of {self.store.path}: feature columns {start}..{stop} come from "
                    "one projection block whose parameters were trained at different learning rates, so "
                    "TracIn cannot weight them apart; give a layer's weight and bias one rate, or record "
                    "with engine='exact' and projection='identity'"
                )
            out[int(start) : int(stop)] = float(lr)
        if bool(torch.isnan(out).any()):
            raise StoreError(f"record {self.tag!r} of {self.store.path} gives no learning rate for some feature columns")
        return out

    def check_pairs_with(self, other: "FeatureSource") -> None:
        """Raise unless ``other`` comes from the same run, checkpoint and projection."""
        _check_pair(self.split, self.store.path, self.tag, self.global_step, self.k,
                    other.split, other.store.path, other.tag, other.global_step, other.k)


def _check_pair(split: str, path: str, tag: str, step: int, k: int,
                other_split: str, other_path: str, other_tag: str, other_step: int, other_k: int) -> None:
    if (path, tag, step) != (other_path, other_tag, other_step):
        raise ValueError(
            f"train and test features come from different checkpoints: {split!r} from {path} record "
            f"{tag!r} (step {step}), {other_split!r} from {other_path} record {other_tag!r} (step "
            f"{other_step}); score each checkpoint's test features against the same checkpoint's train features"
        )
    if k != other_k:
        raise ValueError(f"feature widths differ: {k} vs {other_k}")


@dataclass(frozen=True)
class FeatureRecord:
    """Projected gradients of one split at one recorded checkpoint of one run, in memory."""

    store_path: str
    tag: str
    split: str
    global_step: int
    learning_rate: float | None
    phi: Tensor
    q: Tensor
    output: str | None = None

    def check_pairs_with(self, other: "FeatureRecord") -> None:
        """Raise unless ``other`` comes from the same run, checkpoint and projection."""
        _check_pair(self.split, self.store_path, self.tag, self.global_step, self.phi.shape[1],
                    other.split, other.store_path, other.tag, other.global_step, other.phi.shape[1])


def load_features(
    store: RunStore, split: str, tag: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> FeatureRecord:
    """Load ``grads/<split>/<tag>`` and ``out_to_loss/<split>/<tag>`` whole, checking completeness.

    ``learning_rate`` is the record's rate when all its parameter groups share one, else None."""
    source = FeatureSource(store, split, tag)
    phi = source.rows(0, source.n, dtype).to(device)
    q = source.q(0, source.n, dtype).to(device)
    rates = {lr for group in source.record.get(schema.LEARNING_RATES) or [] for lr in group}
    learning_rate = float(rates.pop()) if len(rates) == 1 else None
    return FeatureRecord(store.path, tag, split, source.global_step, learning_rate, phi, q, source.output)


def select_tags(store: RunStore, checkpoints: Sequence[str] | int | None) -> list[str]:
    """Record tags to use: all (None), the last ``n`` (an int), or the listed tags."""
    tags = [r[schema.TAG] for r in sorted(gradient_records(store), key=lambda r: r[schema.GLOBAL_STEP])]
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


def require_output(source: FeatureSource | FeatureRecord, accepted: Sequence[str], scorer: str, why: str) -> None:
    """Raise unless the record's output is one of ``accepted`` (the scorer needs its out-to-loss term)."""
    if source.output not in accepted:
        where = source.store.path if isinstance(source, FeatureSource) else source.store_path
        raise ValueError(
            f"{scorer} needs gradients of {' or '.join(repr(a) for a in accepted)} ({why}), but record "
            f"{source.tag!r} of {where} holds gradients of output {source.output!r}; record "
            f"with GradientRecorder(output_fn={accepted[0]!r}), or use GradDot/GradCos, which need no "
            "out-to-loss term"
        )


__all__ = ["FeatureRecord", "FeatureSource", "gradient_records", "load_features", "require_output", "select_tags"]
