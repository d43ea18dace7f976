"""Training pairs for ModelPred: subsets of the pool and their exactly trained parameters.

As in the paper's code, subsets come from two samplers: prefixes of random permutations (the
subsets permutation Shapley evaluates; the code used every prefix, here a random sample of
prefix lengths per permutation) and subsets of random size drawn uniformly. The parameters are
the target's exact solutions (:meth:`~lightning_tda.modelpred.targets.Target.solve`, all subsets
batched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_tda.modelpred.targets import Target


def permutation_prefix_masks(n: int, num_permutations: int, prefixes_per_permutation: int, rng: np.random.Generator, min_size: int = 1) -> np.ndarray:
    """``[num_permutations * k, n]`` bool: ``k`` prefixes of distinct random lengths in
    ``[min_size, n]`` of each of ``num_permutations`` random permutations."""
    k = min(prefixes_per_permutation, n - min_size + 1)
    masks = np.zeros((num_permutations * k, n), dtype=bool)
    for p in range(num_permutations):
        order = rng.permutation(n)
        sizes = rng.choice(np.arange(min_size, n + 1), size=k, replace=False)
        for j, size in enumerate(sizes):
            masks[p * k + j, order[:size]] = True
    return masks


def random_size_masks(n: int, num_subsets: int, rng: np.random.Generator, min_size: int = 1) -> np.ndarray:
    """``[num_subsets, n]`` bool: each a uniform random subset of a uniform random size in ``[min_size, n]``."""
    masks = np.zeros((num_subsets, n), dtype=bool)
    sizes = rng.integers(min_size, n + 1, size=num_subsets)
    for j, size in enumerate(sizes):
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks


def sample_masks(n: int, num_permutations: int, prefixes_per_permutation: int, num_random: int, seed: int, min_size: int = 1) -> np.ndarray:
    """Permutation prefixes and random-size subsets, in one ``[m, n]`` bool array."""
    if n < 1:
        raise ValueError("the training pool is empty")
    if not 1 <= min_size <= n:
        raise ValueError(f"min_size must be in [1, n={n}], got {min_size}")
    if min(num_permutations, prefixes_per_permutation, num_random) < 0 or num_permutations * prefixes_per_permutation + num_random == 0:
        raise ValueError("ask for at least one subset: num_permutations * prefixes_per_permutation + num_random > 0, none negative")
    rng = np.random.default_rng(seed)
    parts = [permutation_prefix_masks(n, num_permutations, prefixes_per_permutation, rng, min_size), random_size_masks(n, num_random, rng, min_size)]
    return np.concatenate(parts, 0)


@dataclass
class TrainingPairs:
    """Subsets ``masks [m, n]`` (bool) and their exact solutions ``thetas [m, P]`` (float64)."""

    masks: Tensor
    thetas: Tensor

    def __len__(self) -> int:
        return len(self.masks)


def make_pairs(target: Target, masks: np.ndarray | Tensor, progress: bool = False) -> TrainingPairs:
    """Solve every subset exactly (batched) and pair it with its solution."""
    masks_t = torch.as_tensor(np.asarray(masks, dtype=bool))
    return TrainingPairs(masks_t, target.solve(masks_t, progress=progress))


__all__ = ["TrainingPairs", "make_pairs", "permutation_prefix_masks", "random_size_masks", "sample_masks"]
