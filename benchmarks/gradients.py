"""Projected per-example gradients: our two engines against traker, a naive loop and plain
training compute, as ratios measured in one run.

    python benchmarks/gradients.py                   # full: digits CNN + a small ResNet on 3x32x32
    python benchmarks/gradients.py --quick           # seconds (used by a test)
    python benchmarks/gradients.py --out benchmarks/results/gradients.md

For each model and projection dimension k (512, 2048) every method processes the same examples in
the same batches, on the same model and k:

- ``factored`` / ``exact``: ``make_gradient_engine(...).project(x, y)`` (margin output, Rademacher);
- ``traker default`` / ``traker float32`` / ``traker best``: ``TRAKer.featurize`` (trak 0.3.x) in
  three settings (:data:`TRAKER_SETTINGS`): as ``TRAKer(device=..., proj_dim=k)`` builds it (on the
  CPU: BasicProjector with normal entries and ``block_size`` 100, float16 -- timed on 1/8 of the
  examples, it is about 10x slower per example); float32 with a Rademacher BasicProjector at its
  default ``block_size`` 100 (the projection matrix is regenerated in 100-column blocks on every
  call); and float32 with ``block_size = k`` (the whole ``p x k`` matrix generated once and kept:
  traker's fastest CPU setting). Each is built with a temporary save_dir and ``load_checkpoint``
  outside the timing;
- ``naive``: a loop of ``torch.autograd.grad`` per example, projected by the exact engine's matrix;
- ``fwd+bwd``: one plain forward + backward (cross-entropy, parameter gradients) over the data.

Methods are interleaved repeat by repeat (the order rotates), so machine noise hits them alike;
each ratio is the median of per-repeat ratios, with its min-max. On the CPU the default is one
thread and the process's CPU time (``--clock process``): on a shared machine other processes'
load then barely moves the figures, and with one thread CPU time equals the wall time an idle
machine would show (``--threads N --clock wall`` measures multi-threaded wall time instead). GPU
runs are always timed by the wall clock, synchronised. Peak memory is measured in an
extra, untimed call: the growth of the resident set (CPU, after ``malloc_trim``) or of
``torch.cuda.max_memory_allocated`` (GPU) over its value before the call. Targets: ``factored`` at
least 20x ``traker float32`` at k = 2048 on the CPU, and at most 2x the time of ``fwd+bwd``.

The projections differ: the factored engine's is Kronecker-structured and block-diagonal over
layers (k split among layers in proportion to their parameter counts), the exact engine's and
traker's are one dense i.i.d. Johnson-Lindenstrauss matrix (traker's with a different seed per
model). Equal k is therefore not equal information: ``benchmarks/lds_digits.py`` gives the LDS
each reaches at the same k.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, today  # noqa: E402

from lightning_tda.data import load_digits_tensors, synthetic_images  # noqa: E402
from lightning_tda.grads import make_gradient_engine  # noqa: E402
from lightning_tda.grads.reference import naive_projected_gradients  # noqa: E402
from lightning_tda.models import DigitsCNN  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8-like CNN for 3x32x32 images (BatchNorm, strided and 1x1 convolutions)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    batch_size: int

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return [
            (self.x[i : i + self.batch_size], self.y[i : i + self.batch_size])
            for i in range(0, len(self.x), self.batch_size)
        ]


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    n_digits, n_resnet = (32, 8) if quick else (1024, 256)
    synthetic = synthetic_images(n_resnet, seed=0)
    resnet = SmallResNet(width=8 if quick else 16)
    with torch.no_grad():  # non-trivial running statistics, as after training
        resnet.train()
        resnet(synthetic.images[: min(64, n_resnet)])
    return [
        Case("DigitsCNN (digits 1x8x8)", DigitsCNN().to(device), images[:n_digits].to(device), labels[:n_digits].to(device), 256),
        Case(
            "SmallResNet (synthetic 3x32x32)",
            resnet.to(device),
            synthetic.images.to(device),
            synthetic.targets.to(device),
            128,
        ),
    ]


# ---------------------------------------------------------------------------------- methods


def fwd_bwd(case: Case) -> Callable[[], None]:
    def run() -> None:
        for x, y in case.batches():
            case.model.zero_grad(set_to_none=True)
            F.cross_entropy(case.model(x), y).backward()
        case.model.zero_grad(set_to_none=True)

    return run


def engine_method(case: Case, engine_name: str, k: int) -> tuple[Callable[[], None], object]:
    engine = make_gradient_engine(engine_name, case.model, proj_dim=k, seed=0, projector="rademacher")

    def run() -> None:
        for x, y in case.batches():
            engine.project(x, y)

    return run, engine


def naive_method(case: Case, projection: object) -> Callable[[], None]:
    def run() -> None:
        for x, y in case.batches():
            naive_projected_gradients(case.model, x, y, projection, chunk_size=case.batch_size)  # type: ignore[arg-type]

    return run


TRAKER_SETTINGS = {
    "traker default": "TRAKer(device=..., proj_dim=k) as constructed: on the CPU its BasicProjector "
    "(normal entries, block_size 100) in float16 (use_half_precision=True)",
    "traker float32": "BasicProjector(rademacher, default block_size 100), use_half_precision=False",
    "traker best": "BasicProjector(rademacher, block_size = k: the whole p x k matrix generated once "
    "and kept), use_half_precision=False",
}
"""The traker configurations timed (on CUDA with fast_jl installed, every one uses its CudaProjector)."""
TRAKER_SUBSET = {"traker default": 8}
"""Methods timed on 1/n of the examples (traker's float16 CPU path is about 10x slower per example)."""


def traker_method(case: Case, k: int, calls: int, tmp: str, device: torch.device, setting: str) -> Callable[[], None] | str:
    """``TRAKer.featurize`` over the data; everything else (construction, checkpoint) untimed."""
    try:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return "traker not installed (pip install -e '.[bench]')"
    grad_dim = sum(p.numel() for p in case.model.parameters())
    projector = None
    if device.type == "cuda":
        try:
            import fast_jl  # noqa: F401
            from trak.projectors import CudaProjector

            projector = CudaProjector(grad_dim, k, 0, ProjectionType.rademacher, device, max_batch_size=32)
        except ImportError:
            projector = None
    if projector is None and setting != "traker default":
        block_size = k if setting == "traker best" else 100
        projector = BasicProjector(
            grad_dim, k, 0, ProjectionType.rademacher, device, block_size=block_size, dtype=torch.float32
        )
    traker = TRAKer(
        model=case.model,
        task="image_classification",
        train_set_size=len(case.x) * calls,
        save_dir=tmp,
        device=str(device),
        proj_dim=k,
        projector=projector,
        use_half_precision=setting == "traker default",
        logging_level=logging.ERROR,
    )
    traker.load_checkpoint(case.model.state_dict(), model_id=0)
    batches = case.batches()[: max(1, len(case.batches()) // TRAKER_SUBSET.get(setting, 1))]

    def run() -> None:
        for x, y in batches:
            traker.featurize(batch=(x, y), num_samples=len(x))

    return run


# ---------------------------------------------------------------------------------- measuring


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Growth of memory in use during one call of ``fn`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], _rss()) - before) / 2**20


@dataclass
class Result:
    case: str
    device: str
    k: int
    n: int
    batch_size: int
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)  # when a method does fewer than n

    def count(self, method: str) -> int:
        return self.examples.get(method, self.n)


def timed(fn: Callable[[], None], device: torch.device, clock: str) -> float:
    """Seconds one call of ``fn`` takes: process CPU time, or synchronised wall time."""
    if device.type == "cuda" or clock == "wall":
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(case: Case, k: int, repeats: int, device: torch.device, clock: str = "process") -> Result:
    result = Result(case.name, str(device), k, len(case.x), case.batch_size)
    methods: dict[str, Callable[[], None]] = {"fwd+bwd": fwd_bwd(case)}
    methods["factored"], _ = engine_method(case, "factored", k)
    methods["exact"], exact = engine_method(case, "exact", k)
    methods["naive"] = naive_method(case, exact.projection)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        for setting in TRAKER_SETTINGS:
            folder = Path(tmp) / setting.replace(" ", "_")
            traker = traker_method(case, k, repeats + 2, str(folder), device, setting)
            if isinstance(traker, str):
                result.notes[setting] = traker
                break
            methods[setting] = traker
            batches = case.batches()
            result.examples[setting] = sum(len(x) for x, _ in batches[: max(1, len(batches) // TRAKER_SUBSET.get(setting, 1))])
        for fn in methods.values():  # warm-up: caches, allocator, first-call costs
            fn()
        names = list(methods)
        result.times = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                result.times[name].append(timed(methods[name], device, clock))
        for name in names:
            result.memory[name] = peak_memory_mib(methods[name], device)
    return result


# ---------------------------------------------------------------------------------- reporting


def ratio(result: Result, ours: str, baseline: str) -> tuple[float, str] | None:
    """Per-repeat ratio of times per example, ``baseline / ours``: median and min-max."""
    if ours not in result.times or baseline not in result.times:
        return None
    n_ours, n_base = result.count(ours), result.count(baseline)
    values = [(b / n_base) / (o / n_ours) for o, b in zip(result.times[ours], result.times[baseline])]
    return statistics.median(values), f"{min(values):.3g}-{max(values):.3g}"


PROJECTIONS = {
    "fwd+bwd": "none",
    "factored": "Kronecker-structured, block-diagonal over layers",
    "exact": "dense JL (one i.i.d. matrix)",
    "naive": "dense JL (exact's matrix)",
    "traker": "dense JL (one i.i.d. matrix per model)",
}


def tables(results: list[Result]) -> str:
    rows = []
    for res in results:
        for name, times in res.times.items():
            rate = [res.count(name) / t for t in times]
            rel = ratio(res, "fwd+bwd", name)
            rows.append(
                [
                    res.case,
                    res.device,
                    res.k,
                    f"{res.count(name)} ({res.batch_size})",
                    name,
                    PROJECTIONS.get(name.split(" ")[0], ""),
                    f"{statistics.median(rate):,.0f} ({min(rate):,.0f}-{max(rate):,.0f})",
                    f"{rel[0]:.2f}x ({rel[1]})" if rel else "",
                    f"{res.memory[name]:.0f}",
                ]
            )
        for name, note in res.notes.items():
            rows.append([res.case, res.device, res.k, f"{res.n} ({res.batch_size})", name, "", note, "", ""])
    throughput = markdown_table(
        ["model", "device", "k", "examples (batch)", "method", "projection", "examples/s median (min-max)", "time / fwd+bwd", "peak memory growth (MiB)"],
        rows,
    )
    figures = []
    for res in results:
        checks = [
            ("factored speed-up over traker default", "factored", "traker default", None, ""),
            ("factored speed-up over traker float32 (block_size 100)", "factored", "traker float32", 20.0 if res.k == 2048 and res.device == "cpu" else None, ">="),
            ("factored speed-up over traker best (block_size = k)", "factored", "traker best", None, ""),
            ("exact speed-up over traker best (block_size = k)", "exact", "traker best", None, ""),
            ("factored speed-up over naive loop", "factored", "naive", None, ""),
            ("exact speed-up over naive loop", "exact", "naive", None, ""),
            ("factored time / fwd+bwd time", "fwd+bwd", "factored", 2.0, "<="),
            ("exact time / fwd+bwd time", "fwd+bwd", "exact", None, ""),
        ]
        for label, ours, baseline, target, sense in checks:
            value = ratio(res, ours, baseline)
            if value is None:
                continue
            verdict = ""
            if target is not None:
                ok = value[0] >= target if sense == ">=" else value[0] <= target
                verdict = f"{sense} {target:g}: {'met' if ok else 'NOT met'}"
            figures.append([res.case, res.device, res.k, label, f"{value[0]:.2f}", value[1], verdict])
    summary = markdown_table(["model", "device", "k", "figure", "ratio (median)", "min-max", "target"], figures)
    return f"{summary}\n\n{throughput}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 1)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="projection dims (default 512 2048)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is available")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--clock", choices=["process", "wall"], default="process", help="CPU timing: process CPU time or wall time"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument(
        "--cache", type=Path, default=None,
        help="keep each measured (model, device, k) here as JSON and reuse it: a run cut short resumes",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    ks = args.ks or ([64] if args.quick else [512, 2048])
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    results = []
    for device in devices:
        for case in make_cases(args.quick, device):
            for k in ks:
                cached = None
                if args.cache is not None:
                    args.cache.mkdir(parents=True, exist_ok=True)
                    name = "".join(c if c.isalnum() else "_" for c in f"{case.name}-{device}-{k}-{repeats}-{args.clock}")
                    cached = args.cache / f"{name}.json"
                if cached is not None and cached.exists():
                    results.append(Result(**json.loads(cached.read_text())))
                    continue
                results.append(measure(case, k, repeats, device, args.clock))
                if cached is not None:
                    cached.write_text(json.dumps(asdict(results[-1])))
                print(f"measured {case.name} on {device}, k={k}", file=sys.stderr, flush=True)
    command = "python benchmarks/gradients.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"## Projected per-example gradients\n\n"
        f"`{command.strip()}` -- {machine()}, torch {torch.__version__}, {today()}; "
        f"{repeats} interleaved repeats after a warm-up; CPU timed by the {args.clock} clock; margin "
        "output, Rademacher projection. Speed ratios are per example.\n\n"
        + "".join(f"- `{name}`: {text}\n" for name, text in TRAKER_SETTINGS.items())
        + f"\n{tables(results)}\n"
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
