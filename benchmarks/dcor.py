"""Distance correlation: our functional core against the ``dcor`` package, and the blockwise path
at n = 100,000, as ratios measured in one run.

    python benchmarks/dcor.py                 # full (several minutes on 2 CPU cores)
    python benchmarks/dcor.py --quick         # seconds (used by a test)
    python benchmarks/dcor.py --out benchmarks/results/dcor.md
    python benchmarks/dcor.py --threads 2 1 --out ...   # the dcor comparison once per thread count

1. **Against dcor** (CPU, float64 as dcor computes, n = 1,000 and 4,000, x of width 32 and y of
   width 16 depending on x, z of width 8 for the partial statistic): biased dCor, bias-corrected
   squared dCor and partial dCor, ours (``method="auto"``) against the same function of the
   ``dcor`` package. Its fastest applicable method is ``NAIVE``: the O(n log n) ``AVL`` and
   ``MERGESORT`` methods apply only when x and y are both one-dimensional, and partial dCor has no
   other method. Two baselines are timed:

   - ``dcor as installed``: with array-api-compat >= 1.10 (1.16 here) dcor 0.7's test for its
     SciPy path (``_can_be_numpy_double``) compares the array namespace with ``numpy`` and fails,
     so NAIVE computes distances by broadcasting, an ``[n, n, d]`` array;
   - ``dcor NAIVE, scipy cdist``: the same with that test restored to what it means (numpy float
     arrays take ``scipy.spatial.distance.cdist``), i.e. the package at its best. The headline
     ratio is against this one.

   Methods are interleaved repeat by repeat; each ratio is the median of per-repeat ratios
   (baseline / ours) with its min-max. In each repeat a method runs back to back for at least
   ``SLOT_S`` seconds (timeit-style loops: 1 call for dcor, about 10 for ours at n = 1,000) and
   its time is the mean per call: a single call right after a dcor call would also measure the
   cache and TLB refill that dcor's large arrays cause (about +1 ms on a 4 ms call at n = 1,000;
   +0.1 ms on a 150 us matrix product alone). Ours in float32 is listed too (dcor has no float32
   path).
   With several ``--threads`` counts the comparison runs once per count (torch limited to it,
   numpy's BLAS at 1 thread, see ``set_threads``; SciPy's ``cdist`` is single-threaded anyway), each table with the machine's
   load average before and after it (the machine may be shared with other jobs).
2. **Blockwise at scale**: ``distance_correlation`` of x, y of shape ``[100000, 512]`` (float32,
   the default tile size), in a fresh subprocess: wall time, and peak memory as the growth of the
   process's resident-set high-water mark: after the inputs (0.38 GiB for x and y) are made, the
   mark is reset to the current RSS (``echo 5 > /proc/self/clear_refs``), and ``VmHWM`` from
   ``/proc/self/status`` after the call, minus that RSS, is the peak extra memory (exact, no
   sampling). A dense computation would need four 37 GiB matrices. It runs with the smallest
   of the ``--threads`` counts.
3. **GPU** (when CUDA is available): the same sizes on the GPU, timed with synchronisation, peak
   memory from ``torch.cuda.max_memory_allocated`` over the inputs.

Targets (the issue): at least 20x dcor on the CPU; the blockwise path at n = 100,000, d = 512
under 2 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lightning_tda.dcor import functional as D

_HERE = Path(__file__).resolve().parent
# This file is named like the package it measures: keep its folder off the import path so that
# `import dcor` finds the package, and load the shared helpers by file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, markdown_table, ratio_spread = _common.machine, _common.markdown_table, _common.ratio_spread
reset_peak_rss, status_bytes = _common.reset_peak_rss, _common.status_bytes
spread, timed, today = _common.spread, _common.timed, _common.today

ROOT = _HERE.parent
SLOT_S = 0.05
"""Each method's time in a repeat is the mean over back-to-back calls lasting at least this long."""


def _data(n: int, dx: int, dy: int, dz: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx))
    y = np.tanh(x[:, :dy] @ rng.standard_normal((dy, dy)) / np.sqrt(dy)) + 0.5 * rng.standard_normal((n, dy))
    z = x[:, :dz] ** 2 + rng.standard_normal((n, dz))
    return x, y, z


@contextlib.contextmanager
def dcor_scipy_path() -> Iterator[None]:
    """dcor's own intended SciPy path: numpy float arrays go to ``scipy.spatial.distance.cdist``."""
    import dcor.distances as dd

    original = dd._can_be_numpy_double

    def can_be_numpy_double(x: object) -> bool:
        return isinstance(x, np.ndarray) and (
            (np.issubdtype(x.dtype, np.floating) and x.dtype.itemsize <= 8)
            or (np.issubdtype(x.dtype, np.signedinteger) and np.can_cast(x, float))
        )

    dd._can_be_numpy_double = can_be_numpy_double
    try:
        yield
    finally:
        dd._can_be_numpy_double = original


def against_dcor(sizes: list[int], widths: tuple[int, int, int], repeats: int) -> tuple[list[list[str]], list[dict]]:
    threads = torch.get_num_threads()
    import dcor  # the baseline (imported here: numba compiles for seconds at import)

    torch.set_num_threads(threads)  # importing numba resets the OpenMP thread count torch shares

    stats = [
        ("dCor", D.distance_correlation, dcor.distance_correlation, 2),
        ("bias-corrected dCor^2", D.u_distance_correlation_sqr, dcor.u_distance_correlation_sqr, 2),
        ("partial dCor", D.partial_distance_correlation, dcor.partial_distance_correlation, 3),
    ]
    rows, records = [], []
    for n in sizes:
        x, y, z = _data(n, *widths)
        t64 = [torch.from_numpy(a) for a in (x, y, z)]
        t32 = [a.float() for a in t64]
        for label, ours, theirs, k in stats:
            arrays, ours64, ours32 = (x, y, z)[:k], t64[:k], t32[:k]
            want = float(theirs(*arrays))
            got = float(ours(*ours64))
            assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (label, n, got, want)
            methods: dict[str, Callable[[], object]] = {
                "ours float64": lambda: ours(*ours64),
                "ours float32": lambda: ours(*ours32),
                "dcor as installed": lambda: theirs(*arrays),
                "dcor scipy": lambda: _with_scipy(theirs, arrays),
            }
            times: dict[str, list[float]] = {m: [] for m in methods}
            for m, fn in methods.items():  # warm-up (numba, allocator)
                fn()
            loops = {m: max(1, math.ceil(SLOT_S / timed(fn))) for m, fn in methods.items()}
            for r in range(repeats):
                order = list(methods)[r % len(methods):] + list(methods)[: r % len(methods)]
                for m in order:
                    fn, calls = methods[m], loops[m]
                    times[m].append(timed(lambda: [fn() for _ in range(calls)]) / calls)
            for base in ("dcor scipy", "dcor as installed"):
                for mine in ("ours float64", "ours float32"):
                    ratio, rspread = ratio_spread(times[mine], times[base])
                    rows.append([
                        f"{label}, n={n:,}, d={widths[0]}/{widths[1]}" + ("/%d" % widths[2] if k == 3 else ""),
                        f"{mine}: {spread([t * 1e3 for t in times[mine]])} ms",
                        f"{'dcor 0.7 NAIVE, scipy cdist' if base == 'dcor scipy' else 'dcor 0.7 NAIVE as installed'}: "
                        f"{spread([t * 1e3 for t in times[base]])} ms",
                        f"**{ratio:.1f}x** ({rspread})",
                    ])
            records.append({"statistic": label, "n": n, "times_s": times, "value": got})
    return rows, records


def _with_scipy(fn: Callable, arrays: tuple) -> object:
    with dcor_scipy_path():
        return fn(*arrays)




def blockwise_worker(n: int, d: int, block: int | None, device: str) -> dict:
    """Runs in a fresh process: time and peak memory of one blockwise dCor."""
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(n, d, device=dev)
    y = torch.tanh(x @ torch.randn(d, d, device=dev) / d**0.5) + 0.5 * torch.randn(n, d, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base_rss = reset_peak_rss()
    start = time.perf_counter()
    value = D.distance_correlation(x, y, method="blockwise", block_size=block)
    float(value)  # synchronises
    seconds = time.perf_counter() - start
    peak_rss = status_bytes("VmHWM")
    out = {"n": n, "d": d, "block": block, "device": device, "seconds": seconds, "value": float(value),
           "rss_growth_bytes": peak_rss - base_rss, "inputs_bytes": 2 * x.numel() * x.element_size()}
    if dev.type == "cuda":
        out["gpu_peak_growth_bytes"] = torch.cuda.max_memory_allocated() - base_gpu
    return out


def set_threads(n: int) -> None:
    """``n`` torch CPU threads; numpy's BLAS at 1 thread (threadpoolctl comes with scikit-learn).

    dcor's paths make no BLAS products (its times are the same with 1 or 2 BLAS threads), but
    OpenBLAS threads left spinning after each dcor call take the cores from torch's threads:
    measured with 2 torch threads, our float64 dCor at n = 1,000 took 5.3 ms right after dcor
    calls with 2 BLAS threads and 2.5 ms with 1, and dcor 103 ms against 105 ms."""
    torch.set_num_threads(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def load() -> str:
    """The 1-minute load average (other jobs on a shared machine inflate timings)."""
    return f"{os.getloadavg()[0]:.2f}"


def run_blockwise(n: int, d: int, block: int | None, device: str) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
           "--blockwise-worker", json.dumps([n, d, block, device])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"blockwise worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_rows(sizes: list[int], widths: tuple[int, int, int], repeats: int) -> list[list[str]]:
    rows = []
    for n in sizes:
        x, y, _ = (torch.from_numpy(a).float().cuda() for a in _data(n, *widths))
        D.distance_correlation(x, y)
        times = [timed(lambda: float(D.distance_correlation(x, y)), sync=True) for _ in range(repeats)]
        rows.append([f"dCor, n={n:,}, d={widths[0]}/{widths[1]}, GPU float32",
                     f"{spread([t * 1e3 for t in times])} ms", "", ""])
    return rows


def gib(b: float) -> str:
    return f"{b / 2**30:.3f} GiB"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch (and numpy BLAS) CPU threads, one dcor comparison per count (default: "
                             "torch's); 1 gives stable figures on a busy machine")
    parser.add_argument("--skip-blockwise", action="store_true",
                        help="leave out the blockwise run at scale (about 2 minutes)")
    parser.add_argument("--blockwise-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    thread_counts = args.threads or [torch.get_num_threads()]
    if args.threads:
        set_threads(args.threads[0])
    if args.blockwise_worker:
        print(json.dumps(blockwise_worker(*json.loads(args.blockwise_worker))))
        return ""

    widths = (32, 16, 8)
    if args.quick:
        sizes, repeats, (bn, bd, bb) = [100, 300], args.repeats or 2, (2000, 32, None)
    else:
        sizes, repeats, (bn, bd, bb) = [1000, 4000], args.repeats or 5, (100_000, 512, None)

    lines: list[str] = []

    def emit(*new: str) -> None:  # print each section as soon as it is measured
        lines.extend(new)
        print("\n".join(new), flush=True)

    emit(f"# dCor benchmark ({'quick' if args.quick else 'full'})", "",
         f"machine: {machine().split(',')[0]}, {os.cpu_count()} cores; date: {today()}; torch {torch.__version__}", "")
    for threads in thread_counts:
        if args.threads:
            set_threads(threads)
        before = load()
        rows, _ = against_dcor(sizes, widths, repeats)
        emit(*[f"## Against the dcor package, {threads} thread{'s' * (threads > 1)} "
               "(CPU; ratio = dcor time / our time, paired per repeat)", "",
               f"load average (1 min) before / after: {before} / {load()}", "",
               markdown_table(["figure", "ours", "baseline", "ratio (min-max)"], rows), ""])

    if args.threads:
        set_threads(min(thread_counts))
    before = load()
    cpu = None if args.skip_blockwise else run_blockwise(bn, bd, bb, "cpu")
    if cpu is None:
        emit("## Blockwise path (CPU)", "", "Skipped (`--skip-blockwise`).", "")
    else:
        emit(*[f"## Blockwise path (CPU, {min(thread_counts)} thread{'s' * (min(thread_counts) > 1)})", "",
           f"load average (1 min) before / after: {before} / {load()}", "", markdown_table(
        ["figure", "value"],
        [[f"distance_correlation, n={cpu['n']:,}, d={cpu['d']} (x and y), float32, "
          f"block {cpu['block'] or 'default (512 on the CPU)'}", ""],
         ["wall time", f"{cpu['seconds']:.1f} s"],
         ["peak RSS growth over the inputs (VmHWM after a reset, fresh process)", gib(cpu["rss_growth_bytes"])],
         ["inputs x and y (not counted above)", gib(cpu["inputs_bytes"])],
         ["target", "< 2 GiB: " + ("met" if cpu["rss_growth_bytes"] < 2 * 2**30 else "NOT met")],
         ["dCor value", f"{cpu['value']:.5f}"]]), ""])

    if torch.cuda.is_available():
        gpu_table = gpu_rows(sizes, widths, repeats)
        if not args.skip_blockwise:
            gpu = run_blockwise(bn, bd, bb, "cuda")
            gpu_table += [[f"blockwise n={gpu['n']:,}, d={gpu['d']}: wall time", f"{gpu['seconds']:.2f} s", "", ""],
                          ["GPU peak memory growth over the inputs", gib(gpu["gpu_peak_growth_bytes"]), "", ""]]
        emit(*["## GPU", "", markdown_table(["figure", "ours", "", ""], gpu_table), ""])
    else:
        emit("## GPU", "", "No CUDA device in this run: the GPU section (same code, `device='cuda'`) was skipped.", "")

    report = "\n".join(lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/dcor.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.out).write_text(report + f"\n\nCommand: `{command}`\n")
    return report


if __name__ == "__main__":
    main()
