"""ModelDiff's core on two attribution matrices: residuals, their principal components, and the
variance each algorithm has along them (Shah, Park, Ilyas, Madry, *ModelDiff: A Framework for
Comparing Learning Algorithms*, ICML 2023).

Inputs are two attribution matrices over the same examples, ``A`` and ``B`` ``[n_test, n_train]``
(row ``i``: how every training example moves algorithm A's, resp. B's, prediction on test example
``i``; TRAK or datamodel scores). The steps, each a function below:

1. **Normalise** each test example's attribution vector to unit L2 norm,
   :math:`\\hat a_i = a_i / \\lVert a_i\\rVert`, :math:`\\hat b_i = b_i / \\lVert b_i\\rVert`.
2. **Residual**: remove from A's vector its projection on B's, per test example,

   .. math::
       r_i = \\hat a_i - \\frac{\\langle \\hat a_i, \\hat b_i\\rangle}{\\lVert \\hat b_i\\rVert^2}\\, \\hat b_i ,

   what A's prediction on example ``i`` depends on that B's does not.
3. **PCA** of the residual matrix ``R`` (rows ``r_i``): the top right singular vectors of the
   column-centred residual :math:`R_c = R - \\mathbf 1 \\mu^\\top`, unit vectors ``v_j`` in
   training-set space: the *distinguishing training directions*. The *loading* of test example
   ``i`` on direction ``j`` is :math:`(R_c v_j)_i` (the PCA score).
4. **Explained variance** of each direction under each algorithm: with :math:`\\tilde A_c` the
   row-normalised, column-centred matrix of A,

   .. math::
       \\operatorname{var}_A(v) = \\frac{\\lVert \\tilde A_c v\\rVert^2}{\\lVert \\tilde A_c\\rVert_F^2},

   the fraction of A's total variance along ``v`` (likewise for B). A distinguishing direction
   of A has a large :math:`\\operatorname{var}_A` and a small :math:`\\operatorname{var}_B`.

**Paper or package.** The paper normalises before the residual (step 1 then 2), as MadryLab's
research code does (``DatamodelResidualPCA``). The ``modeldiff`` package on PyPI
(``residual_pca``) takes the residual of the *raw* scores, ``a_i - <a_i, b_i>/||b_i||^2 b_i``,
which weights each test example's residual by ``||a_i||`` in the PCA. We follow the paper by
default (``residual_of="normalized"``); ``residual_of="raw"`` gives the package's residual. The
package reports ``||\\tilde A_c v||^2 / n_test`` as the variance (its total is taken as 1); that
number is ``variance * total_variance`` here (both are returned). Both are tested against the
package and against a plain numpy/sklearn computation.

**Memory.** The centred residual is never formed: ``R_c = D_\\alpha A - D_\\beta B - \\mathbf 1
\\mu^\\top`` with per-row scalars :math:`\\alpha, \\beta`, so its products with thin matrices are
products with ``A`` and ``B``, or with the uncentred residual ``D_\\alpha A - D_\\beta B`` held in
memory (:class:`ResidualOperator`; ``store_residual``, the default, halves the passes over
memory for 0.5x the two inputs' size), and the PCA is a randomized SVD (Halko, Martinsson,
Tropp 2011) with power iterations. Besides that, extra memory is ``O((n_test + n_train) * (num +
oversample))``; no ``n_train x n_train`` matrix is ever made. Small inputs take an exact SVD of
the dense residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
ResidualOf = Literal["normalized", "raw"]
Method = Literal["auto", "exact", "randomized"]

EXACT_MAX_ENTRIES = 2**24
"""``method="auto"`` takes the exact SVD of the dense residual up to this many entries (16.8 M:
64 MiB in float32); above it, the randomized SVD on the implicit residual."""


def as_scores(scores: ArrayLike, name: str) -> Tensor:
    """``scores`` as a 2-D float tensor sharing memory with a float32/float64 input (other dtypes
    are converted to float32)."""
    if isinstance(scores, np.ndarray):
        if scores.dtype not in (np.float32, np.float64):
            scores = scores.astype(np.float32)
        scores = torch.from_numpy(scores)
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor [n_test, n_train], got {type(scores).__name__}")
    if scores.dtype not in (torch.float32, torch.float64):
        if scores.dtype.is_complex:
            raise TypeError(f"{name} must be real, got dtype {scores.dtype}")
        scores = scores.float()
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_test, n_train], got shape {tuple(scores.shape)}")
    if min(scores.shape) < 1:
        raise ValueError(f"{name} is empty (shape {tuple(scores.shape)})")
    return scores.detach().cpu()


def check_pair(scores_a: ArrayLike, scores_b: ArrayLike, names: tuple[str, str] = ("scores_a", "scores_b")) -> tuple[Tensor, Tensor]:
    """Both matrices as tensors of one dtype and the same shape, or a clear error."""
    a, b = as_scores(scores_a, names[0]), as_scores(scores_b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has shape {tuple(b.shape)}: both must be "
            "[n_test, n_train] attribution scores over the same test and training examples, in the same order"
        )
    if a.dtype != b.dtype:  # one dtype for the products; the higher precision
        a, b = a.double(), b.double()
    return a, b


class RankError(ValueError):
    """The residual has fewer independent directions than asked for."""


def _block_rows(n_cols: int) -> int:
    return max(1, 2**22 // max(n_cols, 1))  # blocks of about 4 M entries


def row_statistics(a: Tensor, b: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Row norms of ``a`` (and of ``b``, and the row inner products ``<a_i, b_i>``), computed in
    the inputs' dtype in row blocks (no temporary of the inputs' size; torch's float64 reductions
    of float32 data are 20x slower on the CPU) and returned in float64."""
    n, d = a.shape
    norm_a = torch.empty(n, dtype=a.dtype)
    norm_b = torch.empty(n, dtype=a.dtype) if b is not None else None
    dots = torch.empty(n, dtype=a.dtype) if b is not None else None
    step = _block_rows(d)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        norm_a[lo:hi] = torch.linalg.vector_norm(a[lo:hi], dim=1)
        if b is not None:
            norm_b[lo:hi] = torch.linalg.vector_norm(b[lo:hi], dim=1)  # type: ignore[index]
            dots[lo:hi] = (a[lo:hi] * b[lo:hi]).sum(1)  # type: ignore[index]
    return norm_a.double(), None if norm_b is None else norm_b.double(), None if dots is None else dots.double()


def _times(x: Tensor, matrix: Tensor) -> Tensor:
    """``matrix @ x`` for a thin ``x``, computed as ``(x^T matrix^T)^T``: BLAS runs the wide
    product about twice as fast on the CPU (measured for ``[2000, 10000] @ [10000, 15]``)."""
    return (x.T @ matrix.T).T


def _times_transposed(y: Tensor, matrix: Tensor) -> Tensor:
    """``matrix^T @ y`` for a thin ``y``, as ``(y^T matrix)^T``."""
    return (y.T @ matrix).T


def _check_rows(norms: Tensor, name: str) -> None:
    if not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten()[:5].tolist()
        raise ValueError(f"{name} has non-finite values (NaN or inf) in test rows {bad}")
    zero = torch.nonzero(norms == 0).flatten()
    if len(zero):
        raise ValueError(
            f"{name} has {len(zero)} all-zero test rows (first {zero[:5].tolist()}): their attribution "
            "vectors cannot be normalised; drop those test examples from both matrices"
        )


class ResidualOperator:
    """The column-centred residual ``R_c = D_alpha A - D_beta B - 1 mu^T`` as an operator: products
    with thin matrices, never the matrix itself (unless :meth:`dense` is asked for).

    ``residual_of="normalized"`` (the paper): ``alpha_i = 1/||a_i||``,
    ``beta_i = <a_i, b_i> / (||a_i|| ||b_i||^2)``; ``"raw"`` (the PyPI package): ``alpha_i = 1``,
    ``beta_i = <a_i, b_i> / ||b_i||^2``.
    """

    def __init__(self, a: Tensor, b: Tensor, residual_of: ResidualOf = "normalized") -> None:
        if residual_of not in ("normalized", "raw"):
            raise ValueError(f"residual_of must be 'normalized' (the paper) or 'raw' (the PyPI package), got {residual_of!r}")
        self.a, self.b, self.residual_of = a, b, residual_of
        norm_a, norm_b, dots = row_statistics(a, b)
        assert norm_b is not None and dots is not None
        _check_rows(norm_a, "scores_a")
        _check_rows(norm_b, "scores_b")
        self.norm_a, self.norm_b, self.dots = norm_a, norm_b, dots
        self.cosine = dots / (norm_a * norm_b)
        if residual_of == "normalized":
            alpha, beta = 1.0 / norm_a, dots / (norm_a * norm_b**2)
        else:
            alpha, beta = torch.ones_like(norm_a), dots / norm_b**2
        self.alpha, self.beta = alpha.to(a.dtype), beta.to(a.dtype)
        n = a.shape[0]
        self.mean = (self.alpha @ self.a - self.beta @ self.b) / n  # [n_train]
        row_sq = alpha**2 * norm_a**2 - 2 * alpha * beta * dots + beta**2 * norm_b**2  # ||r_i||^2
        self.frobenius_sq = float(row_sq.clamp_min(0).sum() - n * float((self.mean.double() ** 2).sum()))
        self.scale_sq = float((alpha**2 * norm_a**2).sum())  # ||D_alpha A||_F^2: the size of the inputs
        self.stored: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.a.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def matmul(self, x: Tensor) -> Tensor:
        """``R_c @ x`` for ``x`` ``[n_train, q]``: ``[n_test, q]``."""
        shift = (self.mean @ x)[None, :]
        if self.stored is not None:
            return _times(x, self.stored) - shift
        return self.alpha[:, None] * _times(x, self.a) - self.beta[:, None] * _times(x, self.b) - shift

    def rmatmul(self, y: Tensor) -> Tensor:
        """``R_c^T @ y`` for ``y`` ``[n_test, q]``: ``[n_train, q]``."""
        correction = self.mean[:, None] * y.sum(0)[None, :]
        if self.stored is not None:
            return _times_transposed(y, self.stored) - correction
        return _times_transposed(self.alpha[:, None] * y, self.a) - _times_transposed(self.beta[:, None] * y, self.b) - correction

    def dense(self, centred: bool = True) -> Tensor:
        """The residual matrix itself ``[n_test, n_train]`` (for small inputs and tests)."""
        r = self.alpha[:, None] * self.a - self.beta[:, None] * self.b
        return r - self.mean[None, :] if centred else r

    def store(self) -> None:
        """Hold the uncentred residual in memory (one more matrix of the inputs' size, built in
        row blocks): each product then reads one matrix instead of both inputs, twice as fast."""
        if self.stored is not None:
            return
        n, d = self.shape
        stored = torch.empty(n, d, dtype=self.dtype)
        step = _block_rows(d)
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            torch.mul(self.a[lo:hi], self.alpha[lo:hi, None], out=stored[lo:hi])
            stored[lo:hi].sub_(self.b[lo:hi] * self.beta[lo:hi, None])
        self.stored = stored


def residual(scores_a: ArrayLike, scores_b: ArrayLike, residual_of: ResidualOf = "normalized") -> Tensor:
    """The (uncentred) residual matrix of A against B ``[n_test, n_train]`` (module docstring, step 2)."""
    a, b = check_pair(scores_a, scores_b)
    return ResidualOperator(a, b, residual_of).dense(centred=False)


@dataclass(frozen=True)
class PrincipalComponents:
    """Top principal components of a centred matrix: ``components`` ``[num, n_train]`` (unit rows,
    each signed so its largest-magnitude entry is positive), ``loadings`` ``[n_test, num]``
    (``R_c @ components.T``), ``singular_values`` ``[num]``, and ``explained_variance_ratio``
    ``[num]`` (``s_j^2 / ||R_c||_F^2``)."""

    components: Tensor
    loadings: Tensor
    singular_values: Tensor
    explained_variance_ratio: Tensor


def _orient(components: Tensor) -> Tensor:
    """Flip each row so that its largest-magnitude entry is positive (a deterministic sign)."""
    pivot = components.gather(1, components.abs().argmax(1, keepdim=True))
    return components * torch.where(pivot < 0, -1.0, 1.0).to(components.dtype)


def max_rank(shape: tuple[int, int]) -> int:
    """The largest rank a column-centred ``[n_test, n_train]`` matrix can have."""
    return min(shape[0] - 1, shape[1])


def principal_components(
    operator: ResidualOperator,
    num: int,
    method: Method = "auto",
    oversample: int = 10,
    power_iterations: int = 7,
    seed: int = 0,
    store_residual: bool = True,
) -> PrincipalComponents:
    """The top ``num`` principal components of the centred residual (module docstring, step 3).

    ``method="exact"`` takes the SVD of the dense centred residual; ``"randomized"`` a randomized
    SVD of the operator with ``num + oversample`` columns and ``power_iterations`` power
    iterations (re-orthonormalised every half step), from ``torch.Generator`` seed ``seed``;
    ``"auto"`` is exact up to :data:`EXACT_MAX_ENTRIES` entries. ``store_residual`` holds the
    uncentred residual in memory for the randomized SVD (peak memory 1.5x the two inputs, about
    twice as fast); ``False`` keeps it implicit (the inputs plus thin matrices only).
    """
    n, d = operator.shape
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    if num > max_rank((n, d)):
        raise RankError(
            f"num={num} is larger than the rank of the centred residual, which is at most "
            f"min(n_test - 1, n_train) = {max_rank((n, d))} for {n} test and {d} training examples; ask for fewer directions"
        )
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if oversample < 0 or power_iterations < 0:
        raise ValueError(f"oversample and power_iterations must be >= 0, got {oversample}, {power_iterations}")
    exact = method == "exact" or (method == "auto" and n * d <= EXACT_MAX_ENTRIES)
    if exact:
        _, s, vh = torch.linalg.svd(operator.dense(centred=True), full_matrices=False)
        s, vh = s[:num], vh[:num]
    else:
        if store_residual:
            operator.store()
        s, vh = _randomized_svd(operator, num, oversample, power_iterations, seed)
    tolerance = float(torch.finfo(operator.dtype).eps) ** 0.5 * max(operator.scale_sq, 1e-300) ** 0.5
    rank = int((s > tolerance).sum())
    if rank < num:
        raise RankError(
            f"num={num} is larger than the numerical rank {rank} of the residual: "
            + ("A's attributions are B's up to scale on every test example, so nothing distinguishes them"
               if rank == 0 else "ask for fewer directions")
        )
    components = _orient(vh)
    loadings = operator.matmul(components.T)
    operator.stored = None  # free it before the variances are computed
    total = max(operator.frobenius_sq, 1e-300)
    return PrincipalComponents(components, loadings, s, (s.double() ** 2 / total).to(s.dtype))


def _randomized_svd(operator: ResidualOperator, num: int, oversample: int, power_iterations: int, seed: int) -> tuple[Tensor, Tensor]:
    n, d = operator.shape
    width = min(num + oversample, n, d)
    generator = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(d, width, generator=generator, dtype=operator.dtype)
    q = torch.linalg.qr(operator.matmul(omega)).Q  # [n, width]
    for _ in range(power_iterations):
        z = torch.linalg.qr(operator.rmatmul(q)).Q  # [d, width]
        q = torch.linalg.qr(operator.matmul(z)).Q
    bt = operator.rmatmul(q)  # (Q^T R_c)^T: [d, width]
    u, s, _ = torch.linalg.svd(bt, full_matrices=False)  # right singular vectors of Q^T R_c = columns of u
    return s[:num], u[:, :num].T.contiguous()


def variance_along(scores: ArrayLike, directions: ArrayLike, name: str = "scores") -> tuple[Tensor, float]:
    """Variance of the row-normalised, column-centred ``scores`` along each unit row of
    ``directions`` ``[num, n_train]``, as a fraction of its total variance; and that total
    (per test example: ``||\\tilde A_c||_F^2 / n_test``). Module docstring, step 4."""
    x = as_scores(scores, name)
    v = as_scores(directions, "directions").to(x.dtype)
    if v.shape[1] != x.shape[1]:
        raise ValueError(f"directions have {v.shape[1]} columns but {name} has {x.shape[1]} training examples")
    norms, _, _ = row_statistics(x)
    _check_rows(norms, name)
    inverse = (1.0 / norms).to(x.dtype)
    n = x.shape[0]
    projections = inverse[:, None] * _times(v.T, x)  # [n, num]: normalised rows times directions
    projections = projections - projections.mean(0, keepdim=True)
    variance = (projections.double() ** 2).sum(0) / n
    mean_row = (inverse @ x).double() / n
    total = 1.0 - float((mean_row**2).sum())  # rows have unit norm: ||X_c||_F^2 / n = 1 - ||mean||^2
    return (variance / max(total, 1e-300)).to(x.dtype), total


@dataclass(frozen=True)
class ResidualPCA:
    """What :func:`residual_pca` returns (tensors, CPU)."""

    directions: Tensor
    loadings: Tensor
    singular_values: Tensor
    residual_variance_ratio: Tensor
    variance_a: Tensor
    variance_b: Tensor
    total_variance_a: float
    total_variance_b: float
    cosine: Tensor


def residual_pca(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    num: int = 5,
    residual_of: ResidualOf = "normalized",
    method: Method = "auto",
    oversample: int = 10,
    power_iterations: int = 7,
    seed: int = 0,
    store_residual: bool = True,
) -> ResidualPCA:
    """Steps 1-4 of the module docstring: the ``num`` directions A uses and B does not.

    Returns the directions ``[num, n_train]``, the test loadings ``[n_test, num]``, the residual's
    singular values and explained-variance ratios, the variance fractions of A and B along each
    direction with their totals, and the per-test-example cosine of A's and B's attributions.
    """
    a, b = check_pair(scores_a, scores_b)
    operator = ResidualOperator(a, b, residual_of)
    pcs = principal_components(operator, num, method, oversample, power_iterations, seed, store_residual)
    variance_a, total_a = variance_along(a, pcs.components, "scores_a")
    variance_b, total_b = variance_along(b, pcs.components, "scores_b")
    return ResidualPCA(
        pcs.components, pcs.loadings, pcs.singular_values, pcs.explained_variance_ratio,
        variance_a, variance_b, total_a, total_b, operator.cosine,
    )


__all__ = [
    "EXACT_MAX_ENTRIES", "PrincipalComponents", "RankError", "ResidualOperator", "ResidualPCA", "as_scores", "check_pair",
    "max_rank", "principal_components", "residual", "residual_pca", "row_statistics", "variance_along",
]
