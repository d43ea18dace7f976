"""The functional dCor core against the dcor package, dense == blockwise, gradients, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tda.dcor import functional as D

dcor = pytest.importorskip("dcor")

TWO_SAMPLE = {
    "distance_correlation": (D.distance_correlation, dcor.distance_correlation),
    "distance_correlation_sqr": (D.distance_correlation_sqr, dcor.distance_correlation_sqr),
    "u_distance_correlation_sqr": (D.u_distance_correlation_sqr, dcor.u_distance_correlation_sqr),
    "distance_covariance": (D.distance_covariance, dcor.distance_covariance),
    "distance_covariance_sqr": (D.distance_covariance_sqr, dcor.distance_covariance_sqr),
    "u_distance_covariance_sqr": (D.u_distance_covariance_sqr, dcor.u_distance_covariance_sqr),
}
THREE_SAMPLE = {
    "partial_distance_correlation": (D.partial_distance_correlation, dcor.partial_distance_correlation),
    "partial_distance_covariance": (D.partial_distance_covariance, dcor.partial_distance_covariance),
}
METHODS = [dict(method="dense"), dict(method="blockwise", block_size=3), dict(method="blockwise", block_size=64)]


def _case(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random x [n, 3], y [n, 5] depending on x, z [n, 2] depending on x, with a twist."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    y = np.concatenate([x[:, :1] ** 2, rng.standard_normal((n, 4))], 1) + 0.3 * x[:, 1:2]
    z = np.concatenate([np.sin(x[:, 1:2]), rng.standard_normal((n, 1))], 1)
    if kind == "constant_columns":
        x[:, 1] = 2.5
        y[:, 0] = -1.0
        z[:, 1] = 0.0
    elif kind == "duplicated_rows":
        x[1], y[1], z[1] = x[0], y[0], z[0]
        x[3] = x[2]  # a duplicate in x only
        z[n - 1] = z[0]
    elif kind == "integers":
        x, y, z = np.round(3 * x), np.round(3 * y), np.round(3 * z)
    return x, y, z


CASES = [("random", 4), ("random", 5), ("random", 37), ("constant_columns", 4), ("constant_columns", 19),
         ("duplicated_rows", 6), ("duplicated_rows", 25), ("integers", 30)]


@pytest.mark.parametrize("kind,n", CASES)
@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: f"{kw['method']}{kw.get('block_size', '')}")
def test_equals_dcor_package_float64(kind, n, kw):
    for seed in range(3):
        x, y, z = _case(kind, n, seed)
        tx, ty, tz = map(torch.from_numpy, (x, y, z))
        for name, (ours, theirs) in TWO_SAMPLE.items():
            got, want = float(ours(tx, ty, **kw)), float(theirs(x, y))
            assert got == pytest.approx(want, abs=1e-6, rel=1e-6), (name, kind, n, seed)
        for name, (ours, theirs) in THREE_SAMPLE.items():
            got, want = float(ours(tx, ty, tz, **kw)), float(theirs(x, y, z))
            assert got == pytest.approx(want, abs=1e-6, rel=1e-6), (name, kind, n, seed)


def test_equals_dcor_package_degenerate_inputs():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((8, 2)), np.full((8, 3), 4.0)
    for kw in METHODS:
        for ours, theirs in TWO_SAMPLE.values():
            for a, b in ((x, c), (c, x), (c, c)):
                assert float(ours(torch.from_numpy(a), torch.from_numpy(b), **kw)) == pytest.approx(
                    float(theirs(a, b)), abs=1e-9)
        for ours, theirs in THREE_SAMPLE.values():
            for a, b, z in ((x, x, c), (x, c, x), (x, x, x), (c, x, x)):
                got = float(ours(*map(torch.from_numpy, (a, b, z)), **kw))
                assert got == pytest.approx(float(theirs(a, b, z)), abs=1e-6)


def test_docstring_examples_and_trailing_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, 3, 4, generator=g, dtype=torch.float64)  # flattened to width 24
    y = torch.randn(20, generator=g, dtype=torch.float64)  # 1-D: width 1
    want = dcor.distance_correlation(x.reshape(20, -1).numpy(), y.numpy()[:, None])
    assert float(D.distance_correlation(x, y)) == pytest.approx(want, abs=1e-9)
    import doctest

    assert doctest.testmod(D, raise_on_error=False).failed == 0


def _semi_partial_reference(x, y, z):
    """Explicit U-centred matrices, x projected off z, correlated with y (as in the seed's code)."""

    def u_centred(t):
        a = torch.cdist(t, t)
        n = a.shape[0]
        u = a - a.sum(0, keepdim=True) / (n - 2) - a.sum(1, keepdim=True) / (n - 2) + a.sum() / ((n - 1) * (n - 2))
        return u - torch.diag(torch.diag(u))

    def prod(a, b):
        n = a.shape[0]
        return (a * b).sum() / (n * (n - 3))

    a, b, c = u_centred(x), u_centred(y), u_centred(z)
    pa = a - prod(a, c) / prod(c, c) * c
    return prod(pa, b) / torch.sqrt(prod(pa, pa) * prod(b, b))


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: f"{kw['method']}{kw.get('block_size', '')}")
def test_semi_partial_is_the_seed_variant(kw):
    for seed in range(3):
        x, y, z = map(torch.from_numpy, _case("random", 30, seed))
        want = float(_semi_partial_reference(x, y, z))
        assert float(D.semi_partial_distance_correlation(x, y, z, **kw)) == pytest.approx(want, abs=1e-9)
        # it differs from Szekely & Rizzo's partial dCor by sqrt(1 - r_yz^2)
        r_yz = float(D.u_distance_correlation_sqr(y, z))
        pd = float(D.partial_distance_correlation(x, y, z))
        assert want == pytest.approx(pd * np.sqrt(1 - r_yz**2), abs=1e-9)


# ------------------------------------------------------------------------- dense == blockwise


ALL = {**{k: v[0] for k, v in TWO_SAMPLE.items()}, **{k: v[0] for k, v in THREE_SAMPLE.items()},
       "semi_partial_distance_correlation": D.semi_partial_distance_correlation}


def _args(name, n, dtype, seed=0, duplicates=False):
    x, y, z = (torch.from_numpy(a).to(dtype) for a in _case("duplicated_rows" if duplicates else "random", n, seed))
    return (x, y, z) if name in THREE_SAMPLE or name.startswith("semi") else (x, y)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("block_size", [5, 300])
def test_blockwise_equals_dense_values_and_gradients(dtype, tol, block_size):
    for duplicates in (False, True):
        for name, fn in ALL.items():
            args = [a.requires_grad_() for a in _args(name, 24, dtype, duplicates=duplicates)]
            dense = fn(*args, method="dense")
            g_dense = torch.autograd.grad(dense, args)
            block = fn(*args, method="blockwise", block_size=block_size)
            g_block = torch.autograd.grad(block, args)
            assert block.dtype == dtype
            assert float(block.detach()) == pytest.approx(float(dense.detach()), abs=tol, rel=tol), name
            for gd, gb in zip(g_dense, g_block):
                assert torch.isfinite(gb).all()
                torch.testing.assert_close(gb, gd, atol=tol * 10, rtol=tol * 10)


def test_blockwise_with_over_a_thousand_tiles_equals_dense():
    # block_size 4: tiles of 1 row by up to 16 columns, about 1,300 of them at n = 200, so the
    # per-tile sums of products are folded into float64 partway through
    assert sum(1 for _ in D._tiles(200, *D._tile_shape(4))) > 1024
    x, y, z = (torch.from_numpy(a) for a in _case("duplicated_rows", 200, 0))
    for fn, args in ((D.distance_correlation, (x, y)), (D.partial_distance_correlation, (x, y, z))):
        block = fn(*args, method="blockwise", block_size=4)
        assert float(block) == pytest.approx(float(fn(*args, method="dense")), abs=1e-12)


def test_auto_method_switches_to_blockwise_above_dense_max_n(monkeypatch):
    calls = []
    real = D._BlockwiseTerms.apply
    monkeypatch.setattr(D._BlockwiseTerms, "apply", lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(D.DENSE_MAX_N, 2), torch.randn(D.DENSE_MAX_N, 3)
    D.distance_correlation(x, y)
    assert not calls
    D.distance_correlation(torch.randn(D.DENSE_MAX_N + 1, 2), torch.randn(D.DENSE_MAX_N + 1, 3))
    assert calls


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_blockwise_never_holds_an_n_by_n_matrix():
    n, d, block = 600, 4, 80
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, 3, requires_grad=True)
    with _LargestTensor() as probe:
        value = D.u_distance_correlation_sqr(x, y, method="blockwise", block_size=block)
        value.backward()
    # one tile of block**2 entries per input (k = 2 here), or an input laid out as [n, d + 2]
    assert probe.largest <= max(2 * block * block, n * (d + 2))
    assert probe.largest < n * n / 20


# ------------------------------------------------------------------------- gradients


BLOCKWISE_GRADCHECK = ("distance_correlation", "partial_distance_correlation")


@pytest.mark.parametrize("kw", [dict(method="dense"), dict(method="blockwise", block_size=4)], ids=["dense", "blockwise"])
def test_gradcheck(kw):
    # the blockwise backward (the custom part) is the same for every statistic: check it with two
    # and three inputs; the closed forms on top are plain autograd, checked on the dense path
    for name, fn in ALL.items() if kw["method"] == "dense" else ((k, ALL[k]) for k in BLOCKWISE_GRADCHECK):
        args = [a.requires_grad_() for a in _args(name, 7, torch.float64, seed=1)]
        assert torch.autograd.gradcheck(lambda *a: fn(*a, **kw), args), name


def test_gradgradcheck_dense():
    x, y = (a.requires_grad_() for a in _args("distance_correlation_sqr", 7, torch.float64, seed=2))
    assert torch.autograd.gradgradcheck(lambda a, b: D.distance_correlation_sqr(a, b, method="dense"), (x, y))


@pytest.mark.parametrize("kw", METHODS[:2], ids=["dense", "blockwise"])
def test_gradients_finite_for_constant_and_duplicated_inputs(kw):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        const = torch.full((10, 3), 0.1, dtype=dtype)
        dup = torch.randn(10, 4, generator=g).to(dtype)
        dup[5:] = dup[:5]
        other = torch.randn(10, 2, generator=g).to(dtype)
        for name, fn in ALL.items():
            for inputs in ((const, other, dup), (dup, other, const), (dup, dup, other), (const, const, const)):
                args = [t.clone().requires_grad_() for t in inputs[: 3 if fn.__name__.startswith(("partial", "semi")) else 2]]
                value = fn(*args, **kw)
                assert torch.isfinite(value), (name, dtype)
                for grad in torch.autograd.grad(value, args, allow_unused=True):
                    assert grad is None or torch.isfinite(grad).all(), (name, dtype)
        # a constant input has dCor 0 and gradient 0
        c = const.clone().requires_grad_()
        v = D.distance_correlation(c, other, **kw)
        assert float(v.detach()) == 0.0
        assert torch.count_nonzero(torch.autograd.grad(v, c)[0]) == 0


def test_float32_agrees_with_float64():
    x, y, z = (torch.from_numpy(a) for a in _case("random", 100, 0))
    for name, fn in ALL.items():
        args = (x, y, z) if name in THREE_SAMPLE or name.startswith("semi") else (x, y)
        for method in ("dense", "blockwise"):
            lo = fn(*(a.float() for a in args), method=method, block_size=40)
            assert lo.dtype == torch.float32
            assert float(lo) == pytest.approx(float(fn(*args)), abs=1e-4, rel=1e-4), (name, method)


def test_dtype_promotion_and_integer_inputs():
    x = torch.arange(12).reshape(6, 2)  # int64 -> default float dtype
    y = torch.randn(6, 3, dtype=torch.float64)
    assert D.distance_correlation(x, x.float()).dtype == torch.float32
    assert D.distance_correlation(x.float(), y).dtype == torch.float64
    assert D.distance_correlation(x.half(), x.half()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    for name, fn in ALL.items():
        args = _args(name, 700, torch.float64)
        cpu = fn(*args)
        for method in ("dense", "blockwise"):
            gpu = fn(*(a.cuda() for a in args), method=method, block_size=128)
            assert gpu.device.type == "cuda"
            assert float(gpu) == pytest.approx(float(cpu), abs=1e-8), (name, method)


# ------------------------------------------------------------------------- bad input


def test_different_n_is_a_clear_error():
    with pytest.raises(ValueError, match=r"same number of samples.*x has 10, y has 9"):
        D.distance_correlation(torch.randn(10, 2), torch.randn(9, 2))
    with pytest.raises(ValueError, match=r"z has 8"):
        D.partial_distance_correlation(torch.randn(10, 2), torch.randn(10, 2), torch.randn(8, 1))


@pytest.mark.parametrize("fn", [D.u_distance_correlation_sqr, D.u_distance_covariance_sqr,
                                lambda x, y: D.distance_correlation_sqr(x, y, bias_corrected=True),
                                lambda x, y: D.partial_distance_correlation(x, y, y),
                                lambda x, y: D.partial_distance_covariance(x, y, y),
                                lambda x, y: D.semi_partial_distance_correlation(x, y, y)])
def test_unbiased_estimators_need_four_samples(fn):
    with pytest.raises(ValueError, match=r"at least 4 samples, got n=3"):
        fn(torch.randn(3, 2), torch.randn(3, 2))
    fn(torch.randn(4, 2), torch.randn(4, 2))  # n = 4 is fine


def test_biased_estimators_need_two_samples():
    with pytest.raises(ValueError, match=r"at least 2 samples, got n=1"):
        D.distance_correlation(torch.randn(1, 2), torch.randn(1, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_a_clear_error(bad):
    x = torch.randn(8, 3)
    x[5, 1] = bad
    for method in ("dense", "blockwise"):
        with pytest.raises(ValueError, match=r"x has 1 non-finite values \(NaN or inf\) in 1 rows, first rows \[5\]"):
            D.distance_correlation(x, torch.randn(8, 2), method=method)
        with pytest.raises(ValueError, match=r"^z has 1 non-finite"):
            D.partial_distance_correlation(torch.randn(8, 2), torch.randn(8, 2), x, method=method)


def test_other_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        D.distance_correlation(np.zeros((5, 2)), torch.randn(5, 2))
    with pytest.raises(ValueError, match="scalar"):
        D.distance_correlation(torch.tensor(1.0), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least one feature"):
        D.distance_correlation(torch.randn(5, 0), torch.randn(5, 2))
    with pytest.raises(ValueError, match="method must be one of"):
        D.distance_correlation(torch.randn(5, 2), torch.randn(5, 2), method="fast")
    with pytest.raises(ValueError, match="block_size must be a positive int or None"):
        D.distance_correlation(torch.randn(5, 2), torch.randn(5, 2), method="blockwise", block_size=0)
    with pytest.raises(ValueError, match="unknown statistic"):
        D.resolve_statistic("pearson")


def test_imports_with_torch_alone():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'torchmetrics', 'pytorch_lightning', 'lightning_tda', 'sklearn', 'scipy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util, torch\n"
        "spec = importlib.util.spec_from_file_location('dcor_alone', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print(float(mod.distance_correlation(torch.eye(5), torch.eye(5))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, D.__file__], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(1.0)


def test_closed_forms_at_large_n():
    # n**4 no longer fits in int64 at n = 100,000; the closed forms must still evaluate
    s, r = torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 100_000, dtype=torch.float64)
    for bias_corrected in (False, True):
        assert torch.isfinite(D._centred_products(s, r, 100_000, bias_corrected)).all()
