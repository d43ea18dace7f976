"""SubsetSweep: many models, each trained on a random alpha-fraction of the training set, with
every model's per-example outputs recorded: the data of datamodels and of the LDS.

The models are cut into *blocks* of ``models_per_block``; one block is one
:class:`~lightning_tda.ensemble.EnsembleModule` fit (all its models at once) and one row block of
the store's arrays::

    sweep/masks            [num_models, n_train]  bool
    sweep/<split>          [num_models, n_<split>] float32 outputs (margins by default)

Everything a block's result depends on is derived from ``(seed, block index)`` — its models' init
seeds, masks and batch order — so blocks can be trained in any order, by any process: shards
(``shard_index``/``num_shards``) write disjoint blocks of one store, a killed sweep resumes by
training only blocks that are not complete, and the result equals one uninterrupted process's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_tda.data import dataset_fingerprint
from lightning_tda.ensemble import EnsembleModule, indexed_loader, random_subset_masks
from lightning_tda.ensemble.data import mix_seed
from lightning_tda import schema
from lightning_tda.store import RunStore, StoreError, validate_name

SWEEP_KEY = schema.SWEEP


@dataclass
class SubsetSweep:
    """Train ``num_models`` models on random ``alpha``-subsets and record their outputs.

    Args:
        store: RunStore (or path) the sweep writes to; shards share it.
        model_fn: ``() -> nn.Module``, the architecture (initialised under each model's seed).
        train_dataset: the training set the masks index.
        eval_datasets: ``{split: dataset}`` whose per-example outputs every model records.
        num_models, alpha, seed: the sweep; masks and init seeds derive from ``seed``.
        models_per_block: models trained at once by one EnsembleModule (and one row block).
        epochs, batch_size, lr, optimizer, momentum, weight_decay: each model's training.
        output_fn: recorded output ("margin", "loss", "correct_class_probability").
        shard_index, num_shards: this process trains blocks ``b`` with ``b % num_shards == shard_index``.
        trainer_kwargs: extra ``lightning.Trainer`` arguments (precision, ...).
        overwrite: clear a store that holds another sweep or a training run's records (else
            refused); never while other shards of this sweep run.
        accelerator, devices: Lightning's, for each block's fit ("auto": a GPU when there is one).
            On a machine with several GPUs, run one shard per GPU with ``devices=1`` each.
    """

    store: RunStore | str
    model_fn: Callable[[], nn.Module]
    train_dataset: Dataset
    eval_datasets: Mapping[str, Dataset]
    num_models: int = 64
    alpha: float = 0.5
    seed: int = 0
    models_per_block: int = 32
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    output_fn: str = "margin"
    shard_index: int = 0
    num_shards: int = 1
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    overwrite: bool = False
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_models, int) or self.num_models < 1:
            raise ValueError(f"num_models must be a positive integer, got {self.num_models!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}; it is the fraction of training examples per model")
        if self.models_per_block < 1:
            raise ValueError(f"models_per_block must be positive, got {self.models_per_block}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}")
        if not self.eval_datasets:
            raise ValueError("eval_datasets is empty: give at least one {split: dataset} to record")
        for split, ds in self.eval_datasets.items():
            validate_name(split, "split name")
            if len(ds) == 0:  # type: ignore[arg-type]
                raise ValueError(f"the {split!r} dataset is empty")
        if len(self.train_dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the training dataset is empty")
        if isinstance(self.store, str) or not isinstance(self.store, RunStore):
            self.store = RunStore.create(self.store, exist_ok=True)

    # ------------------------------------------------------------------ layout
    @property
    def n_blocks(self) -> int:
        return -(-self.num_models // self.models_per_block)

    def config(self) -> dict[str, Any]:
        """What defines the sweep's results (checked when a store is reused)."""
        return {
            "num_models": self.num_models, "alpha": self.alpha, "seed": self.seed,
            "models_per_block": self.models_per_block, "epochs": self.epochs, "batch_size": self.batch_size,
            "lr": self.lr, "optimizer": self.optimizer, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "output_fn": self.output_fn,
            "splits": sorted(self.eval_datasets),
        }

    def masks(self) -> torch.Tensor:
        """All models' masks ``[num_models, n_train]`` (the same in every shard)."""
        return random_subset_masks(self.num_models, len(self.train_dataset), self.alpha, self.seed)  # type: ignore[arg-type]

    def prepare(self) -> None:
        """Create the arrays and record the sweep in the manifest (idempotent; shards may all call it)."""
        store = self.store
        assert isinstance(store, RunStore)
        recorded = store.manifest.get(SWEEP_KEY)
        # A sweep's identity is its settings: shards of one sweep share the store, anything else
        # is refused (or cleared with overwrite=True, which must not run beside other shards).
        other = None
        if recorded is not None and recorded != self.config():
            changed = sorted(k for k in set(recorded) | set(self.config()) if recorded.get(k) != self.config().get(k))
            other = f"another sweep (settings differ in {changed})"
        elif recorded is None and store.holds_records():
            other = f"records of a training run ({store.describe_records()})"
        if other is not None:
            if not self.overwrite:
                raise StoreError(
                    f"the store at {store.path} holds {other}; use a new store path for this sweep, "
                    "or overwrite=True to clear it first (never while other shards of it run)"
                )
            warnings.warn(f"SubsetSweep: overwrite=True cleared {store.path} ({store.clear_records()})")
            recorded = None
        store.set_fingerprint(schema.TRAIN_SPLIT, dataset_fingerprint(self.train_dataset))
        for split, ds in self.eval_datasets.items():
            store.set_fingerprint(split, dataset_fingerprint(ds))
        n_train = len(self.train_dataset)  # type: ignore[arg-type]
        store.ensure_array(schema.sweep_masks_array(), (self.num_models, n_train), "bool", block_rows=self.models_per_block)
        for split, ds in self.eval_datasets.items():
            store.ensure_array(schema.sweep_outputs_array(split), (self.num_models, len(ds)), "float32", block_rows=self.models_per_block)  # type: ignore[arg-type]
        if recorded is None:
            store.update_manifest(lambda m: m.__setitem__(SWEEP_KEY, self.config()))

    def _arrays(self) -> list[str]:
        return [schema.sweep_masks_array()] + [schema.sweep_outputs_array(s) for s in sorted(self.eval_datasets)]

    def pending_blocks(self) -> list[int]:
        """This shard's blocks that are not complete yet."""
        assert isinstance(self.store, RunStore)
        todo: set[int] = set()
        for name in self._arrays():
            todo |= {start // self.models_per_block for start, _ in self.store.incomplete_blocks(name)}
        return sorted(b for b in todo if b % self.num_shards == self.shard_index)

    # ------------------------------------------------------------------ work
    def train_block(self, block: int, masks: torch.Tensor | None = None) -> EnsembleModule:
        """Train block ``block``'s models at once; deterministic given ``(seed, block)``.
        ``masks``: all models' masks when the caller has them (else generated)."""
        lo = block * self.models_per_block
        hi = min(lo + self.models_per_block, self.num_models)
        masks = (self.masks() if masks is None else masks)[lo:hi]
        module = EnsembleModule(
            self.model_fn, num_models=hi - lo, seeds=[mix_seed(self.seed, m) for m in range(lo, hi)], masks=masks,
            lr=self.lr, optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,  # type: ignore[arg-type]
        )
        kwargs = dict(
            max_epochs=self.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator=self.accelerator, devices=self.devices,
        )
        kwargs.update(self.trainer_kwargs)
        trainer = L.Trainer(**kwargs)
        loader = indexed_loader(self.train_dataset, self.batch_size, seed=mix_seed(self.seed, 10_000 + block))
        trainer.fit(module, train_dataloaders=loader)
        return module

    def run(self) -> RunStore:
        """Train and record this shard's pending blocks; returns the store."""
        store = self.store
        assert isinstance(store, RunStore)
        self.prepare()
        pending = self.pending_blocks()
        masks = self.masks()
        for block in tqdm(pending, desc=f"subset sweep (shard {self.shard_index}/{self.num_shards})", disable=not self.progress):
            lo = block * self.models_per_block
            hi = min(lo + self.models_per_block, self.num_models)
            module = self.train_block(block, masks)
            for split in sorted(self.eval_datasets):
                outputs = module.outputs(self.eval_datasets[split], self.output_fn)
                store.write_block(schema.sweep_outputs_array(split), lo, outputs.numpy())
            store.write_block(schema.sweep_masks_array(), lo, masks[lo:hi].numpy())  # last: marks the block done
        return store


def read_sweep(store: RunStore, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [n_models, n_train], outputs [n_models, n_split])`` of the complete models only."""
    done = store.completed_blocks(schema.sweep_masks_array())
    layout = store.layout(schema.sweep_masks_array())
    rows = np.concatenate([np.arange(*layout.block_range(b)) for b in np.flatnonzero(done)]) if done.any() else np.array([], int)
    masks = store.read(schema.sweep_masks_array())[rows]
    outputs = store.read(schema.sweep_outputs_array(split))[rows]
    return masks, outputs


def sweep_progress(store: RunStore) -> tuple[int, int]:
    """``(complete models, total models)`` of the sweep in ``store``."""
    layout = store.layout(schema.sweep_masks_array())
    done = store.completed_blocks(schema.sweep_masks_array())
    complete = sum(layout.block_range(b)[1] - layout.block_range(b)[0] for b in np.flatnonzero(done))
    return int(complete), layout.n_rows


__all__: Sequence[str] = ["SubsetSweep", "read_sweep", "sweep_progress"]
