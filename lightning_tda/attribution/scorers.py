"""Attribution scorers over recorded projected gradients: GradDot, GradCos, TracIn, TRAK, and
projected Gauss-Newton influence functions.

Every scorer reads one or several RunStores (one per training run), combines each recorded
checkpoint's test features with the *same* checkpoint's train features, and gives scores
``[n_test, n_train]``: **positive means the training example pushes the test output (the margin
by default) up**. The stores must hold one dataset (equal train and test fingerprints). Scores are
computed tile by tile in bounded memory (:mod:`lightning_tda.attribution.streaming`); with
``out=`` they are written to a store as ``scores/<name>/<test split>``, and a rerun computes only
the tiles that are missing.

Notation: checkpoint ``c`` (of ``C``, over every run), train features ``phi^c_i`` (gradients of the
recorded output ``f``), test features ``phi^c_j``, out-to-loss terms ``q^c_i = -d loss / d f``
(so a training example's loss gradient is ``-q^c_i phi^c_i``), learning rate ``eta^c_g`` of
parameter group ``g``, ``n`` training examples, ``R`` runs:

.. math::

    \\text{GradDot}_{ji} = \\tfrac1C \\textstyle\\sum_c \\langle \\phi^c_j, \\phi^c_i \\rangle, \\qquad
    \\text{TracIn}_{ji} = \\tfrac1R \\textstyle\\sum_c q^c_i \\sum_g \\eta^c_g
        \\langle \\phi^c_{j,g}, \\phi^c_{i,g} \\rangle,

    \\text{TRAK}_{ji} = \\Big(\\tfrac1C \\textstyle\\sum_c \\tfrac1n \\phi^c_j
        \\big(\\tfrac1n \\Phi_c^\\top \\Phi_c + \\lambda I\\big)^{-1} \\phi^c_i\\Big)\\,
        \\tfrac1C \\textstyle\\sum_c q^c_i, \\qquad
    \\text{IF}_{ji} = \\tfrac1C \\textstyle\\sum_c \\tfrac1n q^c_i\\, \\phi^c_j H_c^{-1} \\phi^c_i,
    \\quad H_c = \\tfrac1n \\Phi_c^\\top \\operatorname{diag}(q^c (1 - q^c)) \\Phi_c + \\lambda I.

TracIn-CP (Pruthi et al. 2020) is the first-order change of the test output from every SGD
step on the training example: ``-eta <grad f_j, grad loss_i> = eta q_i <phi_j, phi_i>``, each
parameter group at its own rate.

**Damping convention** (one for TRAK, :class:`ProjectedInfluence` and
:func:`~lightning_tda.attribution.influence_scores`): ``lambda`` is added to the curvature of
the **mean** training loss, ``(1/n) sum_i ...``, in the units of weight decay. TRAK's matrix
``(1/n) Phi^T Phi + lambda I`` is traker's ``Phi^T Phi + lambda_reg I`` scaled by ``1/n``:
``lambda_reg = n lambda``. TRAK also takes a scale-free ``relative_damping`` ``r``:
``lambda_reg = r tr(Phi^T Phi) / n`` (``r`` times the mean squared feature norm), i.e.
``lambda = r tr(Phi^T Phi) / n^2``, per checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tda import schema
from lightning_tda.attribution.features import FeatureRecord, require_output
from lightning_tda.attribution.streaming import (
    DEFAULT_MAX_RETURN_BYTES, DEFAULT_MEMORY_BYTES, Job, StoredScores, compute_diagonal, compute_scores,
)
from lightning_tda.store import RunStore

DEFAULT_TRAK_RELATIVE_DAMPING = 1.0
"""TRAK's default ``relative_damping`` ``r`` (``lambda_reg = r tr(Phi^T Phi) / n``)."""
_MARGIN = (schema.OUTPUT_MARGIN,)
_WITH_OUT_TO_LOSS = (schema.OUTPUT_MARGIN, schema.OUTPUT_LOSS, schema.OUTPUT_PROBABILITY)


class Scorer:
    """Base class. A scorer says how each checkpoint's test and train features are transformed
    (:meth:`test_side`, :meth:`train_side`), whether a ``k x k`` kernel sits between them
    (:meth:`curvature_weights`, :meth:`kernel`), and how the sum over checkpoints is finished
    (:meth:`finish`); :mod:`~lightning_tda.attribution.streaming` does the rest.

    Args:
        checkpoints: the records to use per run: all (None), the last ``n`` (an int), or tags.
        dtype: dtype of the matrix products (kernels are always solved in float64).
        device: where the matrix products run ("cuda" on a GPU); features are read on the host
            and moved there block by block, kernels are solved on the host.
        progress: show progress bars.
        memory_bytes: working memory the tiling plans for (the scores themselves live in the
            ``out`` store or the returned array).
    """

    name = "scorer"
    has_kernel = False

    def __init__(
        self,
        checkpoints: Sequence[str] | int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = True,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if memory_bytes < 2**20:
            raise ValueError(f"memory_bytes must be at least 1 MiB, got {memory_bytes}")
        self.checkpoints = checkpoints
        self.dtype = dtype
        self.device = torch.device(device)
        self.progress = progress
        self.memory_bytes = int(memory_bytes)

    # ------------------------------------------------------------------ what a scorer says
    def settings(self) -> dict[str, Any]:
        """What defines the scores (recorded with them; a rerun with other settings is refused)."""
        return {"dtype": str(self.dtype).replace("torch.", "")}

    def check_job(self, job: Job) -> None:
        """Raise when a checkpoint's record cannot be scored by this scorer."""

    def test_side(self, phi_test: Tensor, job: Job) -> Tensor:
        """Transform of a block of test features (before the kernel)."""
        return phi_test

    def train_side(self, phi: Tensor, q: Tensor, job: Job) -> Tensor:
        """Transform of a block of train features (rows scaled)."""
        return phi

    def curvature_weights(self, q: Tensor) -> Tensor | None:
        """Row weights ``w`` of the curvature ``sum_i w_i phi_i phi_i^T`` (kernel scorers)."""
        return None

    def kernel(self, gram: Tensor, n: int) -> Tensor:
        """The ``k x k`` matrix between the test and train sides, from the curvature sum."""
        raise NotImplementedError

    def finish(self, total: Tensor, q_mean: Tensor, n_checkpoints: int, n_runs: int) -> Tensor:
        """Scores from the sum over checkpoints (default: their mean); ``q_mean`` broadcasts
        along the last (training example) axis. May work in place on ``total`` (a tile)."""
        return total.div_(n_checkpoints)

    # ------------------------------------------------------------------ running it
    def score(
        self,
        stores: RunStore | Sequence[RunStore],
        train_split: str = schema.TRAIN_SPLIT,
        test_split: str = "val",
        out: RunStore | None = None,
        overwrite: bool = False,
        tile_rows: int | None = None,
        tile_cols: int | None = None,
        max_return_bytes: int = DEFAULT_MAX_RETURN_BYTES,
    ) -> np.ndarray | StoredScores:
        """Scores ``[n_test, n_train]`` over every run in ``stores`` and their chosen checkpoints.

        With ``out`` they are written there tile by tile as ``scores/<name>/<test_split>`` (a rerun
        computes only missing tiles; other settings are refused unless ``overwrite``). Returns a
        float32 array when the scores take at most ``max_return_bytes``, else a
        :class:`~lightning_tda.attribution.StoredScores` reading them from ``out``.
        ``tile_rows``/``tile_cols`` override the planned tiles."""
        stores = [stores] if isinstance(stores, RunStore) else list(stores)
        return compute_scores(
            self, stores, train_split, test_split, out, overwrite, tile_rows, tile_cols, max_return_bytes
        )

    def score_features(self, train: FeatureRecord, test: FeatureRecord) -> Tensor:
        """Scores ``[n_test, n_train]`` of one checkpoint's features held in memory (the same
        formula as :meth:`score`, without a store: for features computed on the fly)."""
        train.check_pairs_with(test)
        job = Job(0, _InMemory(train), _InMemory(test))  # type: ignore[arg-type]
        self.check_job(job)
        dtype = self.dtype
        left = self.test_side(test.phi.to(dtype), job)
        if self.has_kernel:
            phi = train.phi.to(dtype)
            weights = self.curvature_weights(train.q.to(dtype))
            gram = ((phi.T * weights) @ phi if weights is not None else phi.T @ phi).double().cpu()
            left = (left.double() @ self.kernel(gram, train.phi.shape[0]).to(left.device)).to(dtype)
        total = left @ self.train_side(train.phi.to(dtype), train.q.to(dtype), job).T
        return self.finish(total, train.q.to(dtype), 1, 1)

    def self_scores(self, stores: RunStore | Sequence[RunStore], split: str = schema.TRAIN_SPLIT) -> np.ndarray:
        """The diagonal ``S_ii`` of ``split`` scored against itself, ``[n]`` (float64), computed
        exactly as :meth:`score` computes each entry, without the ``n x n`` matrix."""
        stores = [stores] if isinstance(stores, RunStore) else list(stores)
        return compute_diagonal(self, stores, split)


class _InMemory:
    """A :class:`FeatureRecord` seen as a feature source by the scorers' checks."""

    def __init__(self, record: FeatureRecord) -> None:
        self.record, self.n, self.k = record, record.phi.shape[0], record.phi.shape[1]
        self.output, self.tag, self.store_path = record.output, record.tag, record.store_path

    def column_learning_rates(self) -> Tensor:
        if self.record.learning_rate is None:
            raise ValueError(f"feature record {self.tag!r} has no learning rate; TracIn weights checkpoints by it")
        return torch.full((self.k,), float(self.record.learning_rate), dtype=torch.float64)


def _unit_rows(phi: Tensor) -> Tensor:
    return phi / phi.norm(dim=1, keepdim=True).clamp_min(torch.finfo(phi.dtype).tiny)


class GradDot(Scorer):
    """Inner products of projected gradients, averaged over checkpoints (and runs)."""

    name = "grad_dot"


class GradCos(Scorer):
    """Cosine similarity of projected gradients, averaged over checkpoints (and runs)."""

    name = "grad_cos"

    def test_side(self, phi_test: Tensor, job: Job) -> Tensor:
        return _unit_rows(phi_test)

    def train_side(self, phi: Tensor, q: Tensor, job: Job) -> Tensor:
        return _unit_rows(phi)


class TracIn(Scorer):
    """TracIn-CP: ``sum_c q^c_i sum_g eta^c_g <phi^c_j,g, phi^c_i,g>``, summed over checkpoints and
    averaged over runs; each parameter group ``g`` weighted by its own recorded learning rate.

    Needs records of a built-in output (their out-to-loss term is known) and the learning rates
    recorded with them (raises when none were, or when one projection block mixes rates)."""

    name = "tracin"

    def check_job(self, job: Job) -> None:
        require_output(job.train, _WITH_OUT_TO_LOSS, "TracIn", "it weights each example by its out-to-loss term")
        job.cache["column_rates"] = job.train.column_learning_rates()

    def test_side(self, phi_test: Tensor, job: Job) -> Tensor:
        return phi_test * job.cache["column_rates"].to(device=phi_test.device, dtype=phi_test.dtype)[None, :]

    def train_side(self, phi: Tensor, q: Tensor, job: Job) -> Tensor:
        return phi * q[:, None]

    def finish(self, total: Tensor, q_mean: Tensor, n_checkpoints: int, n_runs: int) -> Tensor:
        return total.div_(n_runs)


class TRAK(Scorer):
    """TRAK (Park et al. 2023): per checkpoint ``(1/n) phi_j ((1/n) Phi^T Phi + lambda I)^-1 phi_i``,
    averaged over checkpoints and runs, times the averaged out-to-loss terms of the training
    examples (needs margin records).

    Args:
        damping: ``lambda`` in the mean-loss convention of the module docstring (traker's
            ``lambda_reg`` is ``n`` times it). Exclusive with ``relative_damping``.
        relative_damping: ``r``: ``lambda_reg = r tr(Phi^T Phi) / n`` per checkpoint, scale-free
            and well posed when ``k`` exceeds the training set. Default
            :data:`DEFAULT_TRAK_RELATIVE_DAMPING` (1.0) when neither is given. ``0`` with
            ``damping=None`` is the TRAK paper's unregularised ``lambda = 0`` (a pseudo-inverse
            where ``Phi^T Phi`` is singular).
    """

    name = "trak"
    has_kernel = True

    def __init__(self, damping: float | None = None, relative_damping: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if damping is not None and relative_damping is not None:
            raise ValueError("give damping (absolute) or relative_damping, not both")
        for label, value in (("damping", damping), ("relative_damping", relative_damping)):
            if value is not None and not value >= 0:
                raise ValueError(f"{label} must be >= 0, got {value}")
        self.damping = damping
        self.relative_damping = (
            relative_damping if relative_damping is not None or damping is not None else DEFAULT_TRAK_RELATIVE_DAMPING
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "damping": self.damping, "relative_damping": self.relative_damping}

    def check_job(self, job: Job) -> None:
        require_output(job.train, _MARGIN, "TRAK", "its kernel and out-to-loss weights are those of the margin")

    def lam(self, phi: Tensor) -> float:
        """traker's ``lambda_reg`` equivalent of this scorer's damping for features ``phi``."""
        n = phi.shape[0]
        if self.damping is not None:
            return float(self.damping) * n
        return float(self.relative_damping) * float((phi.double() ** 2).sum()) / n

    def kernel(self, gram: Tensor, n: int) -> Tensor:
        if self.damping is not None:
            lam = float(self.damping)
        else:
            lam = float(self.relative_damping) * float(gram.diagonal().sum()) / n**2
        return inverse_psd(gram / n, lam) / n

    def finish(self, total: Tensor, q_mean: Tensor, n_checkpoints: int, n_runs: int) -> Tensor:
        return total.div_(n_checkpoints).mul_(q_mean)


class ProjectedInfluence(Scorer):
    """Influence functions with the Gauss-Newton Hessian in the projected space (margin records).

    ``H = (1/n) Phi^T diag(q (1 - q)) Phi + damping I``; score ``(1/n) q_i phi_j^T H^-1 phi_i``: the
    first-order effect on the test margin of up-weighting training example ``i`` by ``1/n`` (one
    more copy of it). Exact for a linear binary classifier's margin, whose Hessian is this
    Gauss-Newton matrix (tested against retraining). Damping as in the module docstring.
    """

    name = "influence_projected"
    has_kernel = True

    def __init__(self, damping: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping}")
        self.damping = damping

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "damping": self.damping}

    def check_job(self, job: Job) -> None:
        require_output(job.train, _MARGIN, "ProjectedInfluence", "its Gauss-Newton weights q (1 - q) are the margin's")

    def curvature_weights(self, q: Tensor) -> Tensor:
        return (q * (1 - q)).clamp_min(0)

    def kernel(self, gram: Tensor, n: int) -> Tensor:
        return inverse_psd(gram / n, float(self.damping))

    def train_side(self, phi: Tensor, q: Tensor, job: Job) -> Tensor:
        return phi * (q / job.train.n)[:, None]


def inverse_psd(matrix: Tensor, damping: float) -> Tensor:
    """``(matrix + damping I)^-1`` of a symmetric positive semi-definite ``matrix`` (float64):
    by Cholesky when that succeeds, else by eigendecomposition as a pseudo-inverse (eigenvalues
    below ``k eps`` times the largest count as zero), so ``damping = 0`` on singular features
    gives the minimum-norm solution instead of an error."""
    k = matrix.shape[0]
    damped = matrix.double().clone()
    damped.diagonal().add_(damping)
    if damping > 0:
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.cholesky_inverse(factor)
    values, vectors = torch.linalg.eigh(damped)
    cutoff = k * torch.finfo(torch.float64).eps * float(values.abs().max().clamp_min(1e-300))
    inverted = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff), torch.zeros_like(values))
    return (vectors * inverted) @ vectors.T


def write_scores(store: RunStore, name: str, test_split: str, scores: np.ndarray, block_rows: int = 256) -> None:
    """Write an in-memory ``scores`` array to ``scores/<name>/<test_split>`` in blocks of test rows
    (finished blocks are skipped). The scorers' ``score(out=...)`` writes their own tiles."""
    array = schema.scores_array(name, test_split)
    store.ensure_array(array, scores.shape, "float32", row_axis=0, block_rows=block_rows)
    for start, stop in store.incomplete_blocks(array):
        store.write_block(array, start, scores[start:stop].astype(np.float32))
