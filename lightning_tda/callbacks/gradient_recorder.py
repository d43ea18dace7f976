"""GradientRecorder: projected per-example gradients and out-to-loss terms at scheduled points."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_tda import schema
from lightning_tda.callbacks.block_recorder import ArraySpec, BlockRecorder
from lightning_tda.callbacks.recording import RecordSchedule, learning_rates
from lightning_tda.data import BatchFn
from lightning_tda.grads import GradientEngine, NonFiniteGradientError, make_gradient_engine
from lightning_tda.grads.projectors import IdentityProjection
from lightning_tda.outputs import OutputFn, out_to_loss_for
from lightning_tda.store import RunStore, StoreError

RECORDS_KEY = schema.GRADIENT_RECORDS


def learning_rate_columns(engine: GradientEngine, module: nn.Module, optimizers: Sequence[Any]) -> list[list[Any]]:
    """The learning rate of each range of feature columns, ``[[start, stop, lr], ...]``.

    A projection block mixes the parameters of one group (a layer's weight and bias), so its
    columns have one rate when the optimizer trains them at one rate, and ``None`` otherwise;
    with the identity projection every parameter has columns of its own. Parameters in no
    optimizer are not trained: rate 0. Adjacent ranges with equal rates are merged."""
    rate: dict[int, float] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                rate[id(p)] = float(group["lr"])
    named = dict(module.named_parameters())

    def rate_of(names: Sequence[str]) -> float | None:
        rates = {rate.get(id(named[n]), 0.0) for n in names}
        return rates.pop() if len(rates) == 1 else None

    ranges: list[list[Any]] = []
    projection = engine.projection
    if isinstance(projection, IdentityProjection):
        offset = 0
        for group in projection.groups:
            for name, shape in zip(group.param_names, group.param_shapes):
                size = int(torch.Size(shape).numel())
                ranges.append([offset, offset + size, rate_of([name])])
                offset += size
    else:
        for block in projection.blocks:
            ranges.append([block.offset, block.offset + block.k, rate_of(block.group.param_names)])
    merged: list[list[Any]] = []
    for start, stop, lr in ranges:
        if merged and merged[-1][2] == lr and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop, lr])
    return merged


class GradientRecorder(BlockRecorder):
    """Record projected per-example gradients of an output function (the margin by default).

    For each record and split it writes ``grads/<split>/<tag>`` ``[n_examples, proj_dim]`` (the
    projected gradient ``phi`` of the output ``f``) and ``out_to_loss/<split>/<tag>``
    ``[n_examples]``: ``q = -d loss / d f``, so that an example's loss gradient is ``-q phi``
    (TRAK's ``Q``). For the margin ``q = 1 - p_y``; for the loss ``q = -1``; for the correct-class
    probability ``q = 1 / p_y``; for a custom output it is unknown and stored as NaN.

    The record's manifest entry holds epoch, global step, which output was recorded
    (``"margin"``, ``"loss"``, ``"correct_class_probability"`` or ``"custom"``; the built-in
    functions of :mod:`lightning_tda.outputs` are recognised when passed as callables too), the
    learning rates of every optimizer's param groups, and the rate of each range of feature
    columns (TracIn weights each parameter group by its own rate). The manifest's ``projection``
    holds the engine's description, and a store whose projection differs is refused, so train and
    test features always share one projection.

    By default (``on_fit_end=True`` and no epochs) the final model only is recorded: the
    final-model-only setting of further training and TRAK with one checkpoint.
    ``every_n_epochs`` / ``at_epochs`` add records during training, as TracIn and
    multi-checkpoint TRAK need.

    Args:
        store: a :class:`~lightning_tda.store.RunStore` or a path/URL for one.
        proj_dim: projected dimension ``k``.
        engine: "factored" (hooks, no per-example gradient materialised) or "exact" (torch.func).
        every_n_epochs: record at the end of every n-th epoch (None: off).
        at_epochs: also record at the end of these 0-based epochs.
        on_fit_end: record when training ends (skipped if the last record is at the same step).
        splits: dataset splits to record.
        output_fn: "margin", "loss", "correct_class_probability" or ``fn(module, x, y)``.
        seed, projector: the projection (same seed and projector: the same matrix everywhere).
        dtype: "float16" halves the store; "float32" keeps full precision.
        params: parameter names to cover (default: all trainable).
        overwrite: a fresh fit into a store holding another run's records clears them first
            (else it is refused; a resume of the same run always goes on).
    """

    records_key = RECORDS_KEY
    needs_grad = True

    def __init__(
        self,
        store: RunStore | str,
        proj_dim: int = 2048,
        engine: Literal["factored", "exact"] = "factored",
        every_n_epochs: int | None = None,
        at_epochs: Sequence[int] | None = None,
        on_fit_end: bool = True,
        splits: Sequence[str] = ("train", "val"),
        output_fn: OutputFn | str | None = "margin",
        seed: int = 0,
        projector: Literal["rademacher", "gaussian"] = "rademacher",
        dtype: Literal["float16", "float32"] = "float32",
        params: Sequence[str] | None = None,
        batch_fn: BatchFn | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        batch_size: int = 128,
        block_rows: int = 1024,
        engine_options: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(proj_dim, int) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        if engine not in ("factored", "exact"):
            raise ValueError(f"engine must be 'factored' or 'exact', got {engine!r}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        schedule = RecordSchedule(
            every_n_epochs=every_n_epochs,
            at_epochs=tuple(at_epochs) if at_epochs is not None else None,
            on_fit_end=on_fit_end,
        )
        super().__init__(store, splits, schedule, batch_fn, datasets, batch_size, block_rows, overwrite)
        self.proj_dim = proj_dim
        self.engine_name = engine
        self.output_fn = output_fn
        self.seed = seed
        self.projector = projector
        self.dtype = dtype
        self.params = list(params) if params is not None else None
        self.engine_options = dict(engine_options or {})
        self.engine: GradientEngine | None = None

    def build_engine(self, module: nn.Module) -> GradientEngine:
        """The gradient engine this recorder uses on ``module``."""
        return make_gradient_engine(
            self.engine_name, module, proj_dim=self.proj_dim, seed=self.seed, projector=self.projector,
            output_fn=self.output_fn, params=self.params, **self.engine_options,
        )

    def validate_setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.store is not None
        self.engine = self.build_engine(pl_module)
        description = self.engine.describe()
        recorded = self.store.manifest.get(schema.PROJECTION)
        if recorded is not None and (self.overwrite or not self.store.holds_records()):
            recorded = None  # records to be cleared (overwrite=True), or none left of that projection
        if recorded is not None and recorded != description:
            raise StoreError(
                f"the RunStore at {self.store.path} holds gradients under another projection "
                f"(engine {recorded.get('engine')}, k={recorded.get('proj_dim')}, seed {recorded.get('seed')}) "
                f"than this recorder's (engine {description['engine']}, k={description['proj_dim']}, "
                f"seed {description['seed']}); scores need one projection: record into a new store"
            )

    def initialise_store(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.store is not None and self.engine is not None
        description = self.engine.describe()
        if self.store.manifest.get(schema.PROJECTION) != description:
            self.store.update_manifest(lambda m: m.__setitem__(schema.PROJECTION, description))
        super().initialise_store(trainer, pl_module)

    @property
    def output_name(self) -> str:
        """The recorded output: a built-in's name (also when passed as a function), else "custom"."""
        name = self.engine.output.name if self.engine is not None else str(self.output_fn or schema.OUTPUT_MARGIN)
        builtins = (schema.OUTPUT_MARGIN, schema.OUTPUT_LOSS, schema.OUTPUT_PROBABILITY)
        return name if name in builtins else schema.OUTPUT_CUSTOM

    def describe_record(self, trainer: L.Trainer) -> dict[str, Any]:
        assert self.engine is not None, "GradientRecorder used before setup"
        return {
            schema.LEARNING_RATES: learning_rates(trainer),
            schema.LEARNING_RATE_COLUMNS: learning_rate_columns(self.engine, trainer.lightning_module, trainer.optimizers),
            schema.OUTPUT: self.output_name,
        }

    def array_specs(self, split: str, record: Mapping[str, Any], probe: Sequence[Tensor]) -> list[ArraySpec]:
        tag = str(record[schema.TAG])
        return [
            ArraySpec(schema.out_to_loss_array(split, tag), (), "float32"),
            ArraySpec(schema.gradients_array(split, tag), (int(probe[-1].shape[1]),), self.dtype),
        ]

    def compute_batch(self, module: nn.Module, x: Tensor, y: Tensor, offset: int = 0) -> list[Tensor]:
        assert self.engine is not None, "GradientRecorder used before setup"
        try:
            feats = self.engine.project(x, y)
        except NonFiniteGradientError as err:
            rows = [offset + i for i in err.indices]
            raise FloatingPointError(
                f"GradientRecorder: non-finite (NaN/inf) gradients for {len(rows)} examples, at dataset "
                f"rows {rows[:20]}{' ...' if len(rows) > 20 else ''}; nothing of this block was written. "
                "Inspect those examples, or lower the learning rate if the model diverged"
            ) from err
        logits = self.engine.last_logits
        q = out_to_loss_for(self.output_name, None if logits is None else logits.detach(), y, len(x))
        return [q.float().to(feats.device), feats.to(getattr(torch, self.dtype))]
