"""The set network: DeepSets from a training subset to its trained parameters.

Each example of the pool is embedded as ``phi(concat(x_i, onehot(y_i)))`` by a bias-free MLP,
so a zero row (padding) embeds to exactly zero and adds nothing to the sum. The subset's
embeddings are summed and an MLP ``rho`` maps the sum to the target's flattened parameters:

.. math::  \\hat\\theta(S) = \\rho\\Big(\\tfrac{1}{\\sqrt n} \\sum_{i \\in S} \\phi(x_i, y_i)\\Big)

The constant :math:`1/\\sqrt n` (``n`` the pool size, the same for every subset, so this is a
sum and the set size stays visible to rho) keeps the part of the sum that tells subsets of one
size apart, which grows like the square root of the size, of order one at rho's input; with
``1/n`` instead, training fitted the pairs worse (dev data, not the reported figures). Because ``phi`` sees one example at a
time, the pooled vector of any subset ``S`` given as a mask row is ``mask @ phi(pool)``: all
subsets of a batch, and all prefixes of a permutation, cost one pass of ``phi`` over the pool
and one matrix product.

``pooling="sum+mean"`` gives rho three views of the same sum: the scaled sum above, the mean
:math:`\\tfrac{1}{|S|} \\sum_{i \\in S} \\phi`, and :math:`\\log |S| / \\log n` (``|S|`` is the
sum of the mask row, itself a sum over the set). The target's solution depends on ``S`` exactly
through these two things: :math:`\\theta^*(S) = \\arg\\min \\tfrac{1}{2C|S|}\\|\\theta\\|^2 +
\\tfrac{1}{|S|}\\sum_{i \\in S} \\ell_i(\\theta)` is a function of the subset's empirical distribution
and its size, so rho need not learn to divide by the size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn


class ELU(nn.Module):
    """:math:`\\mathrm{ELU}(x) = \\max(x, 0) + e^{\\min(x, 0)} - 1` (alpha 1), written with ``exp``:
    the same function as ``nn.ELU`` (to float32 rounding, tested) and 4-5x faster on CPU, where
    torch's ELU goes through a slow ``expm1``; the set network spends much of a prediction here."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x.clamp(max=0)) - 1 + x.clamp(min=0)


def _mlp(sizes: list[int], bias: bool, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2 or last_activation:
            layers.append(ELU())
    return nn.Sequential(*layers)


class SetNetwork(nn.Module):
    """DeepSets ``rho(sum phi)`` with a bias-free ``phi`` (see the module docstring).

    Args:
        element_features: width of one element, ``d + num_classes``.
        out_features: the target's parameter count ``P``.
        hidden: width of the hidden layers of ``phi`` and ``rho``.
        set_features: width of the pooled embedding.
        pool_size: ``n``; the sum is divided by ``sqrt(n)``.
        pooling: ``"sum"`` (rho sees the scaled sum) or ``"sum+mean"`` (also the mean and the log
            size; see the module docstring).
    """

    def __init__(
        self, element_features: int, out_features: int, hidden: int = 128, set_features: int = 128, pool_size: int = 1,
        pooling: Literal["sum", "sum+mean"] = "sum",
    ) -> None:
        super().__init__()
        if min(element_features, out_features, hidden, set_features, pool_size) < 1:
            raise ValueError("all SetNetwork sizes must be positive integers")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        pooled = set_features if pooling == "sum" else 2 * set_features + 1
        self.phi = _mlp([element_features, hidden, hidden, set_features], bias=False, last_activation=True)
        self.rho = _mlp([pooled, hidden, hidden, out_features], bias=True, last_activation=False)
        self.pool_size = pool_size
        self.pool_scale = float(pool_size) ** -0.5
        self.log_pool_size = math.log(max(pool_size, 2))

    def embed(self, elements: Tensor) -> Tensor:
        """``phi`` of each element: ``[..., element_features] -> [..., set_features]``."""
        return self.phi(elements)

    def pool(self, weights: Tensor, embedded: Tensor) -> Tensor:
        """rho's input for each subset: ``weights [m, n] @ embedded [n, h] / sqrt(n)`` (and, for
        ``"sum+mean"``, the mean and log size from the same sum)."""
        w = weights.to(embedded.dtype)
        return self._pooled(torch.matmul(w, embedded), w.sum(-1, keepdim=True))

    def _pooled(self, total: Tensor, size: Tensor) -> Tensor:
        if self.pooling == "sum":
            return total * self.pool_scale
        size = size.clamp_min(1e-6)  # empty sets are refused before this; weights may be fractional
        return torch.cat([total * self.pool_scale, total / size, torch.log(size) / self.log_pool_size], -1)

    def forward(self, weights: Tensor, elements: Tensor) -> Tensor:
        """Outputs ``[m, out_features]`` for subsets given as mask/weight rows over ``elements [n, e]``."""
        return self.rho(self.pool(weights, self.embed(elements)))

    def forward_sets(self, sets: Tensor) -> Tensor:
        """The same function on explicit zero-padded sets ``[m, max_size, e]`` (the DeepSets form;
        equal to :meth:`forward` on the corresponding masks, tested)."""
        size = (sets != 0).any(-1).sum(-1, keepdim=True).to(sets.dtype)  # zero rows are padding
        return self.rho(self._pooled(self.embed(sets).sum(-2), size))


POOLINGS = ("sum", "sum+mean")

__all__ = ["SetNetwork", "POOLINGS"]
