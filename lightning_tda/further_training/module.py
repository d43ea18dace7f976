"""``FurtherTraining``: the further-training gold standard as a LightningModule, for users who
want the Trainer (loggers, checkpoint/resume, accelerators).

It runs exactly what :func:`~lightning_tda.further_training.further_training_scores` runs (the
same :class:`~lightning_tda.further_training.run.FurtherTrainingRun`, tested equal): ``len(seeds)
* K`` optimizer steps, every step a function of the global step alone, so a fit resumed from a
Lightning checkpoint continues exactly where it stopped (the copies, the optimizer state and the
scores so far are in the checkpoint)::

    module = FurtherTraining(final_model, train, test, instances=range(100),
                             steps=epoch_steps(range(1, 11), len(train), 64), seeds=5)
    trainer = L.Trainer(max_steps=module.total_steps, logger=WandbLogger(...))
    trainer.fit(module)
    result = module.result()        # a FurtherTrainingResult

One device: all copies of a seed live on it. To spread a large computation over devices or
machines, shard it: separate fits on disjoint ``instances`` (or ``seeds``), then combine.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.data import BatchFn
from lightning_tda.further_training.gold import build_run, check_finite
from lightning_tda.further_training.replicas import LossFn
from lightning_tda.further_training.result import FurtherTrainingResult
from lightning_tda.further_training.settings import FurtherTrainingSettings
from lightning_tda.store import RunStore


class _StepTicks(Dataset):
    """Item ``t`` is ``t``: the loader only paces the fit; each step's batch comes from the
    global step (so a resumed fit cannot replay or skip a batch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> int:
        return t


class _TickLoader(DataLoader):
    """A loader of ticks that tells Lightning it is resumable: it has no state of its own, since
    every batch is a function of the global step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class FurtherTraining(L.LightningModule):
    """Further-training scores as a LightningModule (module docstring); the arguments are those
    of :func:`~lightning_tda.further_training.further_training_scores`.

    Logs ``further_training/full_loss`` (the full run's batch loss), ``further_training/seed``
    and, after every scheduled step, ``further_training/mean_abs_score`` (mean ``|tau|`` of that
    seed). Fit with ``Trainer(max_steps=module.total_steps)``; then :meth:`result`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        test_dataset: Dataset,
        instances: Sequence[int] | Tensor,
        steps: Sequence[int] | int = (1, 10, 100),
        seeds: Sequence[int] | int = 5,
        *,
        store: RunStore | str | None = None,
        checkpoint: str | Mapping[str, Tensor] | None = None,
        loss_fn: LossFn | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        batch_size: int | None = 64,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        mode: str = "remove",
        eps: float | None = None,
        center: bool = False,
        chunk_size: int | None = None,
        keep_per_seed: bool = False,
        batch_fn: BatchFn | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        settings = FurtherTrainingSettings(
            optimizer=optimizer, lr=lr, batch_size=batch_size, weight_decay=weight_decay,  # type: ignore[arg-type]
            momentum=momentum, betas=tuple(betas), mode=mode, eps=eps, center=center,  # type: ignore[arg-type]
            chunk_size=chunk_size, keep_per_seed=keep_per_seed,
        )
        self.run = build_run(
            model, train_dataset, test_dataset, instances, steps, seeds, settings, loss_fn, batch_fn, store, checkpoint
        )
        self.save_hyperparameters({
            **settings.describe(), "center": center, "chunk_size": chunk_size, "keep_per_seed": keep_per_seed,
            "steps": list(self.run.steps), "seeds": list(self.run.seeds),
            "num_instances": int(self.run.replicas.instances.numel()), "n_train": int(self.run.x_train.shape[0]),
            "n_test": int(self.run.y_test.shape[0]), "architecture": type(model).__name__,
        })

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole computation: ``len(seeds) * steps[-1]``."""
        return self.run.total_steps

    def train_dataloader(self) -> DataLoader:
        return _TickLoader(_StepTicks(self.total_steps), batch_size=None, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.run.build_optimizer()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        t = self.global_step
        if t >= self.total_steps:  # a Trainer without max_steps replaying the loader after a resume
            return None
        losses, diffs = self.run.advance(t, self.optimizers(), self.manual_backward)
        self.log("further_training/full_loss", losses[0], prog_bar=True)
        self.log("further_training/seed", float(self.run.seeds[t // self.run.horizon]))
        if diffs is not None:
            self.log("further_training/mean_abs_score", diffs.abs().mean())
        return None

    def on_train_end(self) -> None:
        if int(self.run.seeds_done) == len(self.run.seeds):
            check_finite(self.run.result())

    def result(self) -> FurtherTrainingResult:
        """The scores over the seeds finished so far (all of them after a complete fit)."""
        return self.run.result()
