"""CheckpointRecorder: the weights at scheduled points, as safetensors, with the learning rates."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
from typing_extensions import override

from lightning_tda import schema
from lightning_tda.callbacks.recording import (
    RecordSchedule,
    StoreRecorder,
    as_store,
    learning_rates,
)
from lightning_tda.store import RunStore


def checkpoint_tag(epoch: int, global_step: int) -> str:
    """The tag of a checkpoint taken at ``(epoch, global_step)``, e.g. ``epoch=3-step=120``."""
    return f"epoch={epoch}-step={global_step}"


class CheckpointRecorder(StoreRecorder):
    """Save the module's state (parameters and buffers) into the RunStore at scheduled points.

    Checkpoints are safetensors (loading never unpickles) with metadata: epoch, global step and the
    learning rate of every param group of every optimizer (TracIn weights checkpoints by it). Under
    DDP rank 0 writes (weights are replicated) and the others wait. A checkpoint already in the
    store at the same step (a resumed run) is not written twice. Each file is complete when its
    save returns; the manifest lists them in batches, before any Lightning checkpoint, at the
    end of fit and on errors (:meth:`RunStore.checkpoints` also finds those not listed yet).

    Args:
        store: a :class:`~lightning_tda.store.RunStore` or a path/URL for one.
        every_n_epochs: save at the end of every n-th epoch (None: off).
        at_epochs: also save at the end of these 0-based epochs.
        on_fit_end: save when training ends (unless already saved at that step).
        every_n_steps: also save after every n-th optimizer step (checkpoints only; the other
            recorders take the first three scheduling arguments, in this order).
        overwrite: a fresh fit into a store holding another run's records clears them first
            (else it is refused; a resume of the same run always goes on).
    """

    def __init__(
        self,
        store: RunStore | str,
        every_n_epochs: int | None = 1,
        at_epochs: Sequence[int] | None = None,
        on_fit_end: bool = True,
        every_n_steps: int | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__(overwrite)
        self.store_arg = as_store(store)
        self.schedule = RecordSchedule(
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            at_epochs=tuple(at_epochs) if at_epochs is not None else None,
            on_fit_end=on_fit_end,
        )
        self._saved_steps: set[int] | None = None  # global steps with a checkpoint in the store

    @property
    def state_key(self) -> str:
        return self._generate_state_key(store=str(self.store_arg))

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.open(trainer)
        self._saved_steps = None  # read once the store is claimed for this fit

    def initialise_store(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.store is not None
        self.store.checkpoints(list_found=True)  # a killed run may have saved some it had not listed
        super().initialise_store(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.claim_run(trainer, pl_module, final=False)

    def _saved_steps_now(self) -> set[int]:
        assert self.store is not None
        return {int(meta.get(schema.GLOBAL_STEP, -1)) for meta in self.store.checkpoints().values()}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.schedule.at_step(trainer.global_step):
            self.save(trainer, pl_module)

    def take_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        self.save(trainer, pl_module, epoch=epoch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_epoch_end(trainer.current_epoch):
            self.save(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.on_fit_end:
            self.save(trainer, pl_module)
        self.flush()  # the manifest lists the checkpoints saved (saves list them in batches)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int | None = None) -> str:
        """Save the current weights (rank 0), unless a checkpoint at this step exists; return its
        tag. ``epoch``: the trainer's by default."""
        assert self.store is not None, "CheckpointRecorder.save called before setup"
        self.claim_run(trainer, pl_module)
        if self._saved_steps is None:
            self._saved_steps = self._saved_steps_now()
        epoch = trainer.current_epoch if epoch is None else epoch
        tag = checkpoint_tag(epoch, trainer.global_step)
        # the tag holds the step, so one saved at this step (a resumed run) is never rewritten
        if trainer.is_global_zero and trainer.global_step not in self._saved_steps:
            self.store.save_checkpoint(
                tag,
                pl_module.state_dict(),
                {
                    schema.EPOCH: int(epoch),
                    schema.GLOBAL_STEP: int(trainer.global_step),
                    schema.LEARNING_RATES: learning_rates(trainer),
                },
                list_now=False,  # listed at the next flush, with the others (one manifest write)
            )
            self._saved_steps.add(int(trainer.global_step))
        trainer.strategy.barrier("CheckpointRecorder.save")
        return tag
