r"""L-inf adversarial attacks: FGSM and PGD, for the transfer-attack recipe.

Our own, because torchattacks pins ``requests~=2.25.1`` (with ``idna<3``), which conflicts with
packages installed beside ours, so it cannot go in an extra. Checked against closed forms: for
a linear model and the margin loss FGSM's perturbation is
:math:`\epsilon\, \mathrm{sign}(w_{y'} - w_y)` (``y`` the label, ``y'`` the runner-up class),
and so is PGD's end point for two classes (tests); and, once by hand, equal to torchattacks
3.5.1's FGSM and PGD (no random start) on a DigitsCNN to the last bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from torch import Tensor, nn

from lightning_tda.dcor._data import check_positive

__all__ = ["ATTACKS", "DEFAULT_EPS", "AttackLoss", "check_eps", "eval_mode", "fgsm", "margin_loss", "pgd"]

AttackLoss = Literal["cross_entropy", "margin"]
ATTACKS = ("fgsm", "pgd")
DEFAULT_EPS = (0.05, 0.1, 0.2, 0.3)
"""L-inf radii for inputs in [0, 1]: a twentieth of the range up to 0.3, the MNIST standard."""


def check_eps(eps: Any, name: str = "eps") -> float:
    """``eps`` as a float radius, or a clear error (negative, not finite, not a number)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a number (an L-inf radius in input units), got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (an L-inf radius in input units), got {eps}")
    return float(eps)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    r"""Per-example margin loss :math:`\max_{j \ne y} z_j - z_y` (positive when misclassified):
    what a margin attack increases."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return others.amax(1) - true


def _loss(logits: Tensor, y: Tensor, loss: AttackLoss) -> Tensor:
    # summed, not averaged: each example's input gradient does not depend on the batch size
    if loss == "cross_entropy":
        return nn.functional.cross_entropy(logits, y, reduction="sum")
    if loss == "margin":
        return margin_loss(logits, y).sum()
    raise ValueError(f"loss must be 'cross_entropy' or 'margin', got {loss!r}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (BatchNorm statistics and dropout fixed), restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: AttackLoss) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = _loss(model(x), y, loss)
        (grad,) = torch.autograd.grad(value, x)  # parameters get no .grad
    return grad


def _clip(x: Tensor, clip: tuple[float, float] | None) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def _check_clip(clip: Any) -> None:
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be None or (low, high) with low < high, got {clip!r}")


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    loss: AttackLoss = "cross_entropy",
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    r"""Fast gradient sign method (Goodfellow et al. 2015), L-inf:

    .. math::

        x' = \mathrm{clip}\big(x + \epsilon\, \mathrm{sign}\, \nabla_x \ell(f(x), y)\big)

    Args:
        model: run in eval mode (restored afterwards); its parameters get no gradient.
        x, y: inputs ``[n, ...]`` and integer labels ``[n]``.
        eps: the L-inf radius (>= 0).
        loss: ``"cross_entropy"`` or ``"margin"`` (:func:`margin_loss`).
        clip: the valid input range (digits: ``(0, 1)``), or None.
    """
    eps = check_eps(eps)
    _check_clip(clip)
    with eval_mode(model):
        grad = _input_gradient(model, x, y, loss)
    return _clip(x + eps * grad.sign(), clip).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    loss: AttackLoss = "cross_entropy",
    clip: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Projected gradient descent (Madry et al. 2018), L-inf: from a uniform random start in the
    ball (or from ``x``), ``steps`` signed-gradient steps, each projected back:

    .. math::

        x_{t+1} = \mathrm{clip}\Big(\Pi_{\|x' - x\|_\infty \le \epsilon}\big(x_t + \alpha\,
            \mathrm{sign}\, \nabla_x \ell(f(x_t), y)\big)\Big)

    ``step_size`` :math:`\alpha` defaults to ``2.5 * eps / steps`` (Madry et al.'s rule). Other
    arguments as in :func:`fgsm`; ``generator`` seeds the random start.
    """
    eps = check_eps(eps)
    check_positive(steps, "steps")
    step = 2.5 * eps / steps if step_size is None else check_eps(step_size, "step_size")
    _check_clip(clip)
    x = x.detach()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = _clip(x + (2 * noise - 1) * eps, clip)
    else:
        x_adv = x.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, y, loss)
            x_adv = x + (x_adv + step * grad.sign() - x).clamp(-eps, eps)
            x_adv = _clip(x_adv, clip)
    return x_adv.detach()
