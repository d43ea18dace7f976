"""Wall time of ``lightning-tda demo`` (full and ``--fast``): the median of several runs, each
a fresh process into a fresh directory, with each step's seconds from its ``demo.json``.

    python benchmarks/demo_time.py --repeats 3 --out benchmarks/results/demo_time.md
    python benchmarks/demo_time.py --quick        # one fast run (tests/test_demo.py already runs the demo)

Targets (issue #17): the full demo under 5 minutes on 2 CPU cores, ``--fast`` under 90 s. Run it
alone on the machine: a second busy process makes torch's threads spin-wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, today  # noqa: E402

TARGETS = {"full": 300.0, "fast": 90.0}


def run_demo(mode: str, out: Path, seed: int) -> dict:
    """One demo in a fresh process; its wall time (process start to exit) and per-step seconds."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "lightning_tda.cli", "demo", "--out", str(out), "--seed", str(seed)]
    if mode == "fast":
        command += ["--fast", "true"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"demo ({mode}) failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "demo.json").read_text())["summary"]
    return {"wall": wall, "steps": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("seconds/")}}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["fast", "full"], default=["fast", "full"])
    parser.add_argument("--quick", action="store_true", help="one fast run")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    modes, repeats = (["fast"], 1) if args.quick else (args.modes, args.repeats)
    rows, steps_rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            runs = []
            for r in range(repeats):
                runs.append(run_demo(mode, Path(scratch) / f"{mode}_{r}", seed=r))
                print(f"{mode} run {r}: {runs[-1]['wall']:.1f} s", flush=True)
            walls = [run["wall"] for run in runs]
            median = statistics.median(walls)
            rows.append([f"`lightning-tda demo{' --fast' if mode == 'fast' else ''}`", repeats, f"{median:.0f}",
                         f"{min(walls):.0f}-{max(walls):.0f}", f"< {TARGETS[mode]:.0f}: " + ("met" if median < TARGETS[mode] else "NOT met")])
            names = list(runs[0]["steps"])
            steps_rows.append([mode, *[f"{statistics.median(run['steps'][n] for run in runs):.1f}" for n in names]])
    table = markdown_table(["command", "runs", "median wall time (s)", "range (s)", "target"], rows)
    steps = markdown_table(["mode", *names], steps_rows)
    report = "\n".join([
        "# Demo wall time (`benchmarks/demo_time.py`)", "", table, "",
        "Median seconds of each step (from `demo.json`; `train` includes the first fit's start-up):", "", steps, "",
        f"Seeds 0..{repeats - 1} (one per run); machine: {machine()}; load average after: {os.getloadavg()[0]:.1f}; date: {today()}",
        "", f"Command: `python benchmarks/demo_time.py{' --quick' if args.quick else f' --repeats {repeats}'}`", "",
    ])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
