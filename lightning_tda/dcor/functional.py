r"""Distance correlation (dCor), its bias-corrected square, and partial dCor: the functional core.

Depends on ``torch`` alone (no Lightning, no torchmetrics), so it can be imported anywhere. Every
function takes samples as rows: ``x`` of shape ``[n, ...]`` (trailing dimensions are flattened,
so ``x`` and ``y`` may have different widths and shapes), float32 or float64 (other dtypes are
converted to the default float dtype), on any device, and is differentiable.

Estimators (names as in the ``dcor`` package, which the tests hold us equal to):

- :func:`distance_covariance_sqr` / :func:`distance_correlation_sqr` and their square roots
  :func:`distance_covariance` / :func:`distance_correlation`: the biased V-statistics of Székely,
  Rizzo & Bakirov (2007), built from double-centred distance matrices.
- :func:`u_distance_covariance_sqr` / :func:`u_distance_correlation_sqr`: the bias-corrected
  squares from U-centred matrices (Székely & Rizzo 2014); may be negative; need ``n >= 4``.
- :func:`partial_distance_covariance` / :func:`partial_distance_correlation`: pdCov / pdCor of
  Székely & Rizzo (2014): ``x`` and ``y`` both projected off ``z`` in the Hilbert space of
  U-centred distance matrices.
- :func:`semi_partial_distance_correlation`: what the public code of Zhen et al. (ECCV 2022)
  computes under the name "partial distance correlation": only ``x`` is projected off ``z``.

How it is computed. Every statistic is a function of the *terms* of the distance matrices
:math:`a^{(p)}_{ij} = \|x^{(p)}_i - x^{(p)}_j\|` of the inputs: the entrywise inner products
:math:`S_{pq} = \sum_{ij} a^{(p)}_{ij} a^{(q)}_{ij}` and the row sums
:math:`r^{(p)}_i = \sum_j a^{(p)}_{ij}`. Centring never has to be materialised, because

.. math::

    \langle \tilde A, \tilde B \rangle_V &= \frac{S_{ab}}{n^2} - \frac{2\, r_a \cdot r_b}{n^3}
        + \frac{t_a t_b}{n^4}, \\
    \langle \tilde A, \tilde B \rangle_U &= \frac{1}{n(n-3)} \Big( S_{ab}
        - \frac{2\, r_a \cdot r_b}{n-2} + \frac{t_a t_b}{(n-1)(n-2)} \Big),
    \qquad t_a = \textstyle\sum_i r_{a,i}.

Two paths compute the terms and give the same values:

- ``"dense"``: whole distance matrices with ``torch.cdist`` (exact differences, no Gram trick),
  plain autograd (higher-order gradients work). Memory ``O(n^2)`` per input.
- ``"blockwise"``: one pass over tiles of the upper triangle (the matrices are symmetric; each
  unordered pair is computed once), ``block_size // 4`` rows by up to ``4 * block_size``
  columns. A tile's squared distances come from one matrix product of the centred inputs
  augmented with their squared norms, ``[-2 c_i, |c_i|^2, 1] . [c_j, 1, |c_j|^2]``; the sums
  are accumulated in float64; a custom autograd function recomputes the tiles in its backward
  pass. It never holds an ``n x n`` matrix: memory ``O(n d + k block_size^2)`` for ``k``
  inputs. Squared distances within the Gram identity's rounding noise (about
  ``eps * sqrt(d)`` of the squared norms) are set to exactly 0, so duplicated rows behave as
  on the dense path; on GPUs float32 products run without TF32 while tiles are computed.

``method="auto"`` (the default) takes the dense path up to :data:`DENSE_MAX_N` samples and the
blockwise path above.

Gradients are stable: a zero distance (the diagonal, duplicated rows) contributes the
subgradient 0 rather than ``0/0``; correlations whose denominator is 0 (a constant input) are 0
with zero gradient, as the ``dcor`` package defines their value; square roots of 0 have gradient
0.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "DENSE_MAX_N",
    "DEFAULT_BLOCK_SIZE",
    "Method",
    "distance_covariance_sqr",
    "distance_covariance",
    "u_distance_covariance_sqr",
    "distance_correlation_sqr",
    "distance_correlation",
    "u_distance_correlation_sqr",
    "partial_distance_covariance",
    "partial_distance_correlation",
    "semi_partial_distance_correlation",
    "distance_terms",
    "correlations_from_terms",
    "check_method",
    "STATISTICS",
    "PARTIAL_STATISTICS",
    "resolve_statistic",
]

Method = Literal["auto", "dense", "blockwise"]

DENSE_MAX_N = 256
"""``method="auto"`` uses the dense path up to this many samples and the blockwise path above
(where it is faster: its distances come from matrix products)."""

DEFAULT_BLOCK_SIZE = None
"""``block_size=None`` picks the tile size of the blockwise path by device: 512 on the CPU
(tiles of 128 x 2048 stay in cache), 4096 on GPUs (fewer kernel launches). A tile holds at most
``block_size^2`` entries per input; peak extra memory is a few such tiles."""

_CPU_BLOCK, _GPU_BLOCK = 512, 4096

_METHODS = ("auto", "dense", "blockwise")


# ---------------------------------------------------------------------------------- input checks


def _prepare(
    named: Sequence[tuple[str, object]], min_n: int, what: str, check_finite: bool
) -> list[Tensor]:
    """Validate and flatten inputs to ``[n, d]`` tensors of one floating dtype and device."""
    out: list[Tensor] = []
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [n, ...], got {type(t).__name__}")
        if t.ndim == 0:
            raise ValueError(f"{name} is a scalar; expected samples as rows, shape [n, ...]")
        if t.is_complex():
            raise TypeError(f"{name} is complex ({t.dtype}); distance correlation needs real inputs")
        t = t.flatten(1) if t.ndim > 1 else t[:, None]
        if t.shape[1] == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: each sample needs at least one feature")
        out.append(t)
    n = out[0].shape[0]
    for (name, _), t in zip(named, out):
        if t.shape[0] != n:
            sizes = ", ".join(f"{nm} has {u.shape[0]}" for (nm, _), u in zip(named, out))
            raise ValueError(f"inputs must have the same number of samples (rows): {sizes}")
        if t.device != out[0].device:
            raise ValueError(
                f"inputs must be on one device: {named[0][0]} is on {out[0].device}, {name} on {t.device}"
            )
    if n < min_n:
        raise ValueError(f"{what} needs at least {min_n} samples, got n={n}")
    dtype = torch.get_default_dtype()
    floats = [t.dtype for t in out if t.is_floating_point()]
    if floats:
        dtype = floats[0]
        for dt in floats[1:]:
            dtype = torch.promote_types(dtype, dt)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    out = [t.to(dtype) for t in out]
    # one reduction and one sync for all inputs: a non-finite value makes its sum non-finite (an
    # overflowing sum of finite values only triggers the exact check, which then finds nothing)
    if check_finite and not bool(torch.isfinite(torch.stack([t.sum() for t in out])).all()):
        for (name, _), t in zip(named, out):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                rows = torch.nonzero(bad.any(1)).flatten()
                raise ValueError(
                    f"{name} has {int(bad.sum())} non-finite values (NaN or inf) in {rows.numel()} rows, "
                    f"first rows {rows[:5].tolist()}; distance correlation is undefined for them"
                )
    return out


def check_method(method: str, block_size: int | None) -> None:
    """Raise a clear error for a ``method`` or ``block_size`` the estimators do not take."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


def _resolve_method(method: str, n: int, block_size: int | None, device: torch.device) -> tuple[str, int]:
    """The path to take and the tile size."""
    check_method(method, block_size)
    if block_size is None:
        block_size = _CPU_BLOCK if device.type == "cpu" else _GPU_BLOCK
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_N else "blockwise"
    return method, block_size


# ---------------------------------------------------------------------------------- terms


def _dense_terms(xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``S`` [k, k] and row sums ``R`` [k, n] from whole distance matrices (plain autograd)."""
    # Exact differences (no Gram trick): duplicated rows give exactly 0, and cdist's backward
    # gives the subgradient 0 at zero distances.
    ds = [torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") for x in xs]
    k = len(ds)
    upper = {(p, q): (ds[p] * ds[q]).sum().double() for p in range(k) for q in range(p, k)}
    s = torch.stack([torch.stack([upper[min(p, q), max(p, q)] for q in range(k)]) for p in range(k)])
    r = torch.stack([d.sum(1) for d in ds]).double()
    return s, r


def _tile_shape(block: int) -> tuple[int, int]:
    """Rows and widest column span of the blockwise path's tiles (at most ``block**2`` entries):
    ``block // 4`` rows, so that the half-wasted diagonal blocks stay small, by up to
    ``block**2 // rows`` columns (a multiple of the rows)."""
    rows = max(1, block // 4)
    return rows, max(rows, block * block // rows // rows * rows)


def _tiles(n: int, rows: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    """Tiles ``(i0, i1, j0, j1)`` covering the upper triangle: each row block ``i0:i1`` from its
    diagonal block (at the start of its first tile) to column ``n``, in spans of ``width``."""
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        for j0 in range(i0, n, width):
            yield i0, i1, j0, min(j0 + width, n)


class _Operand:
    """One input, centred, laid out for distance tiles from a single matrix product.

    ``rhs`` is ``[c, 1, |c|^2]`` (``[n, d + 2]``, ``c`` the centred rows): with the row block's
    ``[-2 c_i, |c_i|^2, 1]`` on the left, one product gives the squared distances
    ``|c_i|^2 + |c_j|^2 - 2 c_i . c_j`` (no broadcast sums, no extra pass)."""

    def __init__(self, x: Tensor, rows: int) -> None:
        n, d = x.shape
        self.d, self.rows = d, rows
        self.rhs = x.new_empty(n, d + 2)
        c = self.rhs[:, :d]
        torch.sub(x, x.mean(0), out=c)
        self.rhs[:, d] = 1.0
        # squared norms by row chunks: no [n, d] temporary at large n
        sq = torch.cat([(part * part).sum(1) for part in c.split(8192)])
        self.rhs[:, d + 1] = sq
        # the largest squared norm of each row block, and the relative size below which a squared
        # distance from the Gram identity is rounding noise
        pad = (-n) % rows
        self.block_max = torch.nn.functional.pad(sq, (0, pad)).view(-1, rows).amax(1).tolist()
        self.tol = 2.0 * torch.finfo(x.dtype).eps * math.sqrt(d)
        # rhs columns -> lhs columns: [c, 1, |c|^2] -> [-2 c, |c|^2, 1]
        self.perm = torch.cat([torch.arange(d), torch.tensor([d + 1, d])]).to(x.device)
        self.scale = torch.cat([torch.full((d,), -2.0), torch.ones(2)]).to(x)

    @property
    def centred(self) -> Tensor:
        return self.rhs[:, : self.d]

    def lhs(self, i0: int, i1: int) -> Tensor:
        """``[-2 c_i, |c_i|^2, 1]`` for the rows ``i0:i1``."""
        return torch.index_select(self.rhs[i0:i1], 1, self.perm).mul_(self.scale)

    def bound(self, i0: int, j0: int, j1: int) -> float:
        """Squared distances of the tile at or below this are rounding noise (duplicated rows)."""
        rows = self.rows
        return self.tol * (self.block_max[i0 // rows] + max(self.block_max[j0 // rows : -(-j1 // rows)]))


def _upper_mask(ops: Sequence[_Operand], rows: int) -> Tensor:
    """``[rows, rows]``: 1 where ``i < j``, else 0 (the diagonal blocks keep each unordered pair
    once; a smaller last block uses the top-left corner)."""
    index = torch.arange(min(rows, ops[0].rhs.shape[0]), device=ops[0].rhs.device)
    return (index[:, None] < index[None, :]).to(ops[0].rhs.dtype)


class _RowBlock:
    """What the tiles of rows ``i0:i1`` share: each input's left factor, and the mask of the
    diagonal block's pairs ``i < j``."""

    def __init__(self, ops: Sequence[_Operand], mask: Tensor, i0: int, i1: int) -> None:
        self.lhs = [op.lhs(i0, i1) for op in ops]
        self.upper = mask[: i1 - i0, : i1 - i0]


def _tile_distances(
    ops: Sequence[_Operand], block: _RowBlock, i0: int, i1: int, j0: int, j1: int, buffer: Tensor
) -> Tensor:
    """Distances ``[k, i1 - i0, j1 - j0]`` between rows ``i0:i1`` and ``j0:j1`` of each input, in
    ``buffer``; in the diagonal block (a tile with ``j0 == i0``) only pairs ``i < j`` are kept
    (the rest is 0), so that every unordered pair is counted exactly once over the tiles."""
    k, b, w = len(ops), i1 - i0, j1 - j0
    t = buffer[: k * b * w].view(k, b, w)
    for p, op in enumerate(ops):
        torch.mm(block.lhs[p], op.rhs[j0:j1].T, out=t[p])
    if i0 == j0:
        # a product with a 0/1 mask: 6x faster than masked_fill_, and unlike triu_ it opens no
        # parallel region for small tiles (slow on a busy machine)
        t[:, :, :b].mul_(block.upper)
    for p, op in enumerate(ops):
        # squared distances within rounding noise of 0 (duplicated rows) become exactly 0
        torch.nn.functional.threshold_(t[p], op.bound(i0, j0, j1), 0.0)
    if t.device.type == "cpu":
        # 1 / rsqrt: torch's float64 sqrt is not vectorised on the CPU (1.8x slower); 0 -> inf -> 0
        torch.rsqrt(t, out=t).reciprocal_()
    else:
        t.sqrt_()
    return t


def _distance_tiles(ops: Sequence[_Operand], width: int) -> Iterator[tuple[int, int, int, int, Tensor]]:
    """``(i0, i1, j0, j1, distances [k, i1 - i0, j1 - j0])`` over the tiles of the upper triangle
    (:func:`_tile_distances`), in one reused buffer: a tile's distances are valid until the next."""
    rows, n = ops[0].rows, ops[0].rhs.shape[0]
    buffer = ops[0].rhs.new_empty(len(ops) * rows * min(width, n))
    mask = _upper_mask(ops, rows)
    for i0, i1, j0, j1 in _tiles(n, rows, width):
        if j0 == i0:
            block = _RowBlock(ops, mask, i0, i1)
        yield i0, i1, j0, j1, _tile_distances(ops, block, i0, i1, j0, j1, buffer)


@contextlib.contextmanager
def _full_precision_matmul(x: Tensor) -> Iterator[None]:
    """float32 products in full precision (no TF32) on GPUs while tiles are computed: the
    distances come from ``|a|^2 + |b|^2 - 2 a.b``, which TF32's 10-bit mantissa would ruin."""
    if x.device.type != "cuda" or x.dtype != torch.float32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class _BlockwiseTerms(torch.autograd.Function):
    """``S`` and ``R`` over tiles of the upper triangle; the backward pass recomputes the tiles."""

    @staticmethod
    def forward(ctx, block_size: int, *xs: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        with _full_precision_matmul(xs[0]):
            s, r = _BlockwiseTerms._terms(block_size, xs)
        ctx.block_size = block_size
        ctx.save_for_backward(*xs)
        return s, r

    @staticmethod
    def _terms(block_size: int, xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        rows, width = _tile_shape(block_size)
        ops = [_Operand(x, rows) for x in xs]
        k, n = len(xs), xs[0].shape[0]
        acc = torch.float64
        r = torch.zeros(k, n, dtype=acc, device=xs[0].device)
        pairs = [(p, q) for p in range(k) for q in range(p, k)]
        upper = torch.zeros(len(pairs), dtype=acc, device=xs[0].device)
        dots: list[Tensor] = []  # per tile and pair, added to `upper` in float64 now and then
        for i0, i1, j0, j1, t in _distance_tiles(ops, width):
            flat = t.view(k, -1)
            dots.extend(torch.dot(flat[p], flat[q]) for p, q in pairs)
            r[:, i0:i1] += t.sum(2)
            r[:, j0:j1] += t.sum(1)
            if len(dots) >= 1024 * len(pairs):
                upper += torch.stack(dots).view(-1, len(pairs)).to(acc).sum(0)
                dots.clear()
        if dots:
            upper += torch.stack(dots).view(-1, len(pairs)).to(acc).sum(0)
        # each unordered pair is once in the tiles: twice in the sums over the symmetric matrices
        upper *= 2.0
        s = torch.empty(k, k, dtype=acc, device=xs[0].device)
        first, second = zip(*pairs)
        s[first, second] = upper
        s[second, first] = upper  # (not torch.triu: it opens a parallel region even for 3 x 3)
        return s, r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s: Tensor, grad_r: Tensor):  # type: ignore[override]
        xs = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        if not any(need):
            return (None,) * (1 + len(xs))
        with _full_precision_matmul(xs[0]):
            grads = _BlockwiseTerms._gradients(ctx.block_size, xs, need, grad_s, grad_r)
        return (None, *grads)

    @staticmethod
    def _gradients(
        block_size: int, xs: Sequence[Tensor], need: Sequence[bool], grad_s: Tensor, grad_r: Tensor
    ) -> list[Tensor | None]:
        rows, width = _tile_shape(block_size)
        ops = [_Operand(x, rows) for x in xs]
        cs = [op.centred for op in ops]
        k = len(xs)
        # dL/da_p[i, j] = sum_q coef[p, q] a_q[i, j] + grad_r[p, i]; the gradient of x_p is
        # sum_j W_p[i, j] (x_i - x_j) with W_p = (G_p + G_p^T) / a_p (0 where a_p == 0). Each tile
        # holds every unordered pair once (0 elsewhere), so it adds to its rows and its columns.
        coef = (2.0 * (grad_s + grad_s.T)).tolist()
        gr = grad_r.to(cs[0].dtype)
        grads = [torch.zeros_like(c) if need[p] else None for p, c in enumerate(cs)]
        for i0, i1, j0, j1, ds in _distance_tiles(ops, width):
            for p in range(k):
                g = grads[p]
                if g is None:
                    continue
                m = gr[p, i0:i1, None] + gr[p, None, j0:j1]
                for q in range(k):
                    if coef[p][q] != 0.0:
                        m.add_(ds[q], alpha=coef[p][q])
                # W = M / a, with 0 where a == 0 (M / 0 is the only source of inf and NaN here)
                w = m.div_(ds[p]).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                c = cs[p]
                g[i0:i1] += w.sum(1)[:, None] * c[i0:i1] - w @ c[j0:j1]
                g[j0:j1] += w.sum(0)[:, None] * c[j0:j1] - w.T @ c[i0:i1]
        return grads


def distance_terms(
    *xs: Tensor, method: Method = "auto", block_size: int | None = DEFAULT_BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    r"""The sufficient statistics of ``k`` prepared ``[n, d_p]`` inputs: ``S`` of shape ``[k, k]``
    (:math:`S_{pq} = \sum_{ij} a^{(p)}_{ij} a^{(q)}_{ij}`) and the row sums ``R`` of shape
    ``[k, n]``, both float64. Every estimator in this module is a closed form of them."""
    n = xs[0].shape[0]
    path, block_size = _resolve_method(method, n, block_size, xs[0].device)
    if path == "dense":
        return _dense_terms(xs)
    return _BlockwiseTerms.apply(block_size, *xs)


def _centred_products(s: Tensor, r: Tensor, n: int, bias_corrected: bool) -> Tensor:
    """Inner products of the double-centred (V) or U-centred matrices, ``[k, k]``."""
    n = float(n)  # n**4 overflows int64 beyond n = 55,000
    t = r.sum(1)
    rr = r @ r.T
    tt = torch.outer(t, t)
    if bias_corrected:
        return (s - 2.0 * rr / (n - 2) + tt / ((n - 1) * (n - 2))) / (n * (n - 3))
    return s / n**2 - 2.0 * rr / n**3 + tt / n**4


# ---------------------------------------------------------------------------------- safe ops


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(max(v, 0))`` with gradient 0 (not inf or NaN) where ``v <= 0``."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 with gradient 0 where ``den == 0``."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def _correlation(p: Tensor, a: int, b: int) -> Tensor:
    """``<A, B> / sqrt(|<A, A><B, B>|)``, 0 when the denominator is 0 (as the dcor package)."""
    return _safe_div(p[a, b], _safe_sqrt((p[a, a] * p[b, b]).abs()))


def _products(
    named: Sequence[tuple[str, Tensor]],
    *,
    bias_corrected: bool,
    what: str,
    method: Method,
    block_size: int | None,
    check_finite: bool,
) -> tuple[Tensor, torch.dtype]:
    xs = _prepare(named, 4 if bias_corrected else 2, what, check_finite)
    s, r = distance_terms(*xs, method=method, block_size=block_size)
    return _centred_products(s, r, xs[0].shape[0], bias_corrected), xs[0].dtype


def correlations_from_terms(s: Tensor, r: Tensor, n: int, *, bias_corrected: bool = False) -> Tensor:
    r"""Every pairwise correlation of ``k`` inputs from their :func:`distance_terms`: ``[k, k]``.

    The squared distance correlations :math:`\mathcal{R}^2_n` (``bias_corrected=False``; take
    the square root for dCor) or the bias-corrected :math:`\mathcal{R}^{*}_n` (``True``, needs
    ``n >= 4``), as :func:`distance_correlation_sqr` gives for each pair; 0 where an input is
    constant. One pass over the distance tiles of ``k`` inputs thus gives all ``k^2`` values (the
    layer-by-layer comparison of two networks uses it), instead of a pass per pair.
    """
    p = _centred_products(s, r, n, bias_corrected)
    d = p.diagonal()
    return _safe_div(p, _safe_sqrt((d[:, None] * d[None, :]).abs()))


# ---------------------------------------------------------------------------------- estimators


def distance_covariance_sqr(
    x: Tensor,
    y: Tensor,
    *,
    bias_corrected: bool = False,
    method: Method = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    r"""Squared distance covariance of ``x`` and ``y``.

    .. math::

        \mathcal{V}^2_n(x, y) = \frac{1}{n^2} \sum_{i,j} \tilde a_{ij} \tilde b_{ij}

    with double-centred distance matrices (the biased V-statistic), or with U-centred matrices
    and the normalisation :math:`1 / (n(n-3))` when ``bias_corrected`` (an unbiased estimator
    of the population :math:`\mathcal{V}^2`, which may be negative; needs ``n >= 4``).

    Args:
        x: ``[n, ...]`` samples as rows (trailing dimensions flattened).
        y: ``[n, ...]`` with the same ``n``; any width.
        bias_corrected: U-statistic instead of V-statistic.
        method: ``"auto"``, ``"dense"`` or ``"blockwise"`` (see the module docstring).
        block_size: tile size of the blockwise path (``None``: by device).
        check_finite: raise on NaN/inf inputs (one device sync; turn off in tight loops).

    Returns:
        A scalar tensor in the inputs' (promoted) floating dtype.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> round(float(distance_covariance_sqr(x, x)), 4)
        0.8125
    """
    p, dtype = _products(
        [("x", x), ("y", y)], bias_corrected=bias_corrected, what=_what(bias_corrected, "distance covariance"),
        method=method, block_size=block_size, check_finite=check_finite,
    )
    return p[0, 1].to(dtype)


def distance_covariance(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    r"""Distance covariance :math:`\mathcal{V}_n(x, y)`: the square root of the biased
    :func:`distance_covariance_sqr` (gradient 0 where it is 0). Keywords as there, without
    ``bias_corrected``."""
    return _safe_sqrt(distance_covariance_sqr(x, y, bias_corrected=False, **kwargs))


def u_distance_covariance_sqr(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """Bias-corrected squared distance covariance (U-centred matrices); ``n >= 4``. Same as
    ``distance_covariance_sqr(x, y, bias_corrected=True)``."""
    return distance_covariance_sqr(x, y, bias_corrected=True, **kwargs)


def distance_correlation_sqr(
    x: Tensor,
    y: Tensor,
    *,
    bias_corrected: bool = False,
    method: Method = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    r"""Squared distance correlation of ``x`` and ``y``.

    .. math::

        \mathcal{R}^2_n(x, y) = \frac{\mathcal{V}^2_n(x, y)}
            {\sqrt{\mathcal{V}^2_n(x, x)\, \mathcal{V}^2_n(y, y)}}

    0 when the denominator is 0 (a constant input). Biased (V-statistic, in ``[0, 1]``) by
    default; ``bias_corrected=True`` gives the bias-corrected :math:`\mathcal{R}^{*}_n` from
    U-centred matrices (in ``[-1, 1]``, needs ``n >= 4``). The biased squared dCor is what the
    training recipe of Zhen et al. (2022) penalises. Arguments as in
    :func:`distance_covariance_sqr`.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
        >>> float(distance_correlation_sqr(x, 2 * x + 1))
        1.0
    """
    p, dtype = _products(
        [("x", x), ("y", y)], bias_corrected=bias_corrected, what=_what(bias_corrected, "distance correlation"),
        method=method, block_size=block_size, check_finite=check_finite,
    )
    return _correlation(p, 0, 1).to(dtype)


def distance_correlation(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    r"""Distance correlation :math:`\mathcal{R}_n(x, y) \in [0, 1]`: the square root of the biased
    :func:`distance_correlation_sqr` (gradient 0 where it is 0). Keywords as there, without
    ``bias_corrected``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 3, generator=g)
        >>> y = torch.cat([x[:, :1] ** 2, torch.randn(100, 4, generator=g)], 1)  # width 5
        >>> bool(0 < distance_correlation(x, y) < 1)
        True
    """
    return _safe_sqrt(distance_correlation_sqr(x, y, bias_corrected=False, **kwargs))


def u_distance_correlation_sqr(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """Bias-corrected squared distance correlation (U-centred matrices), in ``[-1, 1]``; needs
    ``n >= 4``. Same as ``distance_correlation_sqr(x, y, bias_corrected=True)``."""
    return distance_correlation_sqr(x, y, bias_corrected=True, **kwargs)


def _what(bias_corrected: bool, name: str) -> str:
    return f"bias-corrected {name} (division by n - 3)" if bias_corrected else name


def _partial_products(
    x: Tensor, y: Tensor, z: Tensor, what: str, method: Method, block_size: int | None, check_finite: bool
) -> tuple[Tensor, torch.dtype]:
    return _products(
        [("x", x), ("y", y), ("z", z)], bias_corrected=True, what=f"{what} (U-centred, division by n - 3)",
        method=method, block_size=block_size, check_finite=check_finite,
    )


def partial_distance_covariance(
    x: Tensor,
    y: Tensor,
    z: Tensor,
    *,
    method: Method = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    r"""Partial distance covariance pdCov(x, y; z) (Székely & Rizzo 2014).

    With :math:`\tilde A, \tilde B, \tilde C` the U-centred distance matrices of ``x``, ``y``,
    ``z`` and :math:`P_{z^\perp}(\tilde A) = \tilde A - \frac{(\tilde A \cdot \tilde C)}
    {(\tilde C \cdot \tilde C)} \tilde C` (no projection when :math:`\tilde C \cdot \tilde C = 0`):

    .. math::

        \mathrm{pdCov}(x, y; z) = \big(P_{z^\perp}(\tilde A) \cdot P_{z^\perp}(\tilde B)\big)
        = (\tilde A \cdot \tilde B) - \frac{(\tilde A \cdot \tilde C)(\tilde B \cdot \tilde C)}
          {(\tilde C \cdot \tilde C)}.

    ``x``, ``y``, ``z``: ``[n, ...]``, any widths, ``n >= 4``. Other arguments as in
    :func:`distance_covariance_sqr`.
    """
    p, dtype = _partial_products(x, y, z, "partial distance covariance", method, block_size, check_finite)
    return (p[0, 1] - _safe_div(p[0, 2] * p[1, 2], p[2, 2])).to(dtype)


def _r(p: Tensor, a: int, b: int) -> Tensor:
    return _correlation(p, a, b).clamp(-1.0, 1.0)


def partial_distance_correlation(
    x: Tensor,
    y: Tensor,
    z: Tensor,
    *,
    method: Method = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    r"""Partial distance correlation pdCor(x, y; z) (Székely & Rizzo 2014), the value
    ``dcor.partial_distance_correlation`` gives.

    The correlation of :math:`P_{z^\perp}(\tilde A)` and :math:`P_{z^\perp}(\tilde B)` (both
    ``x`` and ``y`` projected off ``z``), which in terms of the bias-corrected correlations
    :math:`r^{*}` is

    .. math::

        \mathcal{R}^{*}(x, y; z) = \frac{r^{*}_{xy} - r^{*}_{xz} r^{*}_{yz}}
            {\sqrt{1 - r^{*2}_{xz}} \sqrt{1 - r^{*2}_{yz}}}

    and 0 when the denominator is 0. In ``[-1, 1]``; needs ``n >= 4``. Arguments as in
    :func:`partial_distance_covariance`.

    Example:
        >>> a = torch.tensor([[1.0], [1.0], [2.0], [2.0], [3.0]])
        >>> b = torch.tensor([[1.0], [2.0], [1.0], [2.0], [1.0]])
        >>> c = torch.tensor([[1.0], [2.0], [2.0], [1.0], [2.0]])
        >>> round(float(partial_distance_correlation(a, b, c)), 4)
        -0.5
    """
    p, dtype = _partial_products(x, y, z, "partial distance correlation", method, block_size, check_finite)
    r_xy, r_xz, r_yz = _r(p, 0, 1), _r(p, 0, 2), _r(p, 1, 2)
    den = _safe_sqrt(1 - r_xz**2) * _safe_sqrt(1 - r_yz**2)
    return _safe_div(r_xy - r_xz * r_yz, den).to(dtype)


def semi_partial_distance_correlation(
    x: Tensor,
    y: Tensor,
    z: Tensor,
    *,
    method: Method = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    r"""Semi-partial distance correlation: only ``x`` is projected off ``z``.

    This is what the public code of Zhen et al., "On the Versatile Uses of Partial Distance
    Correlation in Deep Learning" (ECCV 2022), computes and calls partial distance correlation
    (``P_DC(latent_A, latent_B, ground_truth)`` there equals
    ``semi_partial_distance_correlation(latent_A, ground_truth, latent_B)`` here):

    .. math::

        \frac{\big(P_{z^\perp}(\tilde A) \cdot \tilde B\big)}
            {\sqrt{\big(P_{z^\perp}(\tilde A) \cdot P_{z^\perp}(\tilde A)\big)
            (\tilde B \cdot \tilde B)}}
        = \frac{r^{*}_{xy} - r^{*}_{xz} r^{*}_{yz}}{\sqrt{1 - r^{*2}_{xz}}}

    It differs from Székely & Rizzo's :func:`partial_distance_correlation` by the factor
    :math:`\sqrt{1 - r^{*2}_{yz}}` and is not symmetric in ``x`` and ``y``. The seed code's
    ``1e-18`` stabilisers are replaced by the exact zero-denominator rule (0). ``n >= 4``.
    """
    p, dtype = _partial_products(x, y, z, "semi-partial distance correlation", method, block_size, check_finite)
    r_xy, r_xz, r_yz = _r(p, 0, 1), _r(p, 0, 2), _r(p, 1, 2)
    return _safe_div(r_xy - r_xz * r_yz, _safe_sqrt(1 - r_xz**2)).to(dtype)


STATISTICS = {
    "distance_correlation": distance_correlation,
    "distance_correlation_sqr": distance_correlation_sqr,
    "u_distance_correlation_sqr": u_distance_correlation_sqr,
    "distance_covariance": distance_covariance,
    "distance_covariance_sqr": distance_covariance_sqr,
    "u_distance_covariance_sqr": u_distance_covariance_sqr,
}
"""Two-sample statistics by name (what the metric and the loss accept as ``statistic``)."""

PARTIAL_STATISTICS = {
    "partial_distance_correlation": partial_distance_correlation,
    "semi_partial_distance_correlation": semi_partial_distance_correlation,
    "partial_distance_covariance": partial_distance_covariance,
}
"""Three-sample statistics by name (``PartialDistanceCorrelation``'s ``statistic``)."""


def resolve_statistic(name: str, partial: bool = False):
    """The function named ``name`` in :data:`STATISTICS` (or :data:`PARTIAL_STATISTICS`)."""
    table = PARTIAL_STATISTICS if partial else STATISTICS
    if name not in table:
        raise ValueError(f"unknown statistic {name!r}; choose one of {sorted(table)}")
    return table[name]
