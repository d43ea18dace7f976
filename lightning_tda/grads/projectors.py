"""Seeded random projections of per-example gradients, generated in blocks.

A :class:`Projection` maps the gradient of a set of parameters (``p`` numbers) to ``proj_dim``
(``k``) numbers. It is block-diagonal over *parameter groups* (:class:`ParamGroup`); each group
owns a contiguous range of the ``k`` output columns and is one of:

- ``"kronecker"`` -- a ``nn.Linear``/``nn.Conv*`` layer seen as the matrix ``[W | b]`` of shape
  ``[d_out, d_in]`` (the bias, if covered, is one extra input column). Its block is the Kronecker
  product ``P_out (x) P_in`` (``P_out``: ``[k_out, d_out]``, ``P_in``: ``[k_in, d_in]``), i.e. the
  projected gradient is ``P_out G P_in^T`` flattened row-major and cut to the group's ``k``
  columns. This is what the factored engine computes without ever forming ``G``.
- ``"dense"`` -- any other parameters: the flattened gradient times an i.i.d. matrix ``R``
  (``[numel, k]``), generated and applied in row blocks of :data:`DENSE_BLOCK_ROWS` rows, so the
  whole ``p x k`` matrix is never held at once (unless it fits the cache, see below).

The exact engine's default ``projection="dense"`` is a single dense group over all parameters: a
classic i.i.d. Johnson-Lindenstrauss matrix.

**Entries and scale.** Rademacher (+-1) or standard Gaussian entries; each group's block is scaled
by ``1/sqrt(k_group)``, so ``E[<Pg, Ph>] = <g, h>`` (inner products, hence Grad-Dot / Grad-Cos /
TRAK kernels, are preserved in expectation, group by group).

**How ``k`` is split among groups** (:func:`allocate_dims`): in proportion to the groups' parameter
counts, at least one column each (largest remainders, ties in model order) -- the share of each
layer that a dense Johnson-Lindenstrauss matrix over all parameters has in expectation. A Kronecker
group with ``k`` columns uses ``k_out = min(d_out, ceil(sqrt(k)))`` and ``k_in = ceil(k / k_out)``
(or ``k_in = d_in`` and ``k_out = ceil(k / d_in)`` when that exceeds ``d_in``), so both sides are
about ``sqrt(k)``: for a rank-one gradient ``g a^T`` the relative variance of the Kronecker estimate
of ``<G1, G2>`` is about ``1/k_out + 1/k_in``, smallest when the two are balanced. The first ``k``
of the ``k_out * k_in`` row-major entries are kept; every kept row ``P_out[i] (x) P_in[j]`` still
has identity second moment, so the scaling above stays unbiased.

Why not equal shares (the rule before): a small layer then gets about as many columns as it has
parameters, so a side of its block is a (nearly) square random matrix -- a square +-1 matrix of
size 10 is singular with probability 0.38 -- and a last layer's output side spans all its logits,
while the gradient of a margin or of a softmax loss is orthogonal to the all-ones vector. Either
way the block's features live in fewer dimensions than its columns and ``Phi^T Phi`` is singular:
TRAK without a ridge then divides float32 rounding noise by zero eigenvalues (digits, k = 512:
feature rank 476 of 512, LDS 0.04 against 0.11 for a dense projection; proportional shares: rank
512, LDS 0.11). A block keeps its full rank as long as its layer's gradients span more than its
``k`` dimensions, which proportional shares leave to the largest layers.

**Determinism.** Every block is generated on the CPU by its own ``torch.Generator`` whose seed is
the SHA-256 of ``(seed, group name, block id)``: the matrices do not depend on the device, dtype,
process, batch size or on which other groups exist. Rademacher signs come from random bytes (exact
integer arithmetic: bit-identical on every machine); Gaussian entries are drawn in float64 by
``torch.randn`` and rounded to float32, so machines whose libm differs in the last bit of a float64
``log``/``cos`` can, very rarely, round one entry differently. Both are stable for a given torch
version.

**Cost and cache.** Kronecker factors are tiny (``k_out*d_out + k_in*d_in`` numbers) and always
cached on the target device after first use. Dense blocks are cached while the projection's total
cache stays under ``cache_bytes`` (default 512 MiB); beyond that they are regenerated on every
call, which costs about 20 ns (Gaussian) or 4 ns (Rademacher) per entry on one CPU core.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor

ProjectorKind = Literal["rademacher", "gaussian"]
PROJECTOR_KINDS: tuple[str, ...] = ("rademacher", "gaussian")
DENSE_BLOCK_ROWS = 2048
"""Rows of ``R`` generated (and applied) at once for a dense group; part of the definition of the
matrix (each block has its own random stream)."""
DEFAULT_CACHE_BYTES = 512 * 2**20


def stream_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed for the random stream ``key`` under ``seed`` (SHA-256 based, so it
    is the same in every process and on every machine, unlike Python's ``hash``)."""
    digest = hashlib.sha256(f"lightning-tda/projection/{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_matrix(seed: int, key: str, rows: int, cols: int, kind: ProjectorKind) -> Tensor:
    """A ``[rows, cols]`` float32 CPU matrix of unit-variance entries (Rademacher or Gaussian)
    from the random stream ``(seed, key)``."""
    generator = torch.Generator(device="cpu").manual_seed(stream_seed(seed, key))
    n = rows * cols
    if kind == "rademacher":
        random_bytes = torch.randint(0, 256, (-(-n // 8),), generator=generator, dtype=torch.uint8)
        bits = (random_bytes[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        values = bits.reshape(-1)[:n].to(torch.float32).mul_(-2.0).add_(1.0)
    elif kind == "gaussian":
        values = torch.randn(n, generator=generator, dtype=torch.float64).to(torch.float32)
    else:
        raise ValueError(f"unknown projector {kind!r}; choose one of {list(PROJECTOR_KINDS)}")
    return values.view(rows, cols)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that share one block of the projection.

    ``name`` names the random streams of the block (a module path such as ``"features.0"``), so
    it must be unique within a projection. For ``kind="kronecker"``, ``param_names`` is
    ``(weight,)`` or ``(weight, bias)``, ``d_out = weight.shape[0]`` and
    ``d_in = weight[0].numel() + has_bias``.
    """

    name: str
    kind: Literal["kronecker", "dense"]
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    d_out: int = 0
    d_in: int = 0
    has_bias: bool = False

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes)

    @staticmethod
    def kronecker(name: str, weight: tuple[str, torch.Size], bias: tuple[str, torch.Size] | None) -> "ParamGroup":
        (w_name, w_shape) = weight
        d_out = int(w_shape[0])
        names, shapes = [w_name], [tuple(w_shape)]
        if bias is not None:
            names.append(bias[0])
            shapes.append(tuple(bias[1]))
        return ParamGroup(
            name=name,
            kind="kronecker",
            param_names=tuple(names),
            param_shapes=tuple(shapes),
            d_out=d_out,
            d_in=math.prod(w_shape) // d_out + (bias is not None),
            has_bias=bias is not None,
        )

    @staticmethod
    def dense(name: str, params: Sequence[tuple[str, torch.Size]]) -> "ParamGroup":
        return ParamGroup(
            name=name,
            kind="dense",
            param_names=tuple(n for n, _ in params),
            param_shapes=tuple(tuple(s) for _, s in params),
        )


@dataclass
class Block:
    """A group's share of the projection: output columns ``[offset, offset + k)``."""

    group: ParamGroup
    k: int
    offset: int
    k_out: int = 0
    k_in: int = 0
    cached: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.k)


def allocate_dims(sizes: Sequence[int], proj_dim: int) -> list[int]:
    """Split ``proj_dim`` among groups of ``sizes`` parameters in proportion to their sizes, at
    least one column and at most ``size`` columns each (largest remainders, ties in model order).
    Sums to ``proj_dim`` exactly."""
    total = sum(sizes)
    if proj_dim > total:
        raise ValueError(
            f"proj_dim={proj_dim} exceeds the {total} parameters covered; a projection cannot have "
            "more dimensions than the gradient -- lower proj_dim"
        )
    if proj_dim < len(sizes):
        raise ValueError(
            f"proj_dim={proj_dim} is smaller than the number of parameter groups ({len(sizes)}); "
            "every group needs at least one dimension -- raise proj_dim or select fewer params"
        )
    alloc = [0] * len(sizes)
    open_groups = list(range(len(sizes)))
    while open_groups:  # fix the groups whose proportional share falls outside [1, size]
        remaining = proj_dim - sum(alloc)
        weight = sum(sizes[i] for i in open_groups)
        share = {i: remaining * sizes[i] / weight for i in open_groups}
        low = [i for i in open_groups if share[i] < 1]
        high = [i for i in open_groups if share[i] > sizes[i]]
        if not low and not high:
            for i in open_groups:
                alloc[i] = int(share[i])
            left = remaining - sum(alloc[i] for i in open_groups)
            by_remainder = sorted(open_groups, key=lambda i: (-(share[i] - int(share[i])), i))
            for i in by_remainder[:left]:
                alloc[i] += 1
            break
        for i in low:
            alloc[i] = 1
        for i in high:
            alloc[i] = sizes[i]
        open_groups = [i for i in open_groups if i not in low and i not in high]
    for i in range(len(sizes)):  # only when every group was fixed: give the rest where it fits
        extra = min(proj_dim - sum(alloc), sizes[i] - alloc[i])
        alloc[i] += max(0, extra)
    return alloc


def split_kronecker(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out * k_in >= k``, ``k_out <= d_out``, ``k_in <= d_in``, both
    about ``sqrt(k)`` (the balanced split minimises ``1/k_out + 1/k_in``; measured, cost-driven
    unbalanced splits were no faster on CPU)."""
    k_out = min(d_out, math.isqrt(k - 1) + 1)
    k_in = -(-k // k_out)
    if k_in > d_in:
        k_in = d_in
        k_out = -(-k // d_in)
    return k_out, k_in


def check_proj_dim(proj_dim: Any) -> int:
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int):
        raise TypeError(f"proj_dim must be a positive int, got {proj_dim!r}")
    if proj_dim <= 0:
        raise ValueError(f"proj_dim must be a positive int, got {proj_dim}")
    return proj_dim


class Projection:
    """A seeded, block-structured ``p -> proj_dim`` projection (see the module docstring).

    Args:
        groups: the parameter groups, in output-column order; names must be unique.
        proj_dim: total output dimension ``k`` (split among groups by :func:`allocate_dims`).
        seed: projection seed; same seed and groups give the same matrix everywhere.
        kind: ``"rademacher"`` or ``"gaussian"`` entries.
        dtype, device: where and in which dtype blocks are applied (generation is on the CPU).
        cache_bytes: keep dense blocks on ``device`` while their total stays under this.
    """

    def __init__(
        self,
        groups: Sequence[ParamGroup],
        proj_dim: int,
        seed: int = 0,
        kind: ProjectorKind = "rademacher",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        check_proj_dim(proj_dim)
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector {kind!r}; choose one of {list(PROJECTOR_KINDS)}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        if not groups:
            raise ValueError("a projection needs at least one parameter group")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter group names must be unique, got {names}")
        self.groups = tuple(groups)
        self.proj_dim = proj_dim
        self.seed = int(seed)
        self.kind = kind
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache_bytes = int(cache_bytes)
        self._cache_used = 0
        self.blocks: list[Block] = []
        offset = 0
        for group, k in zip(groups, allocate_dims([g.numel for g in groups], proj_dim)):
            block = Block(group, k, offset)
            if group.kind == "kronecker":
                block.k_out, block.k_in = split_kronecker(k, group.d_out, group.d_in)
            self.blocks.append(block)
            offset += k

    @property
    def param_names(self) -> list[str]:
        """Covered parameters, in the row order of :meth:`matrix`."""
        return [n for g in self.groups for n in g.param_names]

    @property
    def num_params(self) -> int:
        return sum(g.numel for g in self.groups)

    # ------------------------------------------------------------------ the blocks themselves

    def factors(self, block: Block) -> tuple[Tensor, Tensor]:
        """``(P_out [k_out, d_out] * 1/sqrt(k), P_in [k_in, d_in])`` of a Kronecker block, cached
        on the projection's device."""
        if "factors" not in block.cached:
            g = block.group
            p_out = random_matrix(self.seed, f"{g.name}/out", block.k_out, g.d_out, self.kind)
            p_in = random_matrix(self.seed, f"{g.name}/in", block.k_in, g.d_in, self.kind)
            p_out = p_out.mul_(1.0 / math.sqrt(block.k))
            block.cached["factors"] = (
                p_out.to(self.device, self.dtype),
                p_in.to(self.device, self.dtype),
            )
        return block.cached["factors"]

    def dense_rows(self, block: Block) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, R[start:stop])`` for a dense block, rows of the flattened group."""
        rows = block.group.numel
        if "rows" in block.cached:
            yield from block.cached["rows"]
            return
        nbytes = rows * block.k * torch.finfo(self.dtype).bits // 8
        keep = self._cache_used + nbytes <= self.cache_bytes
        kept = []
        for i, start in enumerate(range(0, rows, DENSE_BLOCK_ROWS)):
            stop = min(rows, start + DENSE_BLOCK_ROWS)
            r = random_matrix(self.seed, f"{block.group.name}/dense/{i}", stop - start, block.k, self.kind)
            r = r.mul_(1.0 / math.sqrt(block.k)).to(self.device, self.dtype)
            if keep:
                kept.append((start, stop, r))
            yield start, stop, r
        if keep:
            block.cached["rows"] = kept
            self._cache_used += nbytes

    # ------------------------------------------------------------------ applying it

    def project_kronecker(self, block: Block, grad_matrix: Tensor) -> Tensor:
        """Project per-example gradient matrices ``[b, d_out, d_in]`` of a Kronecker block."""
        p_out, p_in = self.factors(block)
        projected = p_out @ grad_matrix.to(self.dtype) @ p_in.T
        return projected.reshape(grad_matrix.shape[0], -1)[:, : block.k]

    def project_dense(self, block: Block, flat: Tensor) -> Tensor:
        """Project flattened per-example gradients ``[b, numel]`` of a dense block."""
        flat = flat.to(self.dtype)
        out = torch.zeros(flat.shape[0], block.k, dtype=self.dtype, device=flat.device)
        for start, stop, r in self.dense_rows(block):
            out.addmm_(flat[:, start:stop], r)
        return out

    def project(self, grads: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """Project full per-example gradients ``{name: [b, *param.shape]}`` to ``[b, proj_dim]``.

        Groups none of whose parameters are in ``grads`` are left as they are in ``out`` (zeros
        when ``out`` is None); a group given only in part is an error.
        """
        if not grads:
            raise ValueError("no gradients to project")
        batch = next(iter(grads.values())).shape[0]
        if out is None:
            out = torch.zeros(batch, self.proj_dim, dtype=self.dtype, device=self.device)
        for block in self.blocks:
            g = block.group
            present = [n in grads for n in g.param_names]
            if not any(present):
                continue
            if not all(present):
                missing = [n for n, p in zip(g.param_names, present) if not p]
                raise ValueError(f"gradients for group {g.name!r} lack {missing}")
            parts = [grads[n].reshape(batch, -1) for n in g.param_names]
            if g.kind == "kronecker":
                w = parts[0].reshape(batch, g.d_out, -1)
                matrix = torch.cat([w, parts[1].reshape(batch, g.d_out, 1)], 2) if g.has_bias else w
                out[:, block.columns] += self.project_kronecker(block, matrix)
            else:
                out[:, block.columns] += self.project_dense(block, torch.cat(parts, 1))
        return out

    def matrix(self) -> Tensor:
        """The whole projection as a dense ``[num_params, proj_dim]`` matrix (rows in
        :attr:`param_names` order, each parameter flattened): ``features = flat_grads @ matrix()``.

        For tests and small models only -- this is exactly what the engines never build.
        """
        rows = []
        for block in self.blocks:
            g = block.group
            m = torch.zeros(g.numel, self.proj_dim, dtype=self.dtype, device=self.device)
            if g.kind == "kronecker":
                p_out, p_in = self.factors(block)
                kron = torch.kron(p_out, p_in)[: block.k].T.reshape(g.d_out, g.d_in, block.k)
                d_w = g.d_in - g.has_bias
                m[: g.d_out * d_w, block.columns] = kron[:, :d_w].reshape(-1, block.k)
                if g.has_bias:
                    m[g.d_out * d_w :, block.columns] = kron[:, d_w]
            else:
                for start, stop, r in self.dense_rows(block):
                    m[start:stop, block.columns] = r
            rows.append(m)
        return torch.cat(rows, 0)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for a run manifest): enough to rebuild the same matrix."""
        groups = []
        for b in self.blocks:
            entry: dict[str, Any] = {
                "name": b.group.name,
                "kind": b.group.kind,
                "params": list(b.group.param_names),
                "numel": b.group.numel,
                "k": b.k,
                "columns": [b.offset, b.offset + b.k],
            }
            if b.group.kind == "kronecker":
                entry.update(d_out=b.group.d_out, d_in=b.group.d_in, k_out=b.k_out, k_in=b.k_in)
            groups.append(entry)
        return {
            "projector": self.kind,
            "seed": self.seed,
            "proj_dim": self.proj_dim,
            "scale": "1/sqrt(k_group)",
            "allocation": "proportional to parameter count",
            "dense_block_rows": DENSE_BLOCK_ROWS,
            "num_params": self.num_params,
            "groups": groups,
        }


class IdentityProjection(Projection):
    """No projection: the features are the flattened per-example gradients themselves
    (``proj_dim`` = number of covered parameters, columns in :attr:`param_names` order).

    For models small enough to do without projection: the exact references of the tests (TRAK
    with the identity projection equals its closed form) and tiny models where ``p`` is small.
    """

    def __init__(self, groups: Sequence[ParamGroup], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(groups, sum(g.numel for g in groups), seed=0, dtype=dtype, device=device)
        self.kind = "identity"  # type: ignore[assignment]

    def project(self, grads: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        missing = [n for n in self.param_names if n not in grads]
        if missing:
            raise ValueError(f"gradients lack {missing[:5]}")
        batch = next(iter(grads.values())).shape[0]
        flat = torch.cat([grads[n].reshape(batch, -1) for n in self.param_names], 1).to(self.dtype)
        if out is None:
            return flat
        out += flat
        return out

    def matrix(self) -> Tensor:
        return torch.eye(self.proj_dim, dtype=self.dtype, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"projector": "identity", "seed": self.seed, "proj_dim": self.proj_dim, "params": self.param_names}
