"""MarginRecorder: per-example margins, losses and predictions over whole splits during training."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_tda.callbacks.recording import (
    RecordSchedule,
    as_store,
    find_datasets,
    isolated_eval,
    iter_batches,
    model_description,
    open_store,
    world,
)
from lightning_tda.data import BatchFn, BatchParser, dataset_fingerprint
from lightning_tda.outputs import (
    FROM_LOGITS,
    OutputFn,
    check_labels,
    check_output,
    loss_from_logits,
    resolve_output_fn,
)
from lightning_tda.store import RunStore, StoreError, join_name, rank_blocks

RECORDS_KEY = "margins"


class MarginRecorder(Callback):
    """Record per-example outputs of every example of each split, at scheduled epochs.

    Each record is a pass of its own over each split's dataset, in eval mode, in order, in batches
    (so row ``i`` is example ``i``). It writes, per split, ``margins/<split>`` (or
    ``outputs/<split>`` for a non-margin ``output_fn``), ``losses/<split>``, ``preds/<split>`` and,
    with ``embeddings="layer.name"``, ``embeddings/<split>`` (the layer's flattened output), each
    ``[n_records, n_examples, ...]``. Records are listed in the manifest with epoch and global step.

    Rank-aware: under DDP each rank writes a contiguous range of row blocks. Resumable: a record
    left incomplete by a crash is finished, block by block, when the run resumes. Recording leaves
    the module's train/eval mode and every RNG state as it found them, so training is unchanged.

    Args:
        store: a :class:`~lightning_tda.store.RunStore` or a path/URL for one.
        splits: dataset splits to record ("train", "val", ...).
        every_n_epochs: record at the end of every n-th epoch (None: off).
        at_epochs: also record at the end of these 0-based epochs.
        on_fit_end: record when training ends (skipped if the last record is at the same step).
        output_fn: "margin" (default), "loss", "correct_class_probability" or
            ``fn(module, x, y) -> Tensor[batch]``.
        batch_fn: ``fn(batch) -> (x, y)`` when batches are not ``(x, y)`` or ``{"x", "y"}``.
        embeddings: name of a submodule whose output is also recorded (e.g. "model.fc1").
        datasets: explicit ``{split: dataset}``; otherwise taken from the datamodule.
        batch_size: examples per forward pass of the recording pass.
        block_rows: rows per block (the unit of crash-safe writing and of DDP work division).
    """

    def __init__(
        self,
        store: RunStore | str,
        splits: Sequence[str] = ("train", "val"),
        every_n_epochs: int | None = 1,
        at_epochs: Sequence[int] | None = None,
        on_fit_end: bool = True,
        output_fn: OutputFn | str | None = "margin",
        batch_fn: BatchFn | None = None,
        embeddings: str | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        batch_size: int = 512,
        block_rows: int = 1024,
    ) -> None:
        if isinstance(splits, str) or not splits:
            raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
        if batch_size < 1 or block_rows < 1:
            raise ValueError("batch_size and block_rows must be positive")
        self.store_arg = as_store(store)
        self.splits = tuple(splits)
        self.schedule = RecordSchedule(
            every_n_epochs=every_n_epochs,
            at_epochs=tuple(at_epochs) if at_epochs is not None else None,
            on_fit_end=on_fit_end,
        )
        self.output_name = output_fn if isinstance(output_fn, str) else None
        self.output_fn = resolve_output_fn(output_fn)
        self.array_prefix = "margins" if output_fn in (None, "margin") else "outputs"
        self.parser = BatchParser(batch_fn=batch_fn)
        self.embeddings = embeddings
        self.explicit_datasets = dict(datasets) if datasets else None
        self.batch_size = batch_size
        self.block_rows = block_rows
        self.store: RunStore | None = None
        self.datasets: dict[str, Dataset] = {}
        self._restored_step: int | None = None
        self._nan_count = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(store=str(self.store_arg), splits=self.splits)

    # ------------------------------------------------------------------ lightning hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.store = open_store(self.store_arg, trainer)
        self.datasets = find_datasets(trainer, self.splits, self.explicit_datasets)
        fingerprints = {s: dataset_fingerprint(d, self.parser.batch_fn) for s, d in self.datasets.items()}
        for split, fp in fingerprints.items():  # every rank checks, so every rank raises alike
            self.store.set_fingerprint(split, fp, write=False)
        if self.embeddings is not None:
            self._embedding_layer(pl_module)
        if trainer.is_global_zero:
            for split, fp in fingerprints.items():
                self.store.set_fingerprint(split, fp)
            if self.store.manifest.get("model") is None:
                self.store.update_manifest(lambda m: m.__setitem__("model", model_description(pl_module)))
        trainer.strategy.barrier("MarginRecorder.setup")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fail before training, not after an epoch: one small batch per split through the pass.
        with isolated_eval(pl_module):
            for split, dataset in self.datasets.items():
                _, x, y = next(iter_batches(dataset, 0, min(2, len(dataset)), 2, self.parser, pl_module.device))  # type: ignore[arg-type]
                self._compute(pl_module, x, y)
        # Resuming from a checkpoint taken during a record: finish it now, with the same weights.
        if self._restored_step is not None:
            for record in self._records():
                if record["global_step"] == self._restored_step:
                    self._write_record(trainer, pl_module, record)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_epoch_end(trainer.current_epoch):
            self.record(trainer, pl_module, f"epoch={trainer.current_epoch}")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.schedule.on_fit_end:
            return
        records = self._records()
        if records and any(r["global_step"] == trainer.global_step for r in records):
            return
        self.record(trainer, pl_module, "fit_end")

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored_step = int(checkpoint.get("global_step", 0))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"store": str(self.store_arg), "splits": list(self.splits)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("store") != str(self.store_arg):
            warnings.warn(
                f"resuming a MarginRecorder that recorded into {state_dict.get('store')!r}, now "
                f"pointed at {str(self.store_arg)!r}: earlier records stay in the old store"
            )

    # ------------------------------------------------------------------ recording
    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        """Take (or finish) the record ``tag`` of the current weights into the store."""
        assert self.store is not None, "MarginRecorder.record called before setup"
        if trainer.is_global_zero:
            self._declare_record(trainer, pl_module, tag)
        trainer.strategy.barrier("MarginRecorder.declare")
        record = next(r for r in self._records() if r["tag"] == tag)
        if record["global_step"] != trainer.global_step:
            raise StoreError(
                f"the store already holds record {tag!r} at global step {record['global_step']}, but "
                f"training is at step {trainer.global_step}: this store belongs to another run; "
                "record into a new store path"
            )
        self._write_record(trainer, pl_module, record)

    def _records(self) -> list[dict[str, Any]]:
        assert self.store is not None
        return list(self.store.manifest["records"].get(RECORDS_KEY, []))

    def _array_names(self, split: str) -> list[str]:
        names = [join_name("losses", split), join_name("preds", split)]
        if self.embeddings is not None:
            names.append(join_name("embeddings", split))
        return names + [join_name(self.array_prefix, split)]  # the output last: written last

    def _declare_record(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        """Rank 0: add the record to the manifest and grow every array by one record."""
        assert self.store is not None
        records = self._records()
        existing = [r for r in records if r["tag"] == tag]
        index = existing[0]["index"] if existing else len(records)
        for split, dataset in self.datasets.items():
            n = len(dataset)  # type: ignore[arg-type]
            with isolated_eval(pl_module):
                _, x, y = next(iter_batches(dataset, 0, 1, 1, self.parser, pl_module.device))
                probe = self._compute(pl_module, x, y)
            for name, values in zip(self._array_names(split), self._ordered(probe)):
                dtype = "int64" if name.startswith("preds/") else "float32"
                trailing = tuple(values.shape[1:])
                self.store.ensure_array(name, (index + 1, n, *trailing), dtype, row_axis=1, block_rows=self.block_rows)
                self.store.grow(name, max(index + 1, self.store.layout(name).shape[0]))
        if existing:  # arrays of every split now exist for it (a split may be new)
            return
        entry = {
            "tag": tag,
            "index": index,
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "output": self.output_name or getattr(self.output_fn, "__name__", "custom"),
            "splits": list(self.splits),
        }
        self.store.update_manifest(lambda m: m["records"].setdefault(RECORDS_KEY, []).append(entry))

    def _write_record(self, trainer: L.Trainer, pl_module: L.LightningModule, record: Mapping[str, Any]) -> None:
        """Every rank: compute and write this rank's incomplete row blocks of the record."""
        assert self.store is not None
        rank, world_size = world(trainer)
        lead = (int(record["index"]),)
        nan_rows: dict[str, list[int]] = {}
        with isolated_eval(pl_module):
            for split, dataset in self.datasets.items():
                names = self._array_names(split)
                layout = self.store.layout(names[-1])
                mine = set(rank_blocks(layout.n_blocks, rank, world_size))
                todo = {start for name in names for start, _ in self.store.incomplete_blocks(name, lead)}
                for block in sorted(mine):
                    start, stop = layout.block_range(block)
                    if start not in todo:
                        continue
                    parts = [self._compute(pl_module, x, y) for _, x, y in iter_batches(
                        dataset, start, stop, self.batch_size, self.parser, pl_module.device)]
                    columns = [torch.cat(col).cpu() for col in zip(*(self._ordered(p) for p in parts))]
                    bad = torch.nonzero(~torch.isfinite(columns[-1])).flatten()
                    nan_rows.setdefault(split, []).extend((bad + start).tolist())
                    for name, values in zip(names, columns):
                        self.store.write_block(name, start, values.numpy(), lead=lead)
        trainer.strategy.barrier("MarginRecorder.write")
        self._report_nonfinite(record, nan_rows)
        if trainer.is_global_zero:
            rank_zero_info(f"MarginRecorder: recorded {record['tag']} (step {record['global_step']}) to {self.store.path}")

    def _report_nonfinite(self, record: Mapping[str, Any], nan_rows: Mapping[str, list[int]]) -> None:
        for split, rows in nan_rows.items():
            if rows:
                self._nan_count += len(rows)
                warnings.warn(
                    f"MarginRecorder: {len(rows)} non-finite outputs in split {split!r} at record "
                    f"{record['tag']} (examples {rows[:10]}{' ...' if len(rows) > 10 else ''}); they are "
                    "stored as they are (NaN/inf). Check the model for overflow or a bad learning rate.",
                    RuntimeWarning,
                )

    @property
    def nonfinite_count(self) -> int:
        """How many non-finite outputs this recorder has seen (and warned about) so far."""
        return self._nan_count

    # ------------------------------------------------------------------ per-batch computation
    def _embedding_layer(self, pl_module: nn.Module) -> nn.Module:
        assert self.embeddings is not None
        try:
            return pl_module.get_submodule(self.embeddings)
        except AttributeError:
            names = [n for n, _ in pl_module.named_modules() if n]
            raise ValueError(
                f"no layer named {self.embeddings!r} in {type(pl_module).__name__}; layers are: {names}"
            ) from None

    def _compute(self, pl_module: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        captured: list[Tensor] = []
        handle = None
        if self.embeddings is not None:
            handle = self._embedding_layer(pl_module).register_forward_hook(
                lambda _m, _i, out: captured.append(out if isinstance(out, Tensor) else out[0])
            )
        try:
            logits = pl_module(x)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(logits, Tensor):
            raise TypeError(f"the module returned {type(logits).__name__}; recorders need logits as a Tensor")
        check_labels(logits, y)
        if self.output_name in FROM_LOGITS:
            out = FROM_LOGITS[self.output_name](logits, y)
        else:
            out = self.output_fn(pl_module, x, y)
        out = check_output(out, len(y))
        result = {
            "loss": loss_from_logits(logits, y).float(),
            "pred": logits.argmax(1).to(torch.int64),
            "output": out.float(),
        }
        if captured:
            result["embedding"] = captured[0].flatten(1).float()
        return result

    def _ordered(self, computed: Mapping[str, Tensor]) -> list[Tensor]:
        keys = ["loss", "pred"] + (["embedding"] if self.embeddings is not None else []) + ["output"]
        return [computed[k] for k in keys]


def read_margins(store: RunStore, split: str, prefix: str = "margins") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """All complete records of ``split``: ``(values [n_records, n_examples], record entries)``."""
    records = store.manifest["records"].get(RECORDS_KEY, [])
    name = join_name(prefix, split)
    values = store.read(name)
    return values, records
