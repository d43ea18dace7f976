"""Attribution scorers over recorded projected gradients: GradDot, GradCos, TracIn, TRAK, and
projected Gauss-Newton influence functions.

Every scorer reads one or several RunStores (one per training run), combines each recorded
checkpoint's test features with the *same* checkpoint's train features, and returns scores
``[n_test, n_train]``: positive means the training example pushes the test output (the margin by
default) up. With ``out=`` the scores are also written to a store as ``scores/<name>/<test_split>``
in row blocks of test examples (a rerun skips finished blocks).

.. math::

    \\text{GradDot}_{ji} = \\operatorname{mean}_c \\langle \\phi^c_j, \\phi^c_i \\rangle, \\quad
    \\text{TracIn}_{ji} = \\textstyle\\sum_c \\eta_c \\langle \\phi^c_j, \\phi^c_i \\rangle, \\quad
    \\text{TRAK}_{ji} = \\Big(\\operatorname{mean}_c \\phi^c_j (\\Phi_c^\\top \\Phi_c + \\lambda I)^{-1}
    \\phi^c_i\\Big)\\, \\operatorname{mean}_c q^c_i

and the projected influence function uses the Gauss-Newton Hessian of the training loss in the
projected space, :math:`H = \\tfrac1n \\Phi^\\top \\operatorname{diag}(q(1-q)) \\Phi + \\lambda I`,
with score :math:`\\tfrac1n q_i \\phi_j^\\top H^{-1} \\phi_i` (the first-order effect on the test
margin of up-weighting training example ``i`` by ``1/n``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_tda.attribution.features import FeatureRecord, load_features, select_tags
from lightning_tda.store import RunStore, join_name


def _solve_kernel(phi_train: Tensor, damping: float) -> Tensor:
    """``M`` with ``phi_test @ M = phi_test (Phi^T Phi + damping I)^-1 Phi^T``, solved in the
    cheaper space: with ``n <= k`` as ``Phi^T (Phi Phi^T + damping I)^-1`` (equal by the
    push-through identity)."""
    n, k = phi_train.shape
    if n <= k:
        gram = phi_train @ phi_train.T
        gram.diagonal().add_(damping)
        return phi_train.T @ torch.linalg.solve(gram, torch.eye(n, dtype=gram.dtype, device=gram.device))
    cov = phi_train.T @ phi_train
    cov.diagonal().add_(damping)
    return torch.linalg.solve(cov, phi_train.T)


class Scorer:
    """Base class. A scorer turns each checkpoint's train features into a right factor
    ``P_c`` ``[k, n_train]`` (:meth:`prepare`); a test block's scores are
    ``sum_c test_c @ P_c``, then :meth:`finish` averages (and weights) over checkpoints and runs.
    Scores are computed and written block by block of test rows."""

    name = "scorer"

    def __init__(
        self,
        checkpoints: Sequence[str] | int | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.checkpoints = checkpoints
        self.dtype = dtype
        self.device = device
        self.progress = progress

    def prepare(self, train: FeatureRecord) -> Tensor:
        """The right factor ``P`` ``[k, n_train]`` of one checkpoint."""
        raise NotImplementedError

    def test_side(self, phi_test: Tensor) -> Tensor:
        """Transform of a block of test features before ``@ P`` (identity by default)."""
        return phi_test

    def finish(self, total: Tensor, n_checkpoints: int, n_runs: int, q_mean: Tensor) -> Tensor:
        """Scores from the sum over checkpoints (default: their mean)."""
        return total / n_checkpoints

    def score(
        self,
        stores: RunStore | Sequence[RunStore],
        train_split: str = "train",
        test_split: str = "val",
        out: RunStore | None = None,
        block_rows: int = 512,
    ) -> np.ndarray:
        """Scores ``[n_test, n_train]`` over every run in ``stores`` and their chosen checkpoints;
        with ``out``, also written there as ``scores/<name>/<test_split>``."""
        stores = [stores] if isinstance(stores, RunStore) else list(stores)
        if not stores:
            raise ValueError("no stores given: pass one RunStore per training run")
        jobs = [(s, tag) for s in stores for tag in select_tags(s, self.checkpoints)]
        factors: list[tuple[Tensor, Tensor]] = []
        q_sum: Tensor | None = None
        for store, tag in tqdm(jobs, desc=f"{self.name}: checkpoints", disable=not self.progress or len(jobs) < 2):
            train = load_features(store, train_split, tag, self.dtype, self.device)
            test = load_features(store, test_split, tag, self.dtype, self.device)
            train.check_pairs_with(test)
            factors.append((self.test_side(test.phi), self.prepare(train)))
            q_sum = train.q if q_sum is None else q_sum + train.q
        assert q_sum is not None
        n_test, n_train = factors[0][0].shape[0], factors[0][1].shape[1]
        scores = np.empty((n_test, n_train), dtype=np.float32)
        for start in range(0, n_test, block_rows):
            stop = min(start + block_rows, n_test)
            total = sum(test[start:stop] @ p for test, p in factors)
            block = self.finish(total, len(jobs), len(stores), q_sum / len(jobs))  # type: ignore[arg-type]
            scores[start:stop] = block.cpu().numpy()
        if out is not None:
            write_scores(out, self.name, test_split, scores, block_rows)
        return scores


def _unit_rows(phi: Tensor) -> Tensor:
    return phi / phi.norm(dim=1, keepdim=True).clamp_min(torch.finfo(phi.dtype).tiny)


class GradDot(Scorer):
    """Inner products of projected gradients, averaged over checkpoints (and runs)."""

    name = "grad_dot"

    def prepare(self, train: FeatureRecord) -> Tensor:
        return train.phi.T


class GradCos(Scorer):
    """Cosine similarity of projected gradients, averaged over checkpoints (and runs)."""

    name = "grad_cos"

    def prepare(self, train: FeatureRecord) -> Tensor:
        return _unit_rows(train.phi).T

    def test_side(self, phi_test: Tensor) -> Tensor:
        return _unit_rows(phi_test)


class TracIn(Scorer):
    """TracIn-CP: gradient inner products summed over checkpoints, each weighted by the learning
    rate recorded with it; averaged over runs."""

    name = "tracin"

    def prepare(self, train: FeatureRecord) -> Tensor:
        return train.learning_rate * train.phi.T

    def finish(self, total: Tensor, n_checkpoints: int, n_runs: int, q_mean: Tensor) -> Tensor:
        return total / n_runs


class TRAK(Scorer):
    """TRAK (Park et al. 2023): per checkpoint ``phi_test (Phi^T Phi + lambda I)^-1 Phi^T``, averaged
    over checkpoints and runs, times the averaged out-to-loss terms of the training examples.

    Args:
        damping: ``lambda``; ``None`` (default) picks, per checkpoint, the mean squared norm of the
            training features, ``trace(Phi^T Phi) / n`` (the mean eigenvalue of the Gram matrix):
            scale-free, and well posed when ``k`` exceeds the training set. On the digits LDS
            benchmark (n = 1,000, k = 2,048) it gave LDS 0.26 against 0.18 for ``1e-2`` times it
            and 0.11 for a near-zero ridge (see ``benchmarks/RESULTS.md``); with ``k`` well below
            ``n`` and many models, the TRAK paper's ``lambda = 0`` is the usual choice.
    """

    name = "trak"

    def __init__(self, damping: float | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        if damping is not None and damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.damping = damping

    def lam(self, phi: Tensor) -> float:
        if self.damping is not None:
            return float(self.damping)
        return float((phi * phi).sum()) / phi.shape[0]

    def prepare(self, train: FeatureRecord) -> Tensor:
        return _solve_kernel(train.phi, self.lam(train.phi))

    def finish(self, total: Tensor, n_checkpoints: int, n_runs: int, q_mean: Tensor) -> Tensor:
        return (total / n_checkpoints) * q_mean[None, :]


class ProjectedInfluence(Scorer):
    """Influence functions with the Gauss-Newton Hessian in the projected space.

    ``H = (1/n) Phi^T diag(q (1 - q)) Phi + damping I``; score ``(1/n) q_i phi_j^T H^-1 phi_i``
    (up-weighting training example ``i`` by ``1/n``; positive raises the test margin).
    """

    name = "influence_projected"

    def __init__(self, damping: float = 1e-3, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        if damping <= 0:
            raise ValueError(f"damping must be positive, got {damping}")
        self.damping = damping

    def prepare(self, train: FeatureRecord) -> Tensor:
        n = train.phi.shape[0]
        w = (train.q * (1 - train.q)).clamp_min(0)
        h = (train.phi.T * w) @ train.phi / n
        h.diagonal().add_(self.damping)
        return torch.linalg.solve(h, train.phi.T) * (train.q[None, :] / n)


def write_scores(store: RunStore, name: str, test_split: str, scores: np.ndarray, block_rows: int = 256) -> None:
    """Write ``scores`` to ``scores/<name>/<test_split>`` in blocks of test rows (finished blocks are skipped)."""
    array = join_name("scores", name, test_split)
    store.ensure_array(array, scores.shape, "float32", row_axis=0, block_rows=block_rows)
    for start, stop in store.incomplete_blocks(array):
        store.write_block(array, start, scores[start:stop].astype(np.float32))
