"""Projections: values, block structure, determinism across processes, k allocation, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_tda.grads import ParamGroup, Projection, make_gradient_engine, random_matrix
from lightning_tda.grads.projectors import DENSE_BLOCK_ROWS, allocate_dims, split_kronecker
from lightning_tda.models import MLP

# Two Kronecker layers (one without bias) and a dense group spanning several row blocks.
GROUPS_SRC = """
from lightning_tda.grads import ParamGroup
GROUPS = [
    ParamGroup.kronecker("conv", ("conv.weight", (6, 3, 3, 3)), ("conv.bias", (6,))),
    ParamGroup.dense("norm", [("norm.weight", (2500,)), ("norm.bias", (2500,))]),
    ParamGroup.kronecker("fc", ("fc.weight", (10, 40)), None),
]
"""
namespace: dict = {}
exec(GROUPS_SRC, namespace)
GROUPS = namespace["GROUPS"]


def digest(kind: str, seed: int = 7, **kwargs) -> str:
    matrix = Projection(GROUPS, 96, seed=seed, kind=kind, **kwargs).matrix()
    return hashlib.sha256(matrix.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def test_projection_identical_across_processes_and_settings():
    code = GROUPS_SRC + textwrap.dedent(
        """
        import hashlib, torch
        from lightning_tda.grads import Projection
        for kind in ("rademacher", "gaussian"):
            m = Projection(GROUPS, 96, seed=7, kind=kind).matrix()
            print(hashlib.sha256(m.contiguous().numpy().tobytes()).hexdigest())
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert child == [digest("rademacher"), digest("gaussian")]
    # nor does the matrix depend on the cache or on the dtype it is applied in
    assert digest("gaussian", cache_bytes=0) == child[1]
    assert digest("gaussian", dtype=torch.float64) == child[1]
    assert digest("gaussian", seed=8) != child[1]


def test_entries_and_scale():
    r = random_matrix(0, "a", 300, 700, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 0.01
    g = random_matrix(0, "a", 300, 700, "gaussian")
    assert abs(g.mean().item()) < 0.01 and abs(g.var().item() - 1) < 0.01
    assert not torch.equal(random_matrix(0, "a", 4, 4, "gaussian"), random_matrix(0, "b", 4, 4, "gaussian"))
    assert not torch.equal(random_matrix(0, "a", 4, 4, "gaussian"), random_matrix(1, "a", 4, 4, "gaussian"))
    p = Projection(GROUPS, 96, kind="rademacher")
    for block in p.blocks:  # each group's block is scaled by 1/sqrt(k_group)
        rows = p.matrix()[:, block.columns]
        nonzero = rows[rows != 0].abs()
        assert torch.allclose(nonzero, torch.full_like(nonzero, block.k**-0.5))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_preserved_in_expectation(kind):
    groups = [ParamGroup.kronecker("a", ("a.w", (4, 5)), ("a.b", (4,))), ParamGroup.dense("b", [("b.w", (7,))])]
    mean = torch.zeros(31, 31)
    for seed in range(600):
        m = Projection(groups, 13, seed=seed, kind=kind).matrix()
        mean += m @ m.T / 600
    assert (mean - torch.eye(31)).abs().max() < 0.15


def test_project_equals_dense_matrix_and_blocks_are_bounded():
    p = Projection(GROUPS, 96, seed=1, kind="gaussian", cache_bytes=0)
    grads = {n: torch.randn(5, *s) for g in GROUPS for n, s in zip(g.param_names, g.param_shapes)}
    flat = torch.cat([grads[n].reshape(5, -1) for n in p.param_names], 1)
    torch.testing.assert_close(p.project(grads), flat @ p.matrix(), atol=1e-5, rtol=1e-5)
    dense = p.blocks[1]
    sizes = [stop - start for start, stop, _ in p.dense_rows(dense)]
    assert sum(sizes) == 5000 and max(sizes) == DENSE_BLOCK_ROWS and len(sizes) == 3
    assert "rows" not in dense.cached  # over the cache budget: regenerated, never kept whole
    cached = Projection(GROUPS, 96, seed=1, kind="gaussian")
    torch.testing.assert_close(cached.project(grads), p.project(grads))
    assert "rows" in cached.blocks[1].cached  # small enough: kept on the device
    # a group given in part is an error; a group absent is left alone
    with pytest.raises(ValueError, match="lack"):
        p.project({"conv.weight": grads["conv.weight"]})
    only_fc = p.project({"fc.weight": grads["fc.weight"]})
    assert only_fc[:, p.blocks[0].columns].abs().sum() == 0


def test_allocation_sums_exactly_and_is_proportional():
    assert allocate_dims([10, 1000, 1000], 100) == [1, 50, 49]  # shares 0.5 (raised to 1), 49.5, 49.5
    assert allocate_dims([10, 1000, 1000], 201) == [1, 100, 100]
    assert allocate_dims([100, 300], 40) == [10, 30]
    assert allocate_dims([3, 4], 7) == [3, 4]
    assert allocate_dims([1, 1, 1, 1000], 4) == [1, 1, 1, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(1, 500, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        k = int(torch.randint(len(sizes), sum(sizes) + 1, (1,), generator=g))
        alloc = allocate_dims(sizes, k)
        assert sum(alloc) == k and all(1 <= a <= s for a, s in zip(alloc, sizes))
        # the proportional share, give or take the columns given to groups raised to one
        share = [k * s / sum(sizes) for s in sizes]
        assert all(a == 1 or abs(a - t) < 1 + len(sizes) for a, t in zip(alloc, share))
    for k in range(1, 400):
        d_out, d_in = 1 + k % 17, 1 + (7 * k) % 29
        if k <= d_out * d_in:
            k_out, k_in = split_kronecker(k, d_out, d_in)
            assert k_out * k_in >= k and k_out <= d_out and k_in <= d_in
            assert k_out * k_in - k < max(k_out, k_in)
    with pytest.raises(ValueError, match="exceeds"):
        allocate_dims([3, 4], 8)
    with pytest.raises(ValueError, match="number of parameter groups"):
        allocate_dims([3, 4, 5], 2)


@pytest.mark.parametrize("bad", [0, -3])
def test_proj_dim_must_be_positive(bad):
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        Projection(GROUPS, bad)
    for engine in ("exact", "factored"):
        with pytest.raises(ValueError, match="proj_dim must be a positive int"):
            make_gradient_engine(engine, MLP(), proj_dim=bad)
    with pytest.raises(TypeError, match="proj_dim"):
        make_gradient_engine("exact", MLP(), proj_dim=2.5)  # type: ignore[arg-type]


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="unknown projector"):
        Projection(GROUPS, 10, kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown projector"):
        make_gradient_engine("exact", MLP(), projector="sparse")
    with pytest.raises(ValueError, match="unknown gradient engine"):
        make_gradient_engine("fast", MLP())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown parameter names"):
        make_gradient_engine("exact", MLP(), params=["nope.weight"])
    with pytest.raises(ValueError, match="unique"):
        Projection([GROUPS[0], GROUPS[0]], 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_projection_same_on_cuda():
    cpu = Projection(GROUPS, 96, seed=3, kind="gaussian").matrix()
    cuda = Projection(GROUPS, 96, seed=3, kind="gaussian", device="cuda").matrix()
    assert torch.equal(cpu, cuda.cpu())
