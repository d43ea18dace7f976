"""Diversity Metric classes: accumulated over batches they equal the functional values, and under
2-process DDP (gloo) they equal one process on all examples."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_tda.diversity import functional as F
from lightning_tda.diversity.metrics import (
    ConversionRate,
    Disagreement,
    EnsembleGain,
    ErrorConsistency,
    ErrorCorrelation,
    ErrorInconsistency,
    PairwiseDiversity,
)


def _data(M=4, n=53, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    logits = torch.randn(M, n, C, generator=g)
    logits[torch.arange(M)[:, None], torch.arange(n), y] += torch.linspace(0.5, 2.0, M)[:, None]
    return logits, y


TWO_MODEL = {
    "error_inconsistency": (ErrorInconsistency, lambda a, b, y: F.error_inconsistency(a, b, y)),
    "error_consistency": (ErrorConsistency, lambda a, b, y: F.error_consistency(a, b, y)),
    "error_correlation": (ErrorCorrelation, lambda a, b, y: F.error_correlation(a, b, y)),
    "disagreement": (Disagreement, lambda a, b, y: F.disagreement(a, b)),
    "ensemble_gain": (EnsembleGain, lambda a, b, y: F.ensemble_gain(a, b, y)),
    "conversion_rate": (ConversionRate, lambda a, b, y: F.conversion_rate(a, b, y)),
}


@pytest.mark.parametrize("name", sorted(TWO_MODEL))
def test_accumulated_equals_functional(name):
    cls, fn = TWO_MODEL[name]
    logits, y = _data()
    metric = cls()
    for start in range(0, 53, 10):  # uneven last batch
        sl = slice(start, start + 10)
        metric.update(logits[0, sl], logits[3, sl], y[sl])
    assert float(metric.compute()) == pytest.approx(float(fn(logits[0], logits[3], y)), abs=1e-6)


def test_pairwise_metric_equals_functional_and_labels_skip_the_ensemble():
    logits, y = _data()
    metric = PairwiseDiversity(num_models=4)
    for start in range(0, 53, 20):
        metric.update(logits[:, start : start + 20], y[start : start + 20])
    got, want = metric.compute(), F.pairwise_diversity(logits, y)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)
    labels_only = PairwiseDiversity(num_models=4)
    labels_only.update(logits.argmax(-1), y)
    out = labels_only.compute()
    assert "ensemble_accuracy" not in out
    torch.testing.assert_close(out["error_inconsistency"], want["error_inconsistency"])


def test_forward_gives_the_batch_value_and_reset_clears():
    logits, y = _data()
    metric = ErrorInconsistency()
    batch = metric(logits[0, :20], logits[1, :20], y[:20])
    assert float(batch) == pytest.approx(float(F.error_inconsistency(logits[0, :20], logits[1, :20], y[:20])))
    metric.reset()
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning):
        metric.compute()


def test_metric_errors():
    logits, y = _data()
    with pytest.raises(ValueError, match="needs probabilities or logits"):
        EnsembleGain().update(logits[0].argmax(-1), logits[1].argmax(-1), y)
    with pytest.raises(ValueError, match="num_models=3, got predictions of 4"):
        PairwiseDiversity(num_models=3).update(logits, y)
    with pytest.raises(ValueError, match="different class counts"):
        ErrorInconsistency().update(logits[0], logits[1, :, :3], y)
    with pytest.raises(ValueError, match="different lengths"):
        ErrorInconsistency().update(logits[0], logits[1, :50], y)
    with pytest.raises(ValueError, match="needs target"):
        ErrorConsistency().update(logits[0], logits[1])
    with pytest.raises(ValueError, match="num_models must be an integer >= 2"):
        PairwiseDiversity(num_models=1)
    with pytest.raises(ValueError, match="reference must be"):
        EnsembleGain(reference="median")


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
        logits, y = _data()
        rows = torch.arange(53)[:30] if rank == 0 else torch.arange(53)[30:]  # uneven shards
        metrics = {name: cls() for name, (cls, _) in TWO_MODEL.items()}
        pairwise = PairwiseDiversity(num_models=4, combine="logits")
        for chunk in rows.split(12):
            for metric in metrics.values():
                metric.update(logits[0, chunk], logits[2, chunk], y[chunk])
            pairwise.update(logits[:, chunk], y[chunk])
        values = {name: m.compute() for name, m in metrics.items()}
        values.update({f"pairwise/{k}": v for k, v in pairwise.compute().items()})
        torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    logits, y = _data()
    want = {name: fn(logits[0], logits[2], y) for name, (_, fn) in TWO_MODEL.items()}
    want.update({f"pairwise/{k}": v for k, v in F.pairwise_diversity(logits, y, combine="logits").items()})
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(want)
        for key, value in want.items():
            if value.ndim == 0 and math.isnan(float(value)):
                assert math.isnan(float(got[key])), (rank, key)
            else:
                torch.testing.assert_close(got[key], value, equal_nan=True, msg=f"rank {rank} {key}")


def test_docstring_examples():
    import doctest

    import lightning_tda.diversity.metrics as module

    assert doctest.testmod(module).failed == 0
