"""DistanceCorrelation / PartialDistanceCorrelation: accumulation, both interfaces, DDP, errors."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_tda.dcor import functional as D
from lightning_tda.dcor.metric import DistanceCorrelation, PartialDistanceCorrelation


def _data(n=57, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=g, dtype=dtype)
    y = torch.cat([x.reshape(n, -1)[:, :2] ** 2, torch.randn(n, 3, generator=g, dtype=dtype)], 1)
    z = torch.sin(x[:, 0, :1]) + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    return x, y, z


@pytest.mark.parametrize("statistic", sorted(D.STATISTICS))
def test_accumulated_equals_functional_and_dcor_package(statistic):
    dcor = pytest.importorskip("dcor")  # imported here, not at the top: the DDP workers import this file
    x, y, _ = _data()
    metric = DistanceCorrelation(statistic=statistic)
    for start in range(0, 57, 10):  # uneven last batch
        metric.update(x[start : start + 10], y[start : start + 10])
    value = metric.compute()
    assert float(value) == pytest.approx(float(D.STATISTICS[statistic](x, y)), abs=1e-12)
    theirs = getattr(dcor, statistic)(x.reshape(57, -1).numpy(), y.numpy())
    assert float(value) == pytest.approx(float(theirs), abs=1e-6)


def test_forward_returns_batch_value_and_accumulates():
    x, y, _ = _data()
    metric = DistanceCorrelation()
    batch_value = metric(x[:20], y[:20])
    assert float(batch_value) == pytest.approx(float(D.distance_correlation(x[:20], y[:20])))
    metric(x[20:], y[20:])
    assert float(metric.compute()) == pytest.approx(float(D.distance_correlation(x, y)))
    metric.reset()
    metric.update(x[:9], y[:9])
    assert float(metric.compute()) == pytest.approx(float(D.distance_correlation(x[:9], y[:9])))


def test_blockwise_metric_equals_dense():
    x, y, z = _data(n=200)
    dense = DistanceCorrelation(method="dense")
    block = DistanceCorrelation(method="blockwise", block_size=32)
    for metric in (dense, block):
        metric.update(x, y)
    assert float(block.compute()) == pytest.approx(float(dense.compute()), abs=1e-10)


@pytest.mark.parametrize("statistic", sorted(D.PARTIAL_STATISTICS))
def test_partial_metric(statistic):
    x, y, z = _data()
    metric = PartialDistanceCorrelation(statistic=statistic)
    for start in range(0, 57, 25):
        metric.update(x[start : start + 25], y[start : start + 25], z[start : start + 25])
    assert float(metric.compute()) == pytest.approx(float(D.PARTIAL_STATISTICS[statistic](x, y, z)), abs=1e-12)


def test_metric_is_differentiable():
    x, y, _ = _data(n=16)
    x.requires_grad_()
    metric = DistanceCorrelation(statistic="distance_correlation_sqr")
    (grad,) = torch.autograd.grad(metric(x, y), x)  # forward keeps the graph of the batch value
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_metric_errors():
    metric = DistanceCorrelation()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="batches of different sizes: x has 5, y has 4"):
        metric.update(torch.randn(5, 2), torch.randn(4, 2))
    metric.update(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="y has 4 features per sample in this update but 3 before"):
        metric.update(torch.randn(5, 2), torch.randn(5, 4))
    with pytest.raises(ValueError, match="unknown statistic"):
        DistanceCorrelation(statistic="partial_distance_correlation")
    with pytest.raises(ValueError, match="method must be"):
        DistanceCorrelation(method="sparse")
    small = DistanceCorrelation(statistic="u_distance_correlation_sqr")
    small.update(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 4 samples, got n=3"):
        small.compute()
    bad = DistanceCorrelation()
    bad.update(torch.tensor([[0.0], [float("nan")], [1.0]]), torch.randn(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        bad.compute()


# ------------------------------------------------------------------------- DDP (2 CPU processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y, z = _data()
        # uneven shards (rank 0: rows 0..33, rank 1: rows 34..56), two updates each
        rows = torch.arange(57)[:34] if rank == 0 else torch.arange(57)[34:]
        metrics = {
            "dcor": DistanceCorrelation(),
            "u_dcor_sqr": DistanceCorrelation(statistic="u_distance_correlation_sqr", method="blockwise", block_size=8),
            "pdcor": PartialDistanceCorrelation(),
        }
        for chunk in rows.split(15):
            metrics["dcor"].update(x[chunk], y[chunk])
            metrics["u_dcor_sqr"].update(x[chunk], y[chunk])
            metrics["pdcor"].update(x[chunk], y[chunk], z[chunk])
        values = {k: m.compute() for k, m in metrics.items()}
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(tmp_path):
    # fork: the workers inherit the imported modules (spawn would import torch and torchmetrics
    # again in each, seconds on a small machine)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    x, y, z = _data()
    want = {
        "dcor": D.distance_correlation(x, y),
        "u_dcor_sqr": D.u_distance_correlation_sqr(x, y),
        "pdcor": D.partial_distance_correlation(x, y, z),
    }
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in want.items():
            assert float(got[key]) == pytest.approx(float(value), abs=1e-12), (rank, key)


def test_docstring_examples():
    import doctest

    import lightning_tda.dcor.metric as module

    assert doctest.testmod(module).failed == 0
