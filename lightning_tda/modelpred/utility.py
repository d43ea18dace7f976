"""Utilities of subsets: how good the model trained on a subset is on held-out data.

:math:`U(S) = -\\tfrac1{|T|} \\sum_{(x, y) \\in T} \\ell(\\theta(S); x, y)`, the negative mean test
loss of the target (cross-entropy for logistic regression, squared hinge for the SVM) of the model
:math:`\\theta(S)` trained on :math:`S`. Three ways to get :math:`\\theta(S)`, one interface
(``utility_of_masks(masks [m, n]) -> [m]``):

- :func:`predicted_utility`: ModelPred's prediction (one batched call);
- :func:`exact_utility`: the target's exact batched solver (retraining, exactly);
- :func:`sklearn_utility`: scikit-learn refits one subset at a time (retraining as a user would).

The empty set's model is :math:`\\theta = 0` (the exact solution of the penalty alone), so
:math:`U(\\emptyset)` is :meth:`HeldOutUtility.empty`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from lightning_tda.modelpred.targets import Array, Target, as_labels

if TYPE_CHECKING:
    from lightning_tda.modelpred.modelpred import ModelPred

_SCORES_PER_CHUNK = 2**18

UtilityOfMasks = Callable[[Tensor], Tensor]
"""``fn(masks [m, n] bool) -> utilities [m]`` (float64)."""


class HeldOutUtility:
    """:math:`U(\\theta)` of parameters ``theta [m, P]`` on the test set ``(x, y)``."""

    def __init__(self, target: Target, x: Array, y: Array) -> None:
        self.target = target
        self.x = target.check_features(x, "x_test")
        self.y = as_labels(y, len(self.x), "y_test")
        if len(self.y) == 0:
            raise ValueError("the test set is empty: pass at least one test example")
        target.check_labels(self.y, "y_test")
        # checked once here, not on every call: the test inputs with their constant column, per dtype
        x_aug = torch.cat([self.x, torch.ones(len(self.x), 1, dtype=torch.float64)], 1)
        self._x_aug = {torch.float64: x_aug, torch.float32: x_aug.to(torch.float32)}
        self._y_column = self.y[:, None]  # [T, 1]: broadcasts against scores laid out [T, models]

    def __call__(self, theta: Tensor, chunk_size: int | None = None) -> Tensor:
        """Utilities ``[...]`` of ``theta [..., P]``, in theta's precision (float32 for ModelPred's
        predictions, float64 for solved models), returned as float64.

        The scores of a chunk come out of one batched product laid out ``[outputs, T, models]``
        and the losses are reduced over outputs in that layout, which keeps the reduction
        vectorised over models (3-4x faster than over a short last axis). ``chunk_size`` models
        at a time; by default as many as keep a chunk's scores near 2^18 numbers, small enough
        to stay in cache (2-4x faster on digits than 512 models at once). Equal to
        ``-target.example_losses(theta, x, y).mean(-1)`` (tested)."""
        theta = self.target.check_params(theta)
        if theta.dtype not in self._x_aug:
            theta = theta.to(torch.float64)
        x_aug, outputs = self._x_aug[theta.dtype], self.target.num_outputs
        if chunk_size is None:
            chunk_size = max(1, _SCORES_PER_CHUNK // (len(x_aug) * outputs))
        out = []
        for chunk in theta.reshape(-1, theta.shape[-1]).split(chunk_size):
            rows = chunk.reshape(len(chunk), outputs, x_aug.shape[1]).permute(1, 2, 0)  # [outputs, d + 1, models]
            z = torch.matmul(x_aug, rows)  # [outputs, T, models]
            out.append(-self.target.score_losses(z.movedim(0, -1), self._y_column).mean(0))
        return torch.cat(out).reshape(theta.shape[:-1]).to(torch.float64)

    def accuracy(self, theta: Tensor) -> Tensor:
        """Test accuracy ``[m]`` of each model."""
        logits = self.target.logits(theta.to(torch.float64), self.x)
        return (logits.argmax(-1) == self.y).to(torch.float64).mean(-1)

    def empty(self) -> float:
        """:math:`U(\\emptyset) = U(0)`."""
        return float(self(torch.zeros(1, self.target.num_params, dtype=torch.float64))[0])


def predicted_utility(modelpred: "ModelPred", utility: HeldOutUtility) -> UtilityOfMasks:
    """Utilities of ModelPred's predicted models (every subset in one batched call)."""
    return lambda masks: utility(modelpred.predict_params(masks))


def exact_utility(target: Target, utility: HeldOutUtility, **solve_kwargs: Any) -> UtilityOfMasks:
    """Utilities of the exactly retrained models (the target's batched solver)."""
    return lambda masks: utility(target.solve(masks, **solve_kwargs))


def sklearn_fit(target: Target, mask: np.ndarray, tol: float = 1e-4) -> Tensor:
    """``theta [P]`` of scikit-learn trained on one subset, on the target's objective
    (``fit_intercept=False`` on ``[x, 1]``, so the intercept is penalised as in the target).
    Subsets with fewer than two classes (scikit-learn refuses them) use the exact solver."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    mask = np.asarray(mask, dtype=bool)
    x = target.x_aug.numpy()[mask]
    y = target.y.numpy()[mask]
    present = np.unique(y)
    if len(present) < 2 or (target.num_outputs > 1 and len(present) < target.num_classes):
        return target.solve(mask[None], allow_empty=True)[0]
    if target.name == "logistic":
        model = LogisticRegression(C=target.C, fit_intercept=False, tol=tol, max_iter=1000)
    else:
        model = LinearSVC(C=target.C, fit_intercept=False, tol=tol, max_iter=10000)
    model.fit(x, y)
    return torch.as_tensor(model.coef_, dtype=torch.float64).reshape(-1)


def sklearn_utility(target: Target, utility: HeldOutUtility, tol: float = 1e-4) -> UtilityOfMasks:
    """Utilities of models refitted by scikit-learn, one subset at a time (see :func:`sklearn_fit`)."""

    def fn(masks: Tensor) -> Tensor:
        masks_np = np.asarray(masks, dtype=bool).reshape(-1, target.n)
        thetas = torch.stack([sklearn_fit(target, m, tol) if m.any() else torch.zeros(target.num_params, dtype=torch.float64) for m in masks_np])
        return utility(thetas)

    return fn


__all__ = ["HeldOutUtility", "UtilityOfMasks", "predicted_utility", "exact_utility", "sklearn_fit", "sklearn_utility"]
