"""BlockRecorder: the shared machinery of recorders that write per-example rows in blocks.

A *record* is one pass over every split's dataset at one point of training (an epoch end, the end
of fit). Its life: rank 0 *declares* it (creates or grows its arrays, lists it in the manifest),
then every rank *writes* its contiguous range of row blocks that are not complete yet. A crash
leaves some blocks incomplete; resuming finishes them, either when training reaches the same step
again or, when the Lightning checkpoint was taken at the record's step, right at the start of fit.

Subclasses say which arrays a record has (:meth:`array_specs`) and compute one batch of rows
(:meth:`compute_batch`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_tda import schema
from lightning_tda.callbacks.recording import (
    RecordSchedule,
    StoreRecorder,
    as_store,
    find_datasets,
    isolated_eval,
    iter_batches,
    world,
)
from lightning_tda.data import BatchFn, BatchParser, dataset_fingerprint
from lightning_tda.store import RunStore, StoreError, rank_blocks


_GATHER_BYTES = 2**26  # computed rows held before they are handed to the store's writer


@dataclass(frozen=True)
class ArraySpec:
    """One array a record writes: rows along ``row_axis`` (after the ``lead`` index)."""

    name: str
    trailing: tuple[int, ...]
    dtype: str
    lead: tuple[int, ...] = ()


class BlockRecorder(StoreRecorder):
    """Base class: scheduling, datasets, fingerprints, DDP division of row blocks, resume."""

    records_key: str = "records"

    def __init__(
        self,
        store: RunStore | str,
        splits: Sequence[str],
        schedule: RecordSchedule,
        batch_fn: BatchFn | None,
        datasets: Mapping[str, Dataset] | None,
        batch_size: int | None,
        block_rows: int | None,
        overwrite: bool = False,
    ) -> None:
        if isinstance(splits, str) or not splits:
            raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
        if (batch_size is not None and batch_size < 1) or (block_rows is not None and block_rows < 1):
            raise ValueError(f"batch_size and block_rows must be positive, got {batch_size} and {block_rows}")
        super().__init__(overwrite)
        self.store_arg = as_store(store)
        self.splits = tuple(splits)
        self.schedule = schedule
        self.parser = BatchParser(batch_fn=batch_fn)
        self.explicit_datasets = dict(datasets) if datasets else None
        self.batch_size = batch_size
        self.block_rows = block_rows
        self.datasets: dict[str, Dataset] = {}
        self._restored_step: int | None = None
        self._probes: dict[str, list[Tensor]] = {}  # per split: one probe batch's columns
        self._fresh: set[str] = set()  # tags this process declared just now: no block written yet
        self._batch_sizes: dict[str, int] = {}  # per split, once
        self._nonfinite = 0
        self._fingerprints: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ for subclasses
    needs_grad: bool = False

    def array_specs(self, split: str, record: Mapping[str, Any], probe: Sequence[Tensor]) -> list[ArraySpec]:
        """The arrays of ``record`` for ``split``, in the order :meth:`compute_batch` returns
        columns; ``probe`` is that output for one example. The last array is written last."""
        raise NotImplementedError

    def compute_batch(self, module: nn.Module, x: Tensor, y: Tensor, offset: int = 0) -> list[Tensor]:
        """One column per array, each ``[batch, ...]``; the last one is checked for NaN/inf.
        ``offset`` is the dataset row of ``x[0]`` (for error messages)."""
        raise NotImplementedError

    def compute_block(self, module: nn.Module, batches: Iterable[tuple[int, Tensor, Tensor]]) -> list[Tensor]:
        """The columns of one row block (on the CPU) from its ``(offset, x, y)`` batches. By
        default :meth:`compute_batch` per batch, concatenated; a subclass may batch its own
        post-processing across the block."""
        parts = [[c.detach().cpu() for c in self.compute_batch(module, x, y, offset)] for offset, x, y in batches]
        return [torch.cat(col) for col in zip(*parts)]

    def describe_record(self, trainer: L.Trainer) -> dict[str, Any]:
        """Extra fields of a record's manifest entry."""
        return {}

    def validate_setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Checks that need the module or the store (raise before training starts)."""

    # ------------------------------------------------------------------ lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(store=str(self.store_arg), splits=self.splits)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.open(trainer)
        self.datasets = find_datasets(trainer, self.splits, self.explicit_datasets)
        self._batch_sizes.clear()
        self._fingerprints = {s: dataset_fingerprint(d, self.parser.batch_fn) for s, d in self.datasets.items()}
        assert self.store is not None
        for split, fp in self._fingerprints.items():  # every rank checks, so every rank raises alike
            self.store.set_fingerprint(split, fp, write=False)
        self.validate_setup(trainer, pl_module)
        trainer.strategy.barrier(f"{type(self).__name__}.setup")

    def initialise_store(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.store is not None
        for split, fp in self._fingerprints.items():
            self.store.set_fingerprint(split, fp)
        super().initialise_store(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fail before training, not after an epoch: one small batch per split through the pass.
        # Its columns also give every array's trailing shape (kept: the model does not change).
        self._probes = {
            split: self._probe(pl_module, dataset, rows=min(2, len(dataset)))  # type: ignore[arg-type]
            for split, dataset in self.datasets.items()
        }
        if not self.claim_run(trainer, pl_module, final=False):
            return  # decided at train start, once Lightning has restored this recorder's state
        # Resuming from a Lightning checkpoint taken at a record's step: finish the record now.
        if self._restored_step is not None:
            for record in self.records():
                if record[schema.GLOBAL_STEP] == self._restored_step:
                    self._write_record(trainer, pl_module, record)

    def take_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        self.record(trainer, pl_module, self.epoch_tag(trainer, epoch), epoch=epoch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_epoch_end(trainer.current_epoch):
            self.record(trainer, pl_module, self.epoch_tag(trainer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Skipped when the last epoch's record already holds these weights.
        if self.schedule.on_fit_end and not any(r[schema.GLOBAL_STEP] == trainer.global_step for r in self.records()):
            self.record(trainer, pl_module, "fit_end")
        self.flush()
        trainer.strategy.barrier(f"{type(self).__name__}.train_end")
        if trainer.is_global_zero:
            self._trim(trainer)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._restored_step = int(checkpoint.get("global_step", 0))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "splits": list(self.splits)}

    # ------------------------------------------------------------------ recording
    def epoch_tag(self, trainer: L.Trainer, epoch: int | None = None) -> str:
        return f"epoch={trainer.current_epoch if epoch is None else epoch}"

    def records(self) -> list[dict[str, Any]]:
        """This recorder's records, as listed in the manifest."""
        assert self.store is not None, f"{type(self).__name__} used before setup"
        return list(self.store.manifest[schema.RECORDS].get(self.records_key, []))

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, epoch: int | None = None) -> None:
        """Take (or finish) the record ``tag`` of the current weights (at ``epoch``, by default
        the trainer's)."""
        assert self.store is not None, f"{type(self).__name__}.record called before setup"
        self.claim_run(trainer, pl_module)
        if trainer.is_global_zero:
            self._declare(trainer, pl_module, tag, trainer.current_epoch if epoch is None else epoch)
        trainer.strategy.barrier(f"{type(self).__name__}.declare")
        if trainer.world_size > 1:  # see the arrays rank 0 grew
            self.store.refresh()
        record = next(r for r in self.records() if r[schema.TAG] == tag)
        if record[schema.GLOBAL_STEP] != trainer.global_step:
            raise StoreError(
                f"the store already holds record {tag!r} at global step {record[schema.GLOBAL_STEP]}, but "
                f"training is at step {trainer.global_step}: this store belongs to another run; "
                "record into a new store path"
            )
        self._write_record(trainer, pl_module, record)

    def _batch_size(self, split: str) -> int:
        """The given batch size, or one sized so a batch holds about 2^13 input numbers (at least
        32 rows): activations stay in cache (measured on the CPU: digits' CNN runs fastest at
        128 rows, a 3x32x32 CNN 2x slower per example at batch 512 than at 128)."""
        if self.batch_size is not None:
            return self.batch_size
        if split not in self._batch_sizes:
            x, _ = self.parser(self.datasets[split][0])
            self._batch_sizes[split] = int(max(32, min(4096, 2**13 // max(1, torch.as_tensor(x).numel()))))
        return self._batch_sizes[split]

    def _probe(self, pl_module: nn.Module, dataset: Dataset, rows: int = 1) -> list[Tensor]:
        with isolated_eval(pl_module, grad=self.needs_grad):
            _, x, y = next(iter_batches(dataset, 0, rows, rows, self.parser, pl_module.device))  # type: ignore[arg-type]
            return self.compute_batch(pl_module, x, y)

    def _specs(self, pl_module: nn.Module, record: Mapping[str, Any]) -> dict[str, list[ArraySpec]]:
        for split, dataset in self.datasets.items():
            if split not in self._probes:  # record() called without fit's start (direct use)
                self._probes[split] = self._probe(pl_module, dataset)
        return {split: self.array_specs(split, record, self._probes[split]) for split in self.datasets}

    def _declare(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, epoch: int) -> None:
        """Rank 0: create or grow the record's arrays, then list it in the manifest."""
        assert self.store is not None
        records = self.records()
        existing = [r for r in records if r[schema.TAG] == tag]
        entry = existing[0] if existing else {
            schema.TAG: tag,
            schema.INDEX: len(records),
            schema.EPOCH: int(epoch),
            schema.GLOBAL_STEP: int(trainer.global_step),
            schema.SPLITS: list(self.splits),
            **self.describe_record(trainer),
        }
        # Arrays before the manifest lists the record. Rows are reserved for the records still
        # planned in this fit (trimmed at its end), so most records find theirs already there.
        reserve = self._planned_after(trainer)
        growing: dict[int, list[str]] = {}
        for split, specs in self._specs(pl_module, entry).items():
            n = len(self.datasets[split])  # type: ignore[arg-type]
            for spec in specs:
                lead = tuple(i + 1 for i in spec.lead)
                reserved = (lead[0] + reserve, *lead[1:]) if lead else ()
                shape = (*reserved, n, *spec.trailing)
                layout = self.store.ensure_array(
                    spec.name, shape, spec.dtype, row_axis=len(lead), block_rows=self._block_rows(n, trainer)
                )
                if lead and lead[0] > layout.shape[0]:
                    growing.setdefault(lead[0] + reserve, []).append(spec.name)
        for n_leading, names in growing.items():
            self.store.grow(names, n_leading)
        if not existing:
            self.store.update_manifest(lambda m: m[schema.RECORDS].setdefault(self.records_key, []).append(entry))
            self._fresh.add(tag)

    def _block_rows(self, n: int, trainer: L.Trainer) -> int:
        """The given rows per block, or: one block per rank for up to 65,536 rows a rank (each
        block is one write of each array; a killed record redoes at most one block per rank),
        at least 1,024."""
        if self.block_rows is not None:
            return self.block_rows
        return max(1024, min(65536, -(-n // trainer.world_size)))

    def _planned_after(self, trainer: L.Trainer) -> int:
        """How many more records the schedule takes in this fit after the current one (0 when
        the trainer has no epoch limit)."""
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return 0
        later = sum(self.schedule.at_epoch_end(e) for e in range(trainer.current_epoch + 1, max_epochs))
        return later + int(self.schedule.on_fit_end)

    def _trim(self, trainer: L.Trainer) -> None:
        """Rank 0, at the end of fit: give back the rows reserved for records not taken."""
        assert self.store is not None
        records = self.records()
        if not records:
            return
        names = [
            spec.name for specs in self._specs(trainer.lightning_module, records[-1]).values()
            for spec in specs if spec.lead
        ]
        if names:
            self.store.trim(names, max(int(r[schema.INDEX]) for r in records) + 1)

    def _write_record(self, trainer: L.Trainer, pl_module: L.LightningModule, record: Mapping[str, Any]) -> None:
        """Every rank: compute and write this rank's incomplete row blocks of the record."""
        assert self.store is not None
        rank, world_size = world(trainer)
        specs = self._specs(pl_module, record)
        nonfinite: dict[str, list[int]] = {}
        fresh = record[schema.TAG] in self._fresh and world_size == 1  # every block is still to write
        self._fresh.discard(record[schema.TAG])
        # Blocks are written in the background, gathered up to _GATHER_BYTES (a small record, one
        # write after its last block): the store waits for them before anything else touches it,
        # and flush() runs before a Lightning checkpoint and at the end.
        gathered: list[tuple[str, int, Any, tuple[int, ...]]] = []
        with isolated_eval(pl_module, grad=self.needs_grad):
            for split, dataset in self.datasets.items():
                layout = self.store.layout(specs[split][-1].name)
                todo = None if fresh else {
                    s for spec in specs[split] for s, _ in self.store.incomplete_blocks(spec.name, spec.lead)
                }
                for block in rank_blocks(layout.n_blocks, rank, world_size):
                    start, stop = layout.block_range(block)
                    if todo is not None and start not in todo:
                        continue
                    columns = self.compute_block(
                        pl_module, iter_batches(dataset, start, stop, self._batch_size(split), self.parser, pl_module.device)
                    )
                    last = columns[-1].reshape(len(columns[-1]), -1).float()
                    bad = torch.nonzero(~torch.isfinite(last).all(1)).flatten()
                    nonfinite.setdefault(split, []).extend((bad + start).tolist())
                    gathered += [(spec.name, start, values.numpy(), spec.lead) for spec, values in zip(specs[split], columns)]
                    if sum(values.nbytes for _, _, values, _ in gathered) >= _GATHER_BYTES:
                        self.store.write_blocks(gathered, wait=False)
                        gathered = []
        if gathered:
            self.store.write_blocks(gathered, wait=False)
        if world_size > 1:
            self.store.flush()
        trainer.strategy.barrier(f"{type(self).__name__}.write")
        self._report_nonfinite(record, nonfinite)
        if trainer.is_global_zero:
            rank_zero_info(
                f"{type(self).__name__}: recorded {record[schema.TAG]} (step {record[schema.GLOBAL_STEP]}) to {self.store.path}"
            )

    def _report_nonfinite(self, record: Mapping[str, Any], rows_by_split: Mapping[str, list[int]]) -> None:
        for split, rows in rows_by_split.items():
            if rows:
                self._nonfinite += len(rows)
                warnings.warn(
                    f"{type(self).__name__}: {len(rows)} non-finite outputs in split {split!r} at record "
                    f"{record[schema.TAG]} (examples {rows[:10]}{' ...' if len(rows) > 10 else ''}); they are "
                    "stored as they are (NaN/inf). Check the model for overflow or a bad learning rate.",
                    RuntimeWarning,
                )

    @property
    def nonfinite_count(self) -> int:
        """How many examples with non-finite values this recorder has seen (and warned about)."""
        return self._nonfinite
