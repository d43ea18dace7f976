"""Optimizers over stacked ``[M, ...]`` parameters that behave exactly as M separate optimizers.

SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW are *elementwise*: every
state tensor (momentum buffer, first and second moments) has the parameter's shape and each
element is updated from the same element of the gradient and parameter alone; the only shared
state, Adam's step count, is the same for all copies because they step together. So the stock
``torch.optim`` optimizer applied to the stacked tensors *is* M separate optimizers (tested
against M sequential trainings). Optimizers that mix elements (LAMB, LARS, Shampoo, gradient
clipping by a global norm) are not, which is why only these three are offered and norm clipping
is done per copy (:func:`clip_grad_norm_per_copy`).

Per-copy learning rates (:class:`PerCopyLearningRate`): in all three optimizers the update is
``p_new - p_old = lr * u`` with ``u`` independent of ``lr`` (AdamW's decoupled decay included),
so a copy with learning rate ``lr_m`` is obtained by stepping with a base rate ``lr`` and
rescaling that copy's update by ``lr_m / lr``. A learning-rate scheduler then scales every copy's
rate by the same factor.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
from torch import Tensor

OptimizerName = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


def build_optimizer(
    params: Iterable[Tensor],
    name: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``name`` ("sgd", "adam", "adamw") over stacked parameters,
    with the fused implementation where the parameters allow it (one pass over the stacked
    tensors: the same arithmetic, several times faster than the default for large stacks)."""
    params = list(params)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in floats for p in params)
    kwargs = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **kwargs
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _per_copy_view(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


class PerCopyLearningRate:
    """Rescale each copy's optimizer update so copy ``m`` trains with learning rate ``lrs[m]``.

    ``base_lr`` (the largest rate) is what the optimizer holds; call :meth:`snapshot` before
    ``optimizer.step()`` and :meth:`apply` after it.
    """

    def __init__(self, lrs: Sequence[float] | Tensor) -> None:
        lrs = torch.as_tensor(lrs, dtype=torch.float64).flatten()
        if not torch.isfinite(lrs).all() or (lrs < 0).any():
            raise ValueError(f"learning rates must be finite and >= 0, got {lrs.tolist()[:8]}")
        self.base_lr = float(lrs.max()) if len(lrs) else 0.0
        self.factors = (lrs / self.base_lr if self.base_lr > 0 else torch.zeros_like(lrs)).float()

    def snapshot(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [p.detach().clone() for p in params]

    @torch.no_grad()
    def apply(self, params: Sequence[Tensor], before: Sequence[Tensor]) -> None:
        for p, old in zip(params, before):
            p.sub_(old).mul_(_per_copy_view(self.factors, p)).add_(old)


@torch.no_grad()
def clip_grad_norm_per_copy(params: Sequence[Tensor], max_norm: float, num_models: int) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` applied to each copy's gradients separately.

    Copy ``m``'s gradients (row ``m`` of every stacked ``.grad``) are scaled by
    ``min(1, max_norm / (norm_m + 1e-6))``, ``norm_m`` their total 2-norm. Returns the norms [M].
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(num_models)
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.reshape(num_models, -1), dim=1) for g in grads]),
        dim=0,
    )
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_copy_view(coef, g))
    return norms
