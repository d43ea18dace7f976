"""DataInf (Kwon et al., ICLR 2024): influence with a closed-form, layer-wise inverse Hessian.

Per layer (here: per parameter tensor) ``l`` with per-example loss gradients ``g_{j,l}``, DataInf
replaces the inverse of the damped empirical Fisher by the average of the rank-one inverses,
each exact by Sherman-Morrison:

.. math::

    \\Big(\\tfrac1n \\sum_j g_j g_j^\\top + \\lambda_l I\\Big)^{-1}
    \\approx \\tfrac1n \\sum_j \\big(g_j g_j^\\top + \\lambda_l I\\big)^{-1}
    = \\tfrac{1}{n \\lambda_l} \\sum_j \\Big(I - \\frac{g_j g_j^\\top}{\\lambda_l + \\lVert g_j \\rVert^2}\\Big),

so ``v_{z,l} = (1 / lambda_l) (g_{z,l} - (1/n) sum_j c_{zj} g_{j,l})`` with
``c_{zj} = g_{z,l} . g_{j,l} / (lambda_l + ||g_{j,l}||^2)``, and the score of training example
``i`` on test example ``z`` is ``sum_l v_{z,l} . g_{i,l}``. This is DataInf's influence with the
sign flipped (DataInf reports ``-sum_l v . g``, the change of the test loss when ``i`` is
up-weighted), so positive means removing ``i`` raises the test loss, the gold standard's sign.
Damping: ``lambda_l = factor * mean_j ||g_{j,l}||^2 / d_l`` (DataInf's default is ``factor = 0.1``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def datainf_scores(
    train_grads: Tensor,
    test_grads: Tensor,
    layer_sizes: Sequence[int],
    columns: Tensor | None = None,
    damping_factor: float = 0.1,
) -> Tensor:
    """DataInf scores ``[n_test, n_columns]`` (module docstring).

    Args:
        train_grads: ``[n, p]`` per-example loss gradients of the training set (all of it: the
            inverse-Hessian approximation averages over every training example).
        test_grads: ``[n_test, p]`` loss gradients of the test examples.
        layer_sizes: sizes of the consecutive blocks of ``p`` that are layers.
        columns: training positions to score (default: all).
        damping_factor: ``lambda_l`` over the mean squared gradient entry of layer ``l``.
    """
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be positive, got {damping_factor}")
    if sum(layer_sizes) != train_grads.shape[1] or test_grads.shape[1] != train_grads.shape[1]:
        raise ValueError(
            f"layer sizes sum to {sum(layer_sizes)} but the gradients have {train_grads.shape[1]} "
            f"(train) and {test_grads.shape[1]} (test) entries"
        )
    n = train_grads.shape[0]
    scored = train_grads if columns is None else train_grads[columns]
    total = torch.zeros(test_grads.shape[0], scored.shape[0], dtype=train_grads.dtype, device=train_grads.device)
    start = 0
    for size in layer_sizes:
        g = train_grads[:, start : start + size]
        gz = test_grads[:, start : start + size]
        gi = scored[:, start : start + size]
        start += size
        norms = (g * g).sum(1)  # [n]
        lam = damping_factor * float(norms.mean()) / size
        if lam <= 0:
            continue  # a layer with zero gradients contributes nothing
        coef = (gz @ g.T) / (lam + norms)[None, :]  # [n_test, n]
        v = (gz - coef @ g / n) / lam
        total += v @ gi.T
    return total
