"""Helpers shared by the benchmarks: machine description, repeated timing, markdown tables."""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def machine() -> str:
    """CPU model and core count, plus the GPU name when one is used."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name(0)}"
    return desc


def today() -> str:
    return _dt.date.today().isoformat()


def timed(fn: Callable[[], object], sync: bool = False) -> float:
    """Seconds one call of ``fn`` takes."""
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of a few repeats."""
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def ratio_spread(ours: Sequence[float], baseline: Sequence[float]) -> tuple[float, str]:
    """Per-repeat ratios baseline/ours (paired, same repeat): median and ``min-max``."""
    ratios = [b / o for o, b in zip(ours, baseline)]
    return statistics.median(ratios), f"{min(ratios):.3g}-{max(ratios):.3g}"


def load_benchmark(name: str) -> Any:
    """Another benchmark script of this folder as a module (``benchmarks/`` is not a package), to
    reuse its data splits and caches rather than write them again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emit_report(text: str, out: Path | None) -> str:
    """Print a benchmark's markdown report and, when ``out`` is given, write it there too."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the resident-set high-water mark (VmHWM) to the current RSS; return that RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")
