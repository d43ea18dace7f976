"""MarginRecorder: per-example margins, losses and predictions over whole splits during training."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_tda import schema
from lightning_tda.callbacks.block_recorder import ArraySpec, BlockRecorder
from lightning_tda.callbacks.recording import RecordSchedule
from lightning_tda.data import BatchFn
from lightning_tda.outputs import (
    FROM_LOGITS, OUTPUT_FNS, OutputFn, check_labels, check_output, loss_from_logits, resolve_output_fn,
)
from lightning_tda.store import RunStore, StoreError

RECORDS_KEY = schema.MARGIN_RECORDS
LOGITS_KEY = schema.LOGITS
_LOGITS_PER_COLUMNS = 2**22  # logits held before a block's columns are computed (16 MiB float32)


class MarginRecorder(BlockRecorder):
    """Record per-example outputs of every example of each split, at scheduled epochs.

    Each record is a pass of its own over each split's dataset, in eval mode, in order, in batches
    (so row ``i`` is example ``i``). It writes, per split, ``margins/<split>`` (or
    ``outputs/<split>`` for a non-margin ``output_fn``), ``losses/<split>``, ``preds/<split>``,
    with ``embeddings="layer.name"`` ``embeddings/<split>`` (the layer's flattened output) and with
    ``logits=True`` ``logits/<split>`` (the model's outputs, ``[..., n_classes]``: what ensembles,
    temperature scaling and the diversity analysis need), each ``[n_records, n_examples, ...]``. Records are listed in the manifest with epoch and global step.

    On an ensemble (:class:`~lightning_tda.ensemble.EnsembleModule`, logits ``[M, batch, C]``)
    each array gains a last axis with one column per copy: ``margins/<split>[record, example, m]``.

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
        logits: also record the logits (read them with :func:`read_logits`).
        datasets: explicit ``{split: dataset}``; otherwise taken from the datamodule.
        batch_size: examples per forward pass of the recording pass (None: sized from the
            input, about 2^13 input numbers a batch).
        block_rows: rows per block (the unit of crash-safe writing and of DDP work division);
            None: one block per rank, between 1,024 and 65,536 rows.
        overwrite: a fresh fit into a store holding another run's records clears them first
            (else it is refused; a resume of the same run always goes on).
    """

    records_key = RECORDS_KEY

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
        batch_size: int | None = None,
        block_rows: int | None = None,
        logits: bool = False,
        overwrite: bool = False,
    ) -> None:
        schedule = RecordSchedule(
            every_n_epochs=every_n_epochs,
            at_epochs=tuple(at_epochs) if at_epochs is not None else None,
            on_fit_end=on_fit_end,
        )
        super().__init__(store, splits, schedule, batch_fn, datasets, batch_size, block_rows, overwrite)
        self.output_fn = resolve_output_fn(output_fn)
        # a built-in passed as a function is recognised by its name
        self.output_name = next((name for name, fn in OUTPUT_FNS.items() if fn is self.output_fn), None)
        self.array_prefix = schema.MARGINS if self.output_name == schema.OUTPUT_MARGIN else schema.OUTPUTS
        self.embeddings = embeddings
        self.logits = bool(logits)
        self._channels_last: bool | None = None  # unknown until the first image batch
        self._conv_hooks: list[Any] = []  # while a pass runs (_channels_last_convs)

    def validate_setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.embeddings is not None:
            self._embedding_layer(pl_module)

    def describe_record(self, trainer: L.Trainer) -> dict[str, Any]:
        return {schema.OUTPUT: self.output_name or schema.OUTPUT_CUSTOM}

    def array_specs(self, split: str, record: Mapping[str, Any], probe: Sequence[Tensor]) -> list[ArraySpec]:
        lead = (int(record[schema.INDEX]),)
        names = [schema.LOSSES, schema.PREDS] + ([schema.EMBEDDINGS] if self.embeddings is not None else [])
        names += ([LOGITS_KEY] if self.logits else []) + [self.array_prefix]
        return [
            ArraySpec(schema.record_array(name, split), tuple(col.shape[1:]), "int64" if name == schema.PREDS else "float32", lead)
            for name, col in zip(names, probe)
        ]

    def _embedding_layer(self, pl_module: nn.Module) -> nn.Module:
        assert self.embeddings is not None
        try:
            return pl_module.get_submodule(self.embeddings)
        except AttributeError:
            names = [n for n, _ in pl_module.named_modules() if n]
            raise ValueError(
                f"no layer named {self.embeddings!r} in {type(pl_module).__name__}; layers are: {names}"
            ) from None

    def compute_batch(self, module: nn.Module, x: Tensor, y: Tensor, offset: int = 0) -> list[Tensor]:
        captured: list[Tensor] = []
        handle = None
        if self.embeddings is not None:
            handle = self._embedding_layer(module).register_forward_hook(
                lambda _m, _i, out: captured.append(out if isinstance(out, Tensor) else out[0])
            )
        try:
            with self._channels_last_convs(module):
                logits = self._forward(module, x)
        finally:
            if handle is not None:
                handle.remove()
        return self._columns(module, logits, x, y, captured)

    def compute_block(self, module: nn.Module, batches: Iterable[tuple[int, Tensor, Tensor]]) -> list[Tensor]:
        """With a built-in output and no embeddings, the block's forward passes run first and
        its columns are computed once from all their logits: per-batch post-processing (margin,
        loss, argmax, label checks) cost about as much as digits' forward pass itself."""
        with self._channels_last_convs(module):
            if self.embeddings is not None or self.output_name not in FROM_LOGITS:
                return super().compute_block(module, batches)
            parts: list[list[Tensor]] = []
            logits: list[Tensor] = []
            labels: list[Tensor] = []
            held = 0
            for _, x, y in batches:
                out = self._forward(module, x)
                if not isinstance(out, Tensor):
                    raise TypeError(f"the module returned {type(out).__name__}; recorders need logits as a Tensor")
                logits.append(out)
                labels.append(y)
                held += out.numel()
                if held >= _LOGITS_PER_COLUMNS:  # bounded memory for many classes
                    parts.append(self._columns_of(module, logits, labels))
                    logits, labels, held = [], [], 0
            if logits:
                parts.append(self._columns_of(module, logits, labels))
        return [torch.cat(col) for col in zip(*parts)]

    def _columns_of(self, module: nn.Module, logits: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        # the batch axis is -2 for [batch, classes] and for an ensemble's [copies, batch, classes]
        columns = self._columns(module, torch.cat(logits, dim=-2), None, torch.cat(labels))
        return [c.detach().cpu() for c in columns]

    def _columns(
        self, module: nn.Module, logits: Tensor, x: Tensor | None, y: Tensor, captured: Sequence[Tensor] = ()
    ) -> list[Tensor]:
        """The columns (loss, prediction, [embedding,] output) of a batch's logits; ``x`` is
        needed only by a custom ``output_fn``."""
        if not isinstance(logits, Tensor):
            raise TypeError(f"the module returned {type(logits).__name__}; recorders need logits as a Tensor")
        if logits.ndim == 3:
            return self._ensemble_columns(module, logits, x, y)
        check_labels(logits, y)
        if self.output_name in FROM_LOGITS:
            out = FROM_LOGITS[self.output_name](logits, y)
        else:
            assert x is not None
            out = self.output_fn(module, x, y)
        out = check_output(out, len(y))
        columns = [loss_from_logits(logits, y).float(), logits.argmax(1).to(torch.int64)]
        if self.embeddings is not None:
            columns.append(captured[0].flatten(1).float())
        if self.logits:
            columns.append(logits.float())
        return columns + [out.float()]

    @contextlib.contextmanager
    def _channels_last_convs(self, module: nn.Module) -> Iterator[None]:
        """Hooks that keep every convolution's output channels-last while a pass runs (see
        :meth:`_forward`); registered once per pass, not per batch."""
        if self._conv_hooks or self._channels_last is False:
            yield
            return
        self._conv_hooks = [
            m.register_forward_hook(self._conv_output_channels_last) for m in module.modules() if isinstance(m, nn.Conv2d)
        ]
        try:
            yield
        finally:
            for handle in self._conv_hooks:
                handle.remove()
            self._conv_hooks = []

    def _conv_output_channels_last(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if self._channels_last is False or not isinstance(output, Tensor) or output.ndim != 4 or output.device.type != "cpu":
            return output
        try:
            return output.contiguous(memory_format=torch.channels_last)
        except RuntimeError:  # e.g. inside vmap (an ensemble's stacked copies): leave it as it is
            return output

    def _forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)``; on the CPU, image batches and (inside :meth:`_channels_last_convs`)
        every convolution's output go channels-last, which oneDNN runs much faster in eval
        (measured: a 3x32x32 CNN's forward 2-3x; max-pooling a 128x32x8x8 batch 18x). Converting
        conv outputs matters when the input has one channel, whose channels-last layout is also
        the plain one and would not carry on through the network. A model that cannot take it
        (``.view`` on a channels-last activation, say) is run as given from then on."""
        if self._channels_last is not False and x.ndim == 4 and x.is_floating_point() and x.device.type == "cpu":
            try:
                out = module(x.contiguous(memory_format=torch.channels_last))
                self._channels_last = True
                return out
            except RuntimeError:
                if self._channels_last:
                    raise
                self._channels_last = False
        return module(x)

    def _ensemble_columns(self, module: nn.Module, logits: Tensor, x: Tensor | None, y: Tensor) -> list[Tensor]:
        """An ensemble (``EnsembleModule``: logits ``[M, batch, C]``): one column per copy,
        so every array gains a last axis of copies (``margins[record, example, copy]``)."""
        if self.embeddings is not None:
            raise ValueError(
                "embeddings are not recorded for an ensemble (its layers hold M stacked copies); "
                "record them per copy from EnsembleModule.member(m), or drop embeddings="
            )
        copies, batch, classes = logits.shape
        flat, labels = logits.reshape(copies * batch, classes), y.repeat(copies)
        check_labels(flat, labels)

        def per_copy(values: Tensor) -> Tensor:
            return values.reshape(copies, batch).T

        if self.output_name in FROM_LOGITS:
            out = per_copy(FROM_LOGITS[self.output_name](flat, labels))
        elif hasattr(module, "batch_outputs"):
            out = module.batch_outputs(x, y, self.output_fn).T  # type: ignore[operator]
        else:
            raise TypeError(
                f"{type(module).__name__} returns [M, batch, classes] logits but has no batch_outputs(); "
                "use a built-in output_fn name"
            )
        columns = [per_copy(loss_from_logits(flat, labels)).float(), per_copy(flat.argmax(1)).to(torch.int64)]
        if self.logits:
            columns.append(logits.permute(1, 2, 0).float())  # [batch, classes, copy]
        return columns + [out.float()]


def read_margins(store: RunStore, split: str, prefix: str = schema.MARGINS) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The complete records of ``split``: ``(values [n_complete, n_examples], their manifest entries)``.

    A record a crash left unfinished is skipped until a resumed run completes it."""
    name = schema.record_array(prefix, split)
    records = [
        r for r in store.manifest[schema.RECORDS].get(RECORDS_KEY, [])
        if split in r.get(schema.SPLITS, [split]) and store.completed_blocks(name, (int(r[schema.INDEX]),)).all()
    ]
    values = store.read(name)[[int(r[schema.INDEX]) for r in records]] if records else np.empty((0, 0), np.float32)
    return values, records


def read_logits(store: RunStore, split: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The recorded logits of ``split`` (``MarginRecorder(..., logits=True)``): ``(values
    [n_complete, n_examples, n_classes] (an ensemble's: ``[..., n_classes, copy]``), their
    manifest entries)``; a :class:`~lightning_tda.store.StoreError` that says how to record them
    when the store has none."""
    if not store.has_array(schema.record_array(LOGITS_KEY, split)):
        raise StoreError(
            f"{store.path} has no recorded logits for split {split!r} (it holds {store.array_names()}); "
            "record them with MarginRecorder(..., logits=True)"
        )
    return read_margins(store, split, prefix=LOGITS_KEY)
