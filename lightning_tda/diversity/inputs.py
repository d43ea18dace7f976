"""Checking and stacking the predictions the diversity metrics take.

Predictions are labels (integers, ``[n]``), probabilities or logits (floats, ``[n, C]``); for M
models ``[M, n]`` / ``[M, n, C]`` or a sequence of M such arrays. Float inputs whose rows are
distributions (in [0, 1], summing to 1) are read as probabilities, others as logits. A mix of
labels and scores is compared as labels. Models with different class counts, or arrays of
different lengths, are refused with an error that names them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

Combine = Literal["probabilities", "logits"]
COMBINES = ("probabilities", "logits")
PredictionsLike = Tensor | np.ndarray | Sequence[Tensor | np.ndarray]

__all__ = ["COMBINES", "Combine", "PredictionsLike", "check_target", "ensemble_scores", "stack_predictions"]



def _as_tensor(value: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return value.detach()


def _is_distribution(scores: Tensor) -> bool:
    """Whether every row of ``scores [..., C]`` is a probability distribution."""
    if scores.numel() == 0:
        return False
    sums = scores.sum(-1, dtype=torch.float64)
    return bool((scores >= 0).all() and (scores <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))


def _check_model(value: Tensor, name: str) -> Tensor:
    """One model's predictions: int labels ``[n]`` or float scores ``[n, C]``."""
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must hold integer labels or float probabilities/logits, got dtype {value.dtype}")
    if value.is_floating_point():
        if value.ndim != 2:
            raise ValueError(
                f"{name} holds floats of shape {tuple(value.shape)}; probabilities or logits must be "
                "[n, num_classes] per model (pass integer labels as [n])"
            )
        if bool(torch.isnan(value).any() or torch.isposinf(value).any()):
            raise ValueError(f"{name} has NaN or +inf scores; check the model's outputs")
        return value
    if value.ndim != 1:
        raise ValueError(f"{name} holds integer labels of shape {tuple(value.shape)}; labels must be [n] per model")
    return value.long()


def stack_predictions(preds: PredictionsLike, name: str = "preds") -> Tensor:
    """M models' predictions as one tensor: int labels ``[M, n]`` or float scores ``[M, n, C]``.

    Accepts a tensor/array already stacked, or a sequence of per-model ``[n]`` / ``[n, C]``.
    Raises a clear error for models with different class counts or example counts.
    """
    if isinstance(preds, (Tensor, np.ndarray)):
        value = _as_tensor(preds, name)
        if value.ndim == 0 or value.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one model, got shape {tuple(value.shape)}")
        models = list(value.unbind(0))
    elif isinstance(preds, Sequence) and not isinstance(preds, str):
        models = [_as_tensor(p, f"{name}[{m}]") for m, p in enumerate(preds)]
        if not models:
            raise ValueError(f"{name} is an empty sequence; pass at least one model's predictions")
    else:
        raise TypeError(f"{name} must be a tensor [M, n(, C)] or a sequence of per-model predictions, got {type(preds).__name__}")
    models = [_check_model(p, f"{name}[{m}]") for m, p in enumerate(models)]
    _check_compatible(models, [f"{name}[{m}]" for m in range(len(models))])
    kinds = {p.is_floating_point() for p in models}
    if len(kinds) > 1:
        models = [p.argmax(-1) if p.is_floating_point() else p for p in models]  # labels for all
    return torch.stack(models)


def _check_compatible(models: Sequence[Tensor], names: Sequence[str]) -> None:
    lengths = [p.shape[0] for p in models]
    if len(set(lengths)) > 1:
        shown = ", ".join(f"{n} has {k}" for n, k in zip(names, lengths))
        raise ValueError(
            f"prediction arrays of different lengths ({shown} examples); every model must be "
            "evaluated on the same examples, in the same order"
        )
    classes = [p.shape[1] for p in models if p.is_floating_point()]
    if len(set(classes)) > 1:
        shown = ", ".join(f"{n} has {p.shape[1]}" for n, p in zip(names, models) if p.is_floating_point())
        raise ValueError(
            f"models with different class counts ({shown} classes); diversity compares models "
            "of one classification task, whose outputs have one column per class"
        )


def check_target(target: Tensor | np.ndarray | None, n: int, num_classes: int | None) -> Tensor:
    if target is None:
        raise ValueError("target (the true labels, [n]) is required for this metric")
    target = _as_tensor(target, "target")
    if target.is_floating_point() or target.dtype == torch.bool or target.ndim != 1:
        raise ValueError(f"target must be integer labels of shape [n], got {target.dtype} {tuple(target.shape)}")
    if target.shape[0] != n:
        raise ValueError(
            f"prediction arrays of different lengths: the predictions have {n} examples, target has "
            f"{target.shape[0]}; pass the labels of the examples the models were evaluated on"
        )
    if n and int(target.min()) < 0:
        raise ValueError(f"target has negative labels ({int(target.min())}); labels are class indices 0..C-1")
    if num_classes is not None and n and int(target.max()) >= num_classes:
        raise ValueError(
            f"target has label {int(target.max())} but the predictions have {num_classes} classes; "
            "the models and the labels must belong to the same task"
        )
    return target.long()


def ensemble_scores(stacked: Tensor, combine: Combine = "probabilities") -> Tensor:
    """Per-model scores in the space where the ensemble averages them: probabilities (softmax of
    logits) or logits (log of probabilities), float64, ``[M, n, C]``."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if not stacked.is_floating_point():
        raise ValueError(
            "the ensemble needs probabilities or logits ([n, num_classes] per model), got integer "
            "labels; pass the models' scores instead of their predicted labels"
        )
    scores = stacked.double()
    rows = [(_is_distribution(s), s) for s in scores]
    if combine == "probabilities":
        return torch.stack([s if is_prob else s.softmax(-1) for is_prob, s in rows])
    return torch.stack([s.log() if is_prob else s for is_prob, s in rows])
