"""The full run and every leave-one-out (or up-weighted) run of one seed as copies of one model,
trained in one vmapped step on the ensemble engine's stacked copies.

Copy 0 is the full run; copy ``j >= 1`` is the run of instance ``instances[j - 1]``. All copies
start from the final model and see the same batch; on a batch ``B`` copy ``j`` minimises

.. math::

    L_j(B) = \\sum_{e \\in B} c_{j,e}\\, \\ell(f_j(x_e), y_e) + \\tfrac{\\lambda}{2}\\lVert\\theta_j\\rVert^2

with ``c_{0,e} = 1/|B|`` (the batch mean), in ``"remove"`` mode ``c_{j,e} = [e \\ne i_j] / |B \\setminus
\\{i_j\\}|`` (the mean over the batch without ``i_j``; a batch of ``i_j`` alone gives loss 0), and in
``"upweight"`` mode ``c_{j,e} = (1 + n \\varepsilon [e = i_j]) / |B|``. The L2 term is the
optimizer's ``weight_decay``. Each copy has its own optimizer state: ``torch.optim`` SGD and Adam
are elementwise, so the stock optimizer on the stacked tensors is one optimizer per copy
(:mod:`lightning_tda.ensemble.optim`, tested there against separate trainings).

Dropout and other randomness: the copies of one vmap call draw the *same* masks
(``randomness="same"``), so a leave-one-out run sees the full run's noise; with ``chunk_size``
each chunk draws its own. BatchNorm statistics are over the shared batch, left-out instance
included, so a model with BatchNorm in training mode does not remove the instance exactly (a
warning says so).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_tda.ensemble import StackedModel, build_copies, build_optimizer
from lightning_tda.ensemble.stacking import run_vmapped
from lightning_tda.further_training.settings import FurtherTrainingSettings

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs [batch, ...], y [batch, ...]) -> Tensor[batch]``: per-example loss."""


def cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    """The default per-example loss: cross-entropy of logits."""
    return nn.functional.cross_entropy(outputs, y, reduction="none")


class Replicas(nn.Module):
    """``1 + m`` copies of the final model (module docstring): copy 0 the full run, copy ``j`` the
    run that leaves out (or up-weights) ``instances[j - 1]``."""

    def __init__(
        self,
        model: nn.Module,
        instances: Tensor,
        n_train: int,
        settings: FurtherTrainingSettings,
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        self.num_copies = 1 + int(instances.numel())
        first, stacked = build_copies(model, self.num_copies, [0] * self.num_copies, init="copy")
        self.stacked = StackedModel(first, stacked, self.num_copies)
        if self.stacked.has_batch_norm:
            warnings.warn(
                "further training a model with BatchNorm: batch statistics in training mode are over "
                "the shared batch, left-out instance included, so a leave-one-out copy does not remove "
                "its instance exactly; put BatchNorm layers in eval mode or use LayerNorm/GroupNorm",
                stacklevel=3,
            )
        self.register_buffer("instances", instances.clone(), persistent=False)
        # the final model, which every seed restarts from (moved to the copies' device at reset)
        self.final_state = {name: value.detach().clone() for name, value in first.state_dict().items()}
        self.n_train = int(n_train)
        self.settings = settings
        self.loss_fn = loss_fn or cross_entropy
        self.dtype = next(self.stacked.parameters()).dtype

    # ------------------------------------------------------------------ state

    def parameters_to_train(self) -> list[Tensor]:
        return [p for p in self.stacked.parameters() if p.requires_grad]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """One optimizer over the stacked copies (one per copy, elementwise)."""
        s = self.settings
        return build_optimizer(
            self.parameters_to_train(), s.optimizer, s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
            betas=tuple(s.betas),
        )

    @torch.no_grad()
    def reset(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every copy back to the final model, and (when given) the optimizer state cleared."""
        for name, tensor in self.stacked.stacked.state_dict(keep_vars=True).items():
            tensor.copy_(self.final_state[name].to(tensor.device).expand_as(tensor))
        if optimizer is not None:
            raw = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimizers
            raw.state.clear()

    def chunks(self) -> Iterator[tuple[int, int]]:
        size = self.settings.chunk_size or self.num_copies
        for start in range(0, self.num_copies, size):
            yield start, min(start + size, self.num_copies)

    # ------------------------------------------------------------------ training

    def coefficients(self, index: Tensor) -> Tensor:
        """``[1 + m, batch]`` loss coefficients ``c_{j,e}`` of a batch of example positions."""
        b = index.numel()
        hits = (index[None, :] == self.instances[:, None].to(index.device)).to(self.dtype)  # [m, b]
        full = torch.full((1, b), 1.0 / b, dtype=self.dtype, device=index.device)
        if self.settings.mode == "remove":
            keep = 1.0 - hits
            copies = keep / keep.sum(1, keepdim=True).clamp(min=1.0)
        else:
            assert self.settings.eps is not None
            copies = (1.0 + hits * (self.n_train * self.settings.eps)) / b
        return torch.cat([full, copies])

    def per_example_losses(self, outputs: Tensor, y: Tensor) -> Tensor:
        """``[copies, batch]`` losses of stacked outputs ``[copies, batch, ...]`` on shared targets."""
        if self.loss_fn is cross_entropy and outputs.ndim == 3 and y.ndim == 1:
            # per-example losses do not depend on the batch: one call on the flattened copies
            copies, b = outputs.shape[:2]
            return cross_entropy(outputs.reshape(copies * b, -1), y.repeat(copies)).view(copies, b)
        return run_vmapped(lambda out, yy: self.loss_fn(out, yy), (0, None), "error", outputs, y)

    def step(
        self,
        x: Tensor,
        y: Tensor,
        index: Tensor,
        optimizer: torch.optim.Optimizer,
        backward: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """One optimizer step of every copy on the shared batch; returns the copies' losses [1 + m]."""
        coef = self.coefficients(index)
        optimizer.zero_grad()
        backward = backward or (lambda loss: loss.backward())
        losses = []
        self.stacked.train()
        for start, stop in self.chunks():
            outputs = self.stacked(x, start, stop, per_copy_inputs=False, randomness="same")
            loss = (self.per_example_losses(outputs, y) * coef[start:stop]).sum(1)
            backward(loss.sum())
            losses.append(loss.detach())
        optimizer.step()
        return torch.cat(losses)

    @torch.no_grad()
    def losses(self, x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
        """``[1 + m, n]`` per-example losses of every copy on ``(x, y)``, in eval mode."""
        was_training = self.stacked.training
        self.stacked.eval()
        try:
            rows = []
            for start, stop in self.chunks():
                cols = []
                for lo in range(0, x.shape[0], batch_size):
                    out = self.stacked(x[lo : lo + batch_size], start, stop, randomness="same")
                    cols.append(self.per_example_losses(out, y[lo : lo + batch_size]))
                rows.append(torch.cat(cols, dim=1))
        finally:
            self.stacked.train(was_training)
        return torch.cat(rows)

    def member(self, j: int) -> nn.Module:
        """Copy ``j`` as an ordinary module (0: the full run)."""
        return self.stacked.member(j)
