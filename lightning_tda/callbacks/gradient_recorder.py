"""GradientRecorder: projected per-example gradients and out-to-loss terms at scheduled points."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_tda.callbacks.block_recorder import ArraySpec, BlockRecorder
from lightning_tda.callbacks.recording import RecordSchedule, learning_rates
from lightning_tda.data import BatchFn
from lightning_tda.grads import GradientEngine, NonFiniteGradientError, make_gradient_engine
from lightning_tda.outputs import OutputFn, out_to_loss_from_logits
from lightning_tda.store import RunStore, StoreError, join_name

RECORDS_KEY = "grads"


class GradientRecorder(BlockRecorder):
    """Record projected per-example gradients of an output function (the margin by default).

    For each record and split it writes ``grads/<split>/<tag>`` ``[n_examples, proj_dim]`` and
    ``out_to_loss/<split>/<tag>`` ``[n_examples]`` (TRAK's ``Q``: ``1 - p_y`` for the margin, 1 for
    the loss). The record's manifest entry holds epoch, global step and the learning rates (TracIn
    weights checkpoints by them); the manifest's ``projection`` holds the engine's description,
    and a store whose projection differs is refused, so train and test features always share one
    projection.

    ``at="fit_end"`` (the default) records the final model only: the final-model-only setting of
    further training and TRAK with one checkpoint. ``every_n_epochs`` / ``at_epochs`` add records
    during training, as TracIn and multi-checkpoint TRAK need.

    Args:
        store: a :class:`~lightning_tda.store.RunStore` or a path/URL for one.
        proj_dim: projected dimension ``k``.
        engine: "factored" (hooks, no per-example gradient materialised) or "exact" (torch.func).
        at: "fit_end" to record at the end of training, or None.
        every_n_epochs, at_epochs: record at these epoch ends too.
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
        at: Literal["fit_end"] | None = "fit_end",
        every_n_epochs: int | None = None,
        at_epochs: Sequence[int] | None = None,
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
        if at not in ("fit_end", None):
            raise ValueError(f"at must be 'fit_end' or None, got {at!r}; use every_n_epochs/at_epochs for epochs")
        if not isinstance(proj_dim, int) or proj_dim <= 0:
            raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        if engine not in ("factored", "exact"):
            raise ValueError(f"engine must be 'factored' or 'exact', got {engine!r}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        schedule = RecordSchedule(
            every_n_epochs=every_n_epochs,
            at_epochs=tuple(at_epochs) if at_epochs is not None else None,
            on_fit_end=at == "fit_end",
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
        recorded = self.store.manifest.get("projection")
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
        if self.store.manifest.get("projection") != description:
            self.store.update_manifest(lambda m: m.__setitem__("projection", description))
        super().initialise_store(trainer, pl_module)

    def describe_record(self, trainer: L.Trainer) -> dict[str, Any]:
        return {"learning_rates": learning_rates(trainer), "output": str(self.output_fn)}

    def array_specs(self, split: str, record: Mapping[str, Any], probe: Sequence[Tensor]) -> list[ArraySpec]:
        tag = str(record["tag"])
        return [
            ArraySpec(join_name("out_to_loss", split, tag), (), "float32"),
            ArraySpec(join_name("grads", split, tag), (int(probe[-1].shape[1]),), self.dtype),
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
        if self.output_fn in ("margin", None) and logits is not None:
            q = out_to_loss_from_logits(logits.detach(), y)
        else:
            q = torch.ones(len(x), device=feats.device)
        return [q.float(), feats.to(getattr(torch, self.dtype))]
