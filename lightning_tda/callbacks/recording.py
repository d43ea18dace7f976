"""What every recorder shares: schedules, finding datasets, an isolated eval pass, DDP helpers.

A recorder runs its own pass over a dataset in eval mode, in order, in batches; row ``i`` is
example ``i``. The pass must not change training: :func:`isolated_eval` puts every submodule in
eval mode, disables grad, and restores the train/eval flags and all RNG states afterwards.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate
from typing_extensions import override

from lightning_tda import schema
from lightning_tda.data import BatchParser, TensorImageDataset
from lightning_tda.store import RunStore, StoreError, validate_name


@dataclass(frozen=True)
class RecordSchedule:
    """When to record: every ``every_n_epochs`` epochs, at listed epochs, every ``every_n_steps``
    optimizer steps, and/or at the end of fit. Epochs are the trainer's 0-based ``current_epoch``;
    an epoch's record is taken at its end."""

    every_n_epochs: int | None = None
    at_epochs: tuple[int, ...] | None = None
    every_n_steps: int | None = None
    on_fit_end: bool = False

    def __post_init__(self) -> None:
        for name in ("every_n_epochs", "every_n_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.at_epochs is not None and any((not isinstance(e, int)) or e < 0 for e in self.at_epochs):
            raise ValueError(f"at_epochs must be non-negative integers, got {self.at_epochs!r}")
        if not (self.every_n_epochs or self.at_epochs or self.every_n_steps or self.on_fit_end):
            raise ValueError(
                "nothing would be recorded: set every_n_epochs, at_epochs, every_n_steps or on_fit_end"
            )

    def at_epoch_end(self, epoch: int) -> bool:
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            return True
        return bool(self.at_epochs and epoch in self.at_epochs)

    def at_step(self, global_step: int) -> bool:
        return bool(self.every_n_steps and global_step > 0 and global_step % self.every_n_steps == 0)


def as_store(store: RunStore | str) -> RunStore | str:
    """Validate a store argument early; a path is opened lazily on the rank that needs it."""
    if isinstance(store, RunStore):
        return store
    if not isinstance(store, (str,)) and not hasattr(store, "__fspath__"):
        raise TypeError(f"store must be a RunStore or a path/URL, got {type(store).__name__}")
    return str(store)


def open_store(store: RunStore | str, trainer: L.Trainer) -> RunStore:
    """Open (rank 0 creates first, then everyone opens) the RunStore of a recorder."""
    if isinstance(store, RunStore):
        return store
    if trainer.is_global_zero:
        RunStore.create(store, exist_ok=True)
    trainer.strategy.barrier("lightning_tda.open_store")
    return RunStore(store)


def find_datasets(
    trainer: L.Trainer, splits: Sequence[str], datasets: Mapping[str, Dataset] | None
) -> dict[str, Dataset]:
    """Datasets to record, by split: explicit ``datasets``, else the datamodule's
    ``recording_dataset(split)``, else the dataset of its train/val dataloader."""
    found: dict[str, Dataset] = {}
    datamodule = getattr(trainer, "datamodule", None)
    for split in splits:
        validate_name(split, "split name")
        if datasets and split in datasets:
            found[split] = datasets[split]
            continue
        if datamodule is not None and hasattr(datamodule, "recording_dataset"):
            found[split] = datamodule.recording_dataset(split)
            continue
        loader_fn = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}.get(split)
        source = datamodule if datamodule is not None else trainer.lightning_module
        if loader_fn is None or source is None or not hasattr(source, loader_fn):
            raise ValueError(
                f"cannot find a dataset for split {split!r}: pass datasets={{'{split}': dataset}} "
                "to the recorder, or use a datamodule with train/val dataloaders"
            )
        loader = getattr(source, loader_fn)()
        found[split] = loader.dataset
    for split, dataset in found.items():
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(
                f"the {split!r} dataset is empty: there is nothing to record; drop {split!r} from "
                "splits or give a non-empty dataset"
            )
    return found


def fetch_rows(dataset: Dataset, start: int, stop: int, parser: BatchParser) -> tuple[Tensor, Tensor]:
    """Examples ``start..stop`` of ``dataset`` as a batch ``(x, y)`` (fast paths for tensor data)."""
    if isinstance(dataset, TensorImageDataset) and dataset.transform is None:
        return dataset.images[start:stop], dataset.targets[start:stop]
    if isinstance(dataset, TensorDataset):
        return parser(tuple(t[start:stop] for t in dataset.tensors))
    return parser(default_collate([dataset[i] for i in range(start, stop)]))


def iter_batches(
    dataset: Dataset, start: int, stop: int, batch_size: int, parser: BatchParser, device: torch.device
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(offset, x, y)`` for rows ``start..stop`` in order, moved to ``device``."""
    for lo in range(start, stop, batch_size):
        x, y = fetch_rows(dataset, lo, min(lo + batch_size, stop), parser)
        yield lo, torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)


@contextlib.contextmanager
def isolated_eval(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode, no grad (unless ``grad``), and every RNG state restored on exit."""
    modes = {m: m.training for m in module.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    module.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def unfinished_epoch_end(checkpoint: Mapping[str, Any]) -> int | None:
    """The epoch a Lightning checkpoint was taken at the end of, after its last batch but before
    its end-of-epoch hooks ran (``ModelCheckpoint(every_n_train_steps=...)`` on an epoch's last
    step, or at an end-of-epoch validation); None otherwise. Resuming from such a checkpoint,
    Lightning may skip that epoch's end, and the records due there with it; the weights restored
    are that epoch end's, so a recorder takes them at the start of training instead."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        epochs = loop["epoch_progress"]["current"]
        if loop["epoch_loop.batch_progress"]["is_last_batch"] and epochs["processed"] < epochs["started"]:
            return int(checkpoint["epoch"])
    except (KeyError, TypeError):  # not a fit checkpoint, or another Lightning's layout
        pass
    return None


class StoreRecorder(Callback):
    """What every recorder shares: its store, the run it belongs to, flushes at teardown and on
    errors (and wherever a subclass must leave nothing pending), and the epoch end a resume may
    skip.

    **Run identity.** A store belongs to one training run (its manifest's ``run_id``). Before a
    fit writes anything, each recorder *claims* the store: a resume (Lightning restored the
    recorder's state, which holds the run id) must find its own run there; a fresh fit must find
    the store empty of records, unless ``overwrite=True`` (on any recorder of that store), which
    clears the old records first and says so. So a second, different run never mixes its records
    into a store, and a resumed run goes on where it stopped.

    Subclasses set ``schedule`` and ``store``, say in :meth:`take_epoch_end` what they record at
    an epoch end, and in :meth:`initialise_store` what they write to the manifest once claimed."""

    schedule: RecordSchedule

    def __init__(self, overwrite: bool = False) -> None:
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        self.overwrite = overwrite
        self.store: RunStore | None = None
        self.store_arg: RunStore | str = ""
        self._unfinished_epoch: int | None = None  # see on_train_start
        self._run_id: str | None = None  # the run this fit records for, once claimed
        # Lightning restored this recorder's state (a resume), with the run id it recorded for
        # (plain values: callbacks are pickled into ddp_spawn's processes)
        self._resumed = False
        self._restored_run_id: str | None = None

    def take_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """Record (or save) what the schedule wants at the end of ``epoch``, with the current weights."""
        raise NotImplementedError

    def initialise_store(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0, once the store is claimed: first manifest entries (the model, by default)."""
        assert self.store is not None
        if self.store.manifest.get(schema.MODEL) is None:
            self.store.update_manifest(lambda m: m.__setitem__(schema.MODEL, model_description(pl_module)))

    def flush(self) -> None:
        """Wait until everything this recorder wrote is in the store (and listed there)."""
        if self.store is not None:
            self.store.flush()

    # ------------------------------------------------------------------ run identity
    def open(self, trainer: L.Trainer) -> RunStore:
        """Open (rank 0 creating it if needed) this recorder's store for a new fit."""
        self._run_id = None
        self.store = open_store(self.store_arg, trainer)
        return self.store

    def claim_run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = True) -> bool:
        """Make sure the store belongs to this fit's run before anything is written (see the
        class docstring); returns whether it is claimed. With ``final=False`` (at fit start) the
        decision waits when Lightning restores the recorder's state only later (strategies that
        restore a checkpoint after their setup)."""
        assert self.store is not None, f"{type(self).__name__} used before setup"
        if self._run_id is not None:
            return True
        resumed = self._resumed
        if not final and not resumed and trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup:
            return False
        problem: str | None = None
        clear = False
        if trainer.is_global_zero:
            problem, clear = self._decide(trainer, resumed)
        problem, clear = trainer.strategy.broadcast((problem, clear), src=0)
        if problem is not None:
            raise StoreError(problem)
        if clear and trainer.is_global_zero:
            cleared = self.store.clear_records()
            rank_zero_warn(f"{type(self).__name__}: overwrite=True cleared the old records of {self.store.path} ({cleared})")
        if trainer.is_global_zero:
            self.initialise_store(trainer, pl_module)
        trainer.strategy.barrier(f"{type(self).__name__}.claim_run")
        self.store.refresh()
        self._run_id = self.store.run_id
        return True

    def _decide(self, trainer: L.Trainer, resumed: bool) -> tuple[str | None, bool]:
        """Rank 0: ``(refusal message or None, whether to clear the store first)``."""
        assert self.store is not None
        store_id = self.store.run_id
        if resumed:
            restored = self._restored_run_id
            if restored is None or restored == store_id:
                return None, False
            return (
                f"this fit resumes a run that recorded into {self.store.path} as run {restored}, but "
                f"the store now holds another run ({self.store.describe_records()}); resume with the "
                "store that run recorded into, or start a fresh fit into a new store path",
                False,
            )
        if not self.store.holds_records():
            return None, False
        overwrite = any(
            cb.overwrite for cb in trainer.callbacks
            if isinstance(cb, StoreRecorder) and str(cb.store_arg) == str(self.store_arg)
        )
        if overwrite:
            return None, True
        return (
            f"the RunStore at {self.store.path} already holds another training run "
            f"({self.store.describe_records()}) and this fit is not a resume of it; record into a new "
            "store path, or pass overwrite=True to the recorder to clear those records first. To "
            "continue that run, resume from its Lightning checkpoint (trainer.fit(..., ckpt_path=...))",
            False,
        )

    # ------------------------------------------------------------------ lightning hooks
    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning is saving a checkpoint: everything before it must be in the store, since a
        # resume from it can no longer recompute it.
        self.flush()
        return {"store": str(self.store_arg), "run_id": self._run_id}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("store") != str(self.store_arg):
            warnings.warn(
                f"resuming a {type(self).__name__} that recorded into {state_dict.get('store')!r}, now "
                f"pointed at {str(self.store_arg)!r}: earlier records stay in the old store"
            )
        self._resumed = True
        self._restored_run_id = state_dict.get("run_id")

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._unfinished_epoch = unfinished_epoch_end(checkpoint)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.claim_run(trainer, pl_module)
        # Resumed from a checkpoint taken after an epoch's last batch, before its end: Lightning
        # may not replay that epoch's end, so take it now (the weights are that epoch end's; if
        # Lightning does replay it, the record or checkpoint is found there already).
        epoch, self._unfinished_epoch = self._unfinished_epoch, None
        if epoch is not None and self.schedule.at_epoch_end(epoch):
            self.take_epoch_end(trainer, pl_module, epoch)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flush()
        self._resumed = False  # the next fit is fresh unless Lightning restores this state again

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:  # keep what was recorded; the original exception is the one to see
            self.flush()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"{type(self).__name__}: a store write failed while handling another error: {err}")


def world(trainer: L.Trainer) -> tuple[int, int]:
    """``(global_rank, world_size)`` of the trainer."""
    return int(trainer.global_rank), int(trainer.world_size)


def learning_rates(trainer: L.Trainer) -> list[list[float]]:
    """The learning rate of every param group of every optimizer (TracIn weights checkpoints by it)."""
    return [[float(group["lr"]) for group in opt.param_groups] for opt in trainer.optimizers]


def model_description(module: nn.Module) -> dict[str, Any]:
    """Class and parameter count, for the manifest."""
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "num_parameters": int(sum(p.numel() for p in module.parameters())),
    }
