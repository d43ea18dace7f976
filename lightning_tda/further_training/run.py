"""One further-training computation, step by step: what the function and the LightningModule run.

The whole computation is a sequence of ``len(seeds) * K`` optimizer steps (``K`` the last entry
of ``steps``): global step ``t`` is step ``k = t mod K`` of seed ``seeds[t div K]``. At ``k = 0``
every copy restarts from the final model with a fresh optimizer; after the steps listed in
``steps`` the test losses of all copies are taken and the differences to the full run are
accumulated. Everything is a function of ``t``, so a resumed computation continues exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lightning_tda.further_training.order import BatchOrder
from lightning_tda.further_training.replicas import LossFn, Replicas
from lightning_tda.further_training.result import FurtherTrainingResult, seed_statistics
from lightning_tda.further_training.settings import FurtherTrainingSettings


class FurtherTrainingRun(nn.Module):
    """State of a further-training computation (module docstring): the copies, the data, and the
    accumulated scores (buffers, so a Lightning checkpoint holds them)."""

    def __init__(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor,
        x_test: Tensor,
        y_test: Tensor,
        instances: Tensor,
        steps: tuple[int, ...],
        seeds: tuple[int, ...],
        settings: FurtherTrainingSettings,
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.steps, self.seeds = steps, seeds
        self.horizon = steps[-1]
        self.total_steps = len(seeds) * self.horizon
        n_train = int(x_train.shape[0])
        self.replicas = Replicas(model, instances, n_train, settings, loss_fn)
        dtype = self.replicas.dtype
        cast = (lambda t: t.to(dtype)) if dtype.is_floating_point else (lambda t: t)
        for name, value in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
            value = cast(value) if value.dtype.is_floating_point else value
            self.register_buffer(name, value, persistent=False)
        self.orders = [BatchOrder(n_train, settings.batch_size, s) for s in seeds]
        self.slot_of_step = {k: j for j, k in enumerate(steps)}
        m, n_test, n_steps = int(instances.numel()), int(y_test.shape[0]), len(steps)
        self.register_buffer("full_loss_sum", torch.zeros(n_steps, n_test, dtype=torch.float64))
        self.register_buffer("seeds_done", torch.zeros((), dtype=torch.int64))
        # per-seed differences (for the standard error, centering and re-averaging): memory
        # len(seeds) * len(steps) * n_test * m float32 numbers
        self.register_buffer("per_seed", torch.zeros(len(seeds), n_steps, n_test, m, dtype=torch.float32))

    def build_optimizer(self) -> torch.optim.Optimizer:
        return self.replicas.build_optimizer()

    def batch(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, index)`` of global step ``t``."""
        slot, k = divmod(int(t), self.horizon)
        index = self.orders[slot].batch(k).to(self.x_train.device)
        return self.x_train[index], self.y_train[index], index

    def advance(
        self, t: int, optimizer: torch.optim.Optimizer, backward: Callable[[Tensor], None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run global step ``t``: restart at a seed's first step, one step of every copy, and
        the evaluation when the step is in the schedule. Returns the copies' batch losses
        ``[1 + m]`` and, after an evaluation, that seed's differences ``[n_test, m]``."""
        if not 0 <= t < self.total_steps:
            raise IndexError(f"step {t} is outside the computation's {self.total_steps} steps")
        slot, k = divmod(int(t), self.horizon)
        if k == 0:
            self.replicas.reset(optimizer)
        x, y, index = self.batch(t)
        losses = self.replicas.step(x, y, index, optimizer, backward)
        diffs = self.evaluate(slot, self.slot_of_step[k + 1]) if k + 1 in self.slot_of_step else None
        return losses, diffs

    @torch.no_grad()
    def evaluate(self, seed_slot: int, step_slot: int) -> Tensor:
        """Test losses of every copy; accumulate the differences to the full run."""
        losses = self.replicas.losses(self.x_test, self.y_test).double()  # [1 + m, n_test]
        diffs = (losses[1:] - losses[:1]).T  # [n_test, m]
        self.per_seed[seed_slot, step_slot] = diffs.float()
        self.full_loss_sum[step_slot] += losses[0]
        if step_slot == len(self.steps) - 1:
            self.seeds_done += 1
        return diffs

    def result(self) -> FurtherTrainingResult:
        """The scores over the seeds completed so far."""
        done = int(self.seeds_done)
        if done == 0:
            raise RuntimeError(
                f"no seed has finished its {self.horizon} further-training steps yet; run all "
                f"{self.total_steps} steps (Trainer(max_steps=module.total_steps))"
            )
        per_seed = self.per_seed[:done].double().cpu().numpy()
        mean, sem = seed_statistics(per_seed, self.settings.center)
        return FurtherTrainingResult(
            scores=mean.astype(np.float32),
            sem=sem.astype(np.float32),
            steps=self.steps,
            instances=self.replicas.instances.cpu().numpy().astype(np.int64),
            full_loss=(self.full_loss_sum / done).cpu().numpy().astype(np.float32),
            seeds=self.seeds[:done],
            centered=self.settings.center,
            settings=self.settings.describe(),
            n_train=int(self.x_train.shape[0]),
            per_seed=per_seed.astype(np.float32) if self.settings.keep_per_seed else None,
        )
