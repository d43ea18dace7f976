"""ModelDiff's residual PCA: speed and memory at scale, and MadryLab's ``modeldiff`` package.

    python benchmarks/modeldiff_speed.py                # full: 10,000 x 50,000 float32 (4 GB of inputs)
    python benchmarks/modeldiff_speed.py --quick        # seconds (used by a test)
    python benchmarks/modeldiff_speed.py --out benchmarks/results/modeldiff.md

1. **At scale** (the issue's target): two synthetic attribution matrices ``[10,000, 50,000]``
   float32 (a shared rank-20 structure, a rank-3 part only A has, and noise), and
   ``ModelDiff(A, B).directions("a", num=5)``: the randomized SVD on the implicit residual and
   the variances of both algorithms (no noise floor: that is five such calls on halves). Each
   repeat runs in a fresh process; wall time of the call, and its peak memory from the process's
   resident-set high-water mark: reset to the current RSS after the inputs are made
   (``echo 5 > /proc/self/clear_refs``), ``VmHWM`` from ``/proc/self/status`` after the call.
   Reported: the peak process memory (inputs included) over the inputs' size (target < 3x) and
   the extra memory the call took.
2. **Against the package** (``modeldiff`` 1.0.1 on PyPI, MadryLab): its ``residual_pca`` (numpy
   residual of the raw scores, scikit-learn ``PCA`` with its default solver, variances in torch;
   ``device="cpu"`` since its default is CUDA; it has no other setting) against ours with
   ``residual_of="raw"`` (its residual) on the same matrices, at a size it handles
   (2,000 x 10,000): time, peak memory (fresh processes), and agreement (|cos| of the
   directions, largest variance difference). Ours is also timed with the paper's residual
   (``"normalized"``, our default), which costs the same.

Timings on a shared machine are provisional; the memory figures and agreement do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, reset_peak_rss, status_bytes, today  # noqa: E402


def synthetic(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``[n, d]`` attribution matrices A and B, built in place (no temporary of their size)."""
    g = torch.Generator().manual_seed(seed)
    shared_left, shared_right = torch.randn(n, 20, generator=g), torch.randn(20, d, generator=g) / 20**0.5
    own_left, own_right = torch.randn(n, 3, generator=g), torch.randn(3, d, generator=g) * 0.6
    a = torch.empty(n, d).normal_(generator=g).mul_(2.0)
    a.addmm_(shared_left, shared_right).addmm_(own_left, own_right)
    b = torch.empty(n, d).normal_(generator=g).mul_(2.0)
    b.addmm_(shared_left, shared_right)
    return a, b


def worker(kind: str, n: int, d: int, threads: int) -> dict:
    """Runs in a fresh process: one timed call with its peak memory."""
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    if kind.startswith("ours"):
        from lightning_tda.modeldiff import ModelDiff
    else:
        here = Path(__file__).resolve().parent  # MadryLab's package, never a module of this folder
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        import modeldiff.pca as package

        original = package.get_variance_along_directions
        package.get_variance_along_directions = lambda X, P, **kw: original(X, P, device="cpu")
    a, b = synthetic(n, d)
    inputs = 2 * a.numel() * a.element_size()
    base = reset_peak_rss()
    start = time.perf_counter()
    if kind.startswith("ours"):
        residual_of = "raw" if kind == "ours-raw" else "normalized"
        result = ModelDiff(a, b, residual_of=residual_of).directions("a", num=5)
        directions, variance_a = result.train_weights, result.variance_a * result.total_variance_a
    else:
        out = package.residual_pca(a, b, 5)
        directions, variance_a = np.asarray(out["directions"]), np.asarray(out["variances"]["A"])
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    return {"kind": kind, "n": n, "d": d, "seconds": seconds, "inputs_bytes": inputs, "base_rss": base,
            "peak_rss": peak, "extra_bytes": peak - base, "directions": np.asarray(directions, dtype=np.float64).tolist(),
            "variance_a": np.asarray(variance_a, dtype=np.float64).tolist()}


def run(kind: str, n: int, d: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([kind, n, d, threads])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(*json.loads(args.worker))))
        return ""
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    scale, compare = ((600, 3_000), (300, 1_500)) if args.quick else ((10_000, 50_000), (2_000, 10_000))
    load_before = os.getloadavg()[0]

    big = [run("ours", *scale, args.threads) for _ in range(args.repeats)]
    seconds = [r["seconds"] for r in big]
    ratio = [(r["inputs_bytes"] + r["extra_bytes"]) / r["inputs_bytes"] for r in big]
    rows = [
        [f"residual PCA, 5 directions, {scale[0]:,} x {scale[1]:,} float32: time", f"{spread(seconds)} s", "< 60 s",
         "met" if statistics.median(seconds) < 60 else "NOT met"],
        ["peak memory (the two inputs + the call's peak extra) / the two inputs",
         f"{spread(ratio)} x ({gib(big[0]['inputs_bytes'])} of inputs)", "< 3x", "met" if max(ratio) < 3 else "NOT met"],
        ["extra memory of the call", f"{spread([r['extra_bytes'] / 2**30 for r in big])} GiB", "", ""],
        ["peak resident memory of the whole process (Python, torch, inputs)",
         f"{spread([r['peak_rss'] / 2**30 for r in big])} GiB", "", ""],
    ]
    scale_table = markdown_table(["figure", "ours", "target", "verdict"], rows)

    ours, ours_paper, theirs = [], [], []
    for _ in range(args.repeats):  # interleaved
        ours.append(run("ours-raw", *compare, args.threads))
        theirs.append(run("package", *compare, args.threads))
        ours_paper.append(run("ours", *compare, args.threads))
    cos = np.abs((np.asarray(ours[0]["directions"]) * np.asarray(theirs[0]["directions"])).sum(1))
    var_diff = np.abs(np.asarray(ours[0]["variance_a"]) - np.asarray(theirs[0]["variance_a"])).max()
    ratios = [t["seconds"] / o["seconds"] for o, t in zip(ours, theirs)]
    mem_ratio = [t["extra_bytes"] / max(o["extra_bytes"], 1) for o, t in zip(ours, theirs)]
    rows = [
        [f"time, {compare[0]:,} x {compare[1]:,}", f"{spread([r['seconds'] for r in ours])} s",
         f"{spread([r['seconds'] for r in theirs])} s", f"{statistics.median(ratios):.3g}x ({min(ratios):.3g}-{max(ratios):.3g})"],
        ["extra memory of the call", gib(statistics.median([r["extra_bytes"] for r in ours])),
         gib(statistics.median([r["extra_bytes"] for r in theirs])), f"{statistics.median(mem_ratio):.3g}x less"],
        ["ours with the paper's residual (default), time", f"{spread([r['seconds'] for r in ours_paper])} s", "", ""],
        ["agreement: min abs(cos) of the 5 directions", f"{cos.min():.6f}", "", ""],
        ["agreement: abs(cos) of directions 1-5 (1-3: the planted components of A; 4-5: noise, their "
         "singular values nearly tie, so any two approximate SVDs pick different bases there)",
         " / ".join(f"{c:.4f}" for c in cos), "", ""],
        ["agreement: max abs(variance difference) under A", f"{var_diff:.2e}", "", ""],
    ]
    compare_table = markdown_table(["figure", "ours (raw residual, as the package)", "modeldiff 1.0.1 residual_pca (CPU)", "ratio"], rows)
    command = "python benchmarks/modeldiff_speed.py" + (" --quick" if args.quick else "") + f" --repeats {args.repeats} --threads {args.threads}"
    report = (
        f"# ModelDiff residual PCA\n\nCommand: `{command}`; machine: {machine()} (benchmark processes use "
        f"{args.threads} threads); date: {today()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(timings provisional on a shared machine; memory and agreement do not depend on load).\n\n"
        f"## At scale (fresh process per repeat, {args.repeats} repeats: median (min-max))\n\n{scale_table}\n\n"
        f"## Against MadryLab's modeldiff package (interleaved fresh processes)\n\n{compare_table}\n"
    )
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
