"""Per-example output functions: the scalar each recorder and attribution method studies.

An *output function* maps ``(module, x, y)`` to one float per example, shape ``[batch]``. The
built-ins work on classification logits ``module(x)`` of shape ``[batch, n_classes]``:

- :func:`margin`: ``logit_y - logsumexp_{j != y} logit_j`` (the datamodels / TRAK margin),
- :func:`loss`: per-example cross-entropy,
- :func:`correct_class_probability`: ``p_y``.

Each is also available as a function of logits alone (``*_from_logits``) so engines that already
hold logits (the gradient engines, the ensemble engine) need not run the model twice.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from lightning_tda.schema import OUTPUT_LOSS, OUTPUT_MARGIN, OUTPUT_PROBABILITY

OutputFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``output_fn(module, x, y) -> Tensor[batch]``: one scalar per example."""

OutputName = Literal["margin", "loss", "correct_class_probability"]


def _is_transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (vmap/grad), where ``.item()`` fails."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def check_labels(logits: Tensor, y: Tensor) -> None:
    """Raise a clear error when ``logits`` is not [batch, classes] or ``y`` is out of range."""
    if logits.ndim != 2:
        raise ValueError(
            f"expected logits of shape [batch, n_classes], got {tuple(logits.shape)}; "
            "pass an output_fn that returns one scalar per example for non-classification models"
        )
    if y.ndim != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected labels of shape [{logits.shape[0]}], got {tuple(y.shape)}; "
            "check the batch parser (batch_fn) returns (x, y) with one integer label per example"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if _is_transformed(y):
        return  # inside vmap/grad: values cannot be inspected; callers check labels beforehand
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        bad = torch.nonzero((y < 0) | (y >= logits.shape[1])).flatten()[:5].tolist()
        raise ValueError(
            f"labels out of range [0, {logits.shape[1]}) at batch positions {bad} "
            f"(values {y[bad].tolist()}); the model has {logits.shape[1]} outputs"
        )


def margin_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Classification margin ``logit_y - logsumexp_{j != y} logit_j``, shape [batch].

    Computed by masking the correct class with ``-inf`` before the logsumexp, so it stays exact for
    confident models (no ``log(1 - p)`` cancellation).
    """
    check_labels(logits, y)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    is_label = torch.arange(logits.shape[1], device=logits.device) == y[:, None]
    others = logits.masked_fill(is_label, float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def loss_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy, shape [batch]."""
    check_labels(logits, y)
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def correct_class_probability_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Probability of the correct class ``p_y``, shape [batch]."""
    check_labels(logits, y)
    return torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)


def out_to_loss_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """TRAK's out-to-loss term for the margin: ``d loss / d margin = -(1 - p_y)``; we store
    ``1 - p_y`` computed as ``sigmoid(-margin)`` (exact, no cancellation)."""
    return torch.sigmoid(-margin_from_logits(logits, y))


def out_to_loss_for(output: str, logits: Tensor | None, y: Tensor, batch_size: int) -> Tensor:
    """``q = -d loss / d output`` per example, so that the cross-entropy gradient of an example is
    ``-q`` times the gradient of its recorded output: ``1 - p_y`` for the margin (TRAK's ``Q``),
    ``-1`` for the loss itself, ``1 / p_y`` for the correct-class probability, NaN for a custom
    output (unknown: scorers that need it refuse such records)."""
    if output == OUTPUT_LOSS:
        return torch.full((batch_size,), -1.0)
    if logits is None or output not in (OUTPUT_MARGIN, OUTPUT_PROBABILITY):
        return torch.full((batch_size,), float("nan"))
    if output == OUTPUT_MARGIN:
        return out_to_loss_from_logits(logits, y)
    return torch.exp(loss_from_logits(logits, y))  # 1 / p_y = exp(cross-entropy)


def margin(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Output function: classification margin of ``module(x)``."""
    return margin_from_logits(module(x), y)


def loss(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Output function: per-example cross-entropy of ``module(x)``."""
    return loss_from_logits(module(x), y)


def correct_class_probability(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Output function: correct-class probability of ``module(x)``."""
    return correct_class_probability_from_logits(module(x), y)


FROM_LOGITS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    OUTPUT_MARGIN: margin_from_logits,
    OUTPUT_LOSS: loss_from_logits,
    OUTPUT_PROBABILITY: correct_class_probability_from_logits,
}
OUTPUT_FNS: dict[str, OutputFn] = {
    OUTPUT_MARGIN: margin,
    OUTPUT_LOSS: loss,
    OUTPUT_PROBABILITY: correct_class_probability,
}


def resolve_output_fn(output_fn: OutputFn | str | None) -> OutputFn:
    """Turn a name (``"margin"``, ``"loss"``, ``"correct_class_probability"``) or callable into an
    output function; ``None`` means the margin."""
    if output_fn is None:
        return margin
    if isinstance(output_fn, str):
        if output_fn not in OUTPUT_FNS:
            raise ValueError(
                f"unknown output_fn {output_fn!r}; choose one of {sorted(OUTPUT_FNS)} "
                "or pass a callable output_fn(module, x, y) -> Tensor[batch]"
            )
        return OUTPUT_FNS[output_fn]
    if not callable(output_fn):
        raise TypeError(f"output_fn must be a name or a callable, got {type(output_fn).__name__}")
    return output_fn


def check_output(out: Tensor, batch_size: int, where: str = "output_fn") -> Tensor:
    """Check an output function returned one scalar per example; return it flattened."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{where} must return a Tensor of shape [{batch_size}], got {type(out).__name__}")
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != batch_size:
        raise ValueError(
            f"{where} returned shape {tuple(out.shape)}, expected [{batch_size}] (one scalar per "
            "example); reduce with reduction='none' or index the class you want per example"
        )
    return out
