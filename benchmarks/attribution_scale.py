"""Attribution at scale: TRAK scores from a store of synthetic features, peak memory and time,
against the raw matrix products and traker's ``finalize_scores``.

    python benchmarks/attribution_scale.py --quick                        # seconds (a test runs it)
    python benchmarks/attribution_scale.py --root /tmp/scale --max-minutes 15 --out benchmarks/results/attribution_scale.md
                                   # full: rerun the same command until it prints the table

**Full size** (the issue's): 200,000 training and 10,000 test examples, k = 2,048, 10 checkpoints,
features stored as float16 (8.2 GB of training features; the scores, float32, take 8.0 GB and
are written to the store tile by tile). The synthetic store is generated once under ``--root``
and reused. The scoring is ``TRAK()`` with its defaults (1 GiB working-memory plan) into an out
store; ``--max-minutes`` stops it after that long (a scoring resumes where it stopped, so the
next run of the command goes on; the times of the slices are added, each slice re-reading what
it needs, so the total is an upper bound of one uninterrupted run).

**Peak memory**: the resident-set high-water mark of the process during the scoring (reset with
``echo 5 > /proc/self/clear_refs`` before it, read from ``VmHWM`` after), the whole process
(interpreter, torch, zarr) included. Target: at most 2 GiB.

**Floor**: the matrix products the scores need, nothing else, measured in the same process with
the same threads on in-memory float32 tensors: per checkpoint the curvature ``Phi^T Phi``
(``2 n k^2`` flops), the test rows times the kernel (``2 m k^2``) and the scores
``(Psi K) Phi^T`` (``2 m n k``). At full size they are timed on 16,384 training rows and scaled
to ``n`` (both are linear in ``n``), before and after each slice of the scoring (the machine's
load varies); the median is the floor. Target: the scoring within 1.5x of this floor.

**traker** (0.3.2, ``finalize_features`` + ``finalize_scores``, float32 on the CPU, its
``BasicScoreComputer``): fed the same features (written into its memmap store untimed), run at a
reduced size that fits this 24 GiB machine, beside ours at that size. At full size it cannot
run here: ``finalize_scores`` holds a float32 ``[n_train, n_test]`` accumulator in RAM (8 GB),
and its last line builds two more arrays of that size (the division and the product with the
out-to-loss terms) before writing the memmap: 12 bytes per score, 22 GiB at full size, plus the
features. It is run at 20,000 x 10,000, where that term (2.2 GiB) dominates its memory, and its
measured growth there is given beside the formula.

**Load-matched floor**: the machine is shared, and its load moved the floor between 1,845 and
8,200 s in one run. Besides the median floor, each slice's work (the kernels in the slice that
computed them, the held test rows in each slice, its share of the tiles) is priced at the floor
measured around that slice, and summed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_report, machine, markdown_table, today  # noqa: E402

from lightning_tda import schema  # noqa: E402
from lightning_tda.attribution import TRAK, load_features  # noqa: E402
from lightning_tda.store import RunStore  # noqa: E402

FULL = dict(n_train=200_000, n_test=10_000, k=2048, checkpoints=10)
QUICK = dict(n_train=3_000, n_test=400, k=128, checkpoints=3)
TRAKER_FULL = dict(n_train=20_000, n_test=10_000)  # the n_train x n_test terms dominate traker's memory
FLOOR_ROWS = 16_384
GIB = 2**30


class TimeUp(Exception):
    """The slice's time is over; the scoring resumes on the next run."""


def reset_peak() -> bool:
    """Give freed heap memory back to the system (glibc), then reset the process's RSS high-water
    mark (Linux) to the current RSS; False where that is not possible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: ``VmHWM`` (the high-water mark since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def make_features(path: Path, n_train: int, n_test: int, k: int, checkpoints: int, seed: int = 0) -> RunStore:
    """A store laid out as GradientRecorder writes it: float16 Gaussian features, q in (0.05, 0.95);
    resumable (blocks already written are kept)."""
    store = RunStore.create(path, exist_ok=True)
    store.set_fingerprint("train", {"size": n_train, "labels_sha256": "synthetic-train"})
    store.set_fingerprint("test", {"size": n_test, "labels_sha256": "synthetic-test"})
    block = 8192
    records = []
    for c in range(checkpoints):
        tag = f"epoch={c}"
        for split, n in (("train", n_train), ("test", n_test)):
            g = torch.Generator().manual_seed(seed * 1000 + c * 2 + (split == "test"))
            name, q_name = schema.gradients_array(split, tag), schema.out_to_loss_array(split, tag)
            store.ensure_array(name, (n, k), "float16", block_rows=block)
            store.ensure_array(q_name, (n,), "float32", block_rows=block)
            todo = {start for start, _ in store.incomplete_blocks(name)}
            for start in range(0, n, block):
                rows = min(block, n - start)
                phi = torch.randn(rows, k, generator=g).half()  # drawn for every block: the same values on a resume
                q = torch.rand(rows, generator=g) * 0.9 + 0.05
                if start in todo:
                    store.write_block(q_name, start, q.numpy())
                    store.write_block(name, start, phi.numpy())
        records.append({
            schema.TAG: tag, schema.INDEX: c, schema.EPOCH: c, schema.GLOBAL_STEP: 100 * (c + 1),
            schema.SPLITS: ["train", "test"], schema.OUTPUT: schema.OUTPUT_MARGIN, schema.LEARNING_RATES: [[0.1]],
        })
    store.update_manifest(lambda m: m[schema.RECORDS].__setitem__(schema.GRADIENT_RECORDS, records))
    return store


def run_scoring(features: RunStore, out: RunStore, deadline: float | None, threads: int) -> tuple[float, int, bool, int]:
    """Score (or resume) until done or ``deadline``: (seconds, peak RSS, done, RSS at the start), bytes."""
    original = RunStore.write_tile

    def write_tile(self, name, row_start, col_start, values):  # type: ignore[no-untyped-def]
        original(self, name, row_start, col_start, values)
        if deadline is not None and time.time() > deadline:
            raise TimeUp

    RunStore.write_tile = write_tile  # type: ignore[method-assign]
    torch.set_num_threads(threads)
    reset_peak()
    base = current_rss()
    print(f"RSS before the scoring: {base / GIB:.2f} GiB", flush=True)
    start = time.perf_counter()
    done = True
    try:
        TRAK(progress=False).score(features, "train", "test", out=out, max_return_bytes=0)
    except TimeUp:
        done = False
    finally:
        RunStore.write_tile = original  # type: ignore[method-assign]
    return time.perf_counter() - start, peak_rss(), done, base


def floor_seconds(features: RunStore, sizes: dict, threads: int, repeats: int = 1) -> float:
    """Time of the products the scores need, in memory, float32, scaled to the full train size."""
    torch.set_num_threads(threads)
    n, k, c = sizes["n_train"], sizes["k"], sizes["checkpoints"]
    rows = min(n, FLOOR_ROWS)
    phi = torch.from_numpy(features.read(schema.gradients_array("train", "epoch=0"), slice(0, rows))).float()
    psi = torch.from_numpy(features.read(schema.gradients_array("test", "epoch=0"))).float()
    kernel = torch.randn(k, k) / k
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gram = phi.T @ phi
        t1 = time.perf_counter()
        held = psi @ kernel
        t2 = time.perf_counter()
        scores = held @ phi.T
        t3 = time.perf_counter()
        del gram, scores
        per_checkpoint = (t1 - t0) * n / rows + (t2 - t1) + (t3 - t2) * n / rows
        best = min(best, per_checkpoint * c)
    return best


def load_matched_floor(state: dict, sizes: dict) -> float | None:
    """The floor of each slice's own work at the load measured around it, summed: the kernels'
    share in the slice that computed them, the held rows' in every slice that wrote tiles, and
    the scores' share of the tiles it wrote (None when slices did not record their tiles)."""
    n, m, k = sizes["n_train"], sizes["n_test"], sizes["k"]
    gram, held, cross = 2 * n * k * k, 2 * m * k * k, 2 * m * n * k
    total = gram + held + cross
    expected = 0.0
    for s in state["slices"]:
        if "tiles" not in s:
            return None
        before, after, count = s["tiles"]
        share = (gram / total if before < 0 else 0.0) + (held / total if after > max(before, 0) else 0.0)
        share += cross / total * (after - max(before, 0)) / count
        expected += float(np.mean(s["floors"])) * share
    return expected


def run_traker(features: RunStore, n_train: int, n_test: int, k: int, checkpoints: int, root: Path, threads: int) -> dict:
    """traker's finalize_features + finalize_scores on the first ``n_train`` / ``n_test`` rows of
    the same features; time and peak RSS growth."""
    import logging

    from trak import TRAKer
    from trak.projectors import NoOpProjector

    torch.set_num_threads(threads)
    save_dir = root / "traker"
    shutil.rmtree(save_dir, ignore_errors=True)
    lam = TRAK().lam(load_features(features, "train", "epoch=0").phi[:n_train]) if n_train <= 20_000 else 0.0
    traker = TRAKer(
        model=torch.nn.Linear(k, 1, bias=False), task="image_classification", train_set_size=n_train, save_dir=str(save_dir),
        device="cpu", projector=NoOpProjector(), proj_dim=k, use_half_precision=False, lambda_reg=lam,
        logging_level=logging.ERROR,
    )
    state = traker.model.state_dict()
    for c in range(checkpoints):  # untimed: traker's store gets our features
        tag = f"epoch={c}"
        traker.load_checkpoint(state, model_id=c)
        store = traker.saver.current_store
        store["grads"][:] = features.read(schema.gradients_array("train", tag), slice(0, n_train)).astype(np.float32)
        store["out_to_loss"][:] = features.read(schema.out_to_loss_array("train", tag), slice(0, n_train))[:, None]
        store["is_featurized"][:] = 1
        traker.saver.serialize_current_model_id_metadata()
    for c in range(checkpoints):
        traker.start_scoring_checkpoint("bench", state, model_id=c, num_targets=n_test)
        traker.saver.current_store["bench_grads"][:] = features.read(
            schema.gradients_array("test", f"epoch={c}"), slice(0, n_test)
        ).astype(np.float32)
    reset_peak()
    base = current_rss()
    start = time.perf_counter()
    traker.finalize_features()
    scores = traker.finalize_scores("bench")
    seconds = time.perf_counter() - start
    grown = peak_rss() - base
    return {"seconds": seconds, "peak_growth": grown, "scores": np.asarray(scores).T.copy()}


def ours_at(features: RunStore, n_train: int, n_test: int, root: Path, threads: int) -> dict:
    """Our scoring on the first rows only (a store of views is not available: a copy)."""
    small = make_subset(features, n_train, n_test, root / f"subset_{n_train}_{n_test}")
    shutil.rmtree(root / f"out_{n_train}_{n_test}", ignore_errors=True)  # a fresh scoring, not a finished one
    out = RunStore.create(root / f"out_{n_train}_{n_test}")
    seconds, peak, _, base = run_scoring(small, out, None, threads)
    return {"seconds": seconds, "peak": peak, "peak_growth": peak - base, "scores": out.read(schema.scores_array("trak", "test"))}


def make_subset(features: RunStore, n_train: int, n_test: int, path: Path) -> RunStore:
    if RunStore.exists(path):
        return RunStore(path)
    store = RunStore.create(path)
    store.set_fingerprint("train", {"size": n_train, "labels_sha256": "synthetic-train"})
    store.set_fingerprint("test", {"size": n_test, "labels_sha256": "synthetic-test"})
    records = features.manifest[schema.RECORDS][schema.GRADIENT_RECORDS]
    for record in records:
        for split, n in (("train", n_train), ("test", n_test)):
            for name in (schema.gradients_array(split, record[schema.TAG]), schema.out_to_loss_array(split, record[schema.TAG])):
                values = features.read(name, slice(0, n))
                store.ensure_array(name, values.shape, str(values.dtype), block_rows=8192)
                for start in range(0, n, 8192):
                    store.write_block(name, start, values[start:start + 8192])
    store.update_manifest(lambda m: m[schema.RECORDS].__setitem__(schema.GRADIENT_RECORDS, records))
    return store


def check_quick(features: RunStore, out: RunStore, sizes: dict) -> float:
    """Largest relative error of the streamed scores against TRAK's formula in float64 (quick size)."""
    kernels, qs = [], []
    for c in range(sizes["checkpoints"]):
        train = load_features(features, "train", f"epoch={c}", torch.float64)
        test = load_features(features, "test", f"epoch={c}", torch.float64)
        phi, n = train.phi, train.phi.shape[0]
        lam = float((phi * phi).sum()) / n
        kernels.append(test.phi @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=phi.dtype), phi.T))
        qs.append(train.q)
    expected = (torch.stack(kernels).mean(0) * torch.stack(qs).mean(0)[None, :]).numpy()
    got = out.read(schema.scores_array("trak", "test"))
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", type=Path, default=None, help="where the synthetic store and the scores go")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop the scoring after this long; rerun to resume")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--traker-size", type=int, nargs=2, default=None, metavar=("N_TRAIN", "N_TEST"))
    parser.add_argument("--sizes", type=int, nargs=4, default=None, metavar=("N_TRAIN", "N_TEST", "K", "CHECKPOINTS"),
                        help="other sizes than the full ones (trials)")
    parser.add_argument("--no-traker", action="store_true", help="skip the traker comparison")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.max_minutes is not None and args.max_minutes <= 0):
        parser.error("--threads must be >= 1 and --max-minutes > 0")
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = dict(zip(("n_train", "n_test", "k", "checkpoints"), args.sizes))
        if min(args.sizes) < 1:
            parser.error("--sizes must be positive")
    traker_size = args.traker_size or ((sizes["n_train"], sizes["n_test"]) if args.quick else tuple(TRAKER_FULL.values()))
    temporary = None
    if args.root is None:
        temporary = tempfile.TemporaryDirectory()
        args.root = Path(temporary.name)
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "bench.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"sizes": sizes, "slices": []}
    if state["sizes"] != sizes:
        parser.error(f"{root} holds a benchmark of other sizes {state['sizes']}; use another --root")
    torch.set_num_threads(args.threads)
    started = time.time()
    print(f"features: {sizes} (float16) under {root}", flush=True)
    features = make_features(root / "features", **sizes)
    out = RunStore.create(root / "out", exist_ok=True)
    floors = [floor_seconds(features, sizes, args.threads)]  # around each slice: the machine's load varies
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    name = schema.scores_array("trak", "test")
    before = int(out.completed_tiles(name).sum()) if out.has_array(name) else -1  # -1: kernels to compute
    seconds, peak, done, _ = run_scoring(features, out, deadline, args.threads)
    floors.append(floor_seconds(features, sizes, args.threads))
    tiles = out.completed_tiles(name)
    state["slices"].append({
        "seconds": seconds, "peak_rss": peak, "done": done, "floors": floors, "load": os.getloadavg(),
        "tiles": [before, int(tiles.sum()), int(tiles.size)],
    })
    state_file.write_text(json.dumps(state, indent=1))
    print(f"scoring slice: {seconds:.1f} s, peak RSS {peak / GIB:.2f} GiB, tiles {int(tiles.sum())}/{tiles.size}", flush=True)
    if not done:
        print("not finished: run the same command again to resume")
        return None
    if args.max_minutes and time.time() - started > 30 * args.max_minutes:
        print("scoring complete; run the same command again for the comparisons (floor, traker)")
        return None
    total = sum(s["seconds"] for s in state["slices"])
    peak = max(s["peak_rss"] for s in state["slices"])
    floor = float(np.median([f for s in state["slices"] for f in s["floors"]]))
    matched = load_matched_floor(state, sizes)
    rows = [
        ["time (s)", f"{total:.4g}", f"{floor:.4g} (floor)", f"ours/floor {total / floor:.2f}", "<= 1.5x floor: " + ("met" if total <= 1.5 * floor else "NOT met")],
        ["peak RSS (GiB)", f"{peak / GIB:.2f}", "-", "-", "<= 2 GiB: " + ("met" if peak <= 2 * GIB else "NOT met")],
    ]
    if matched is not None:
        rows.insert(1, ["time, each slice against the floor measured around it (s)", f"{total:.4g}", f"{matched:.4g} (floor)",
                        f"ours/floor {total / matched:.2f}", "<= 1.5x floor: " + ("met" if total <= 1.5 * matched else "NOT met")])
    times = ", ".join(f"{s['seconds']:.0f} s" for s in state["slices"])
    floors = ", ".join(f"{f:.0f}" for s in state["slices"] for f in s["floors"])
    notes = [
        f"scoring slices: {len(state['slices'])} ({times}); floor measured before and after each slice: {floors} s "
        "(the median is the floor)"
    ]
    if args.quick:
        error = check_quick(features, out, sizes)
        notes.append(f"largest relative error against the float64 formula: {error:.1e}")
        assert error < 1e-3, error
    n_t, m_t = traker_size
    if args.no_traker:
        notes.append("traker: not run (--no-traker)")
    try:
        if args.no_traker:
            raise ModuleNotFoundError
        theirs = run_traker(features, n_t, m_t, sizes["k"], sizes["checkpoints"], root, args.threads)
        ours = ours_at(features, n_t, m_t, root, args.threads)
        corr = float(np.corrcoef(theirs["scores"].ravel(), ours["scores"].ravel())[0, 1])
        label = f"{n_t:,} x {m_t:,}"
        rows += [
            [f"time at {label} (s)", f"{ours['seconds']:.1f}", f"{theirs['seconds']:.1f} (traker)", f"traker/ours {theirs['seconds'] / ours['seconds']:.2f}", "-"],
            [f"peak RSS growth at {label} (GiB)", f"{ours['peak_growth'] / GIB:.2f}", f"{theirs['peak_growth'] / GIB:.2f} (traker)", f"traker/ours {theirs['peak_growth'] / max(ours['peak_growth'], 1):.1f}", "-"],
        ]
        # finalize_scores: a float32 n x m accumulator, then (acc / N) * (q / N): two more n x m arrays
        formula_small, needed = 12 * n_t * m_t, 12 * sizes["n_train"] * sizes["n_test"]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with_features = needed + 4 * sizes["n_train"] * sizes["k"] + current_rss()  # its features, float32; the process
        verdict = (
            f"with its features and the process {with_features / GIB:.1f} GiB, more than this machine's "
            f"{memory / GIB:.1f} GiB, so it cannot run here at that size"
            if with_features > memory else f"with its features {with_features / GIB:.1f} GiB, within this machine's {memory / GIB:.1f} GiB"
        )
        notes.append(
            f"traker at {sizes['n_train']:,} x {sizes['n_test']:,}: finalize_scores holds a float32 n_train x n_test "
            f"accumulator and its last line makes two temporaries of that size, 12 bytes per score: "
            f"{needed / GIB:.1f} GiB at full size before its features and the memmap it writes, {verdict} "
            f"(at {label} that term is {formula_small / GIB:.2f} GiB; its measured RSS growth there: "
            f"{theirs['peak_growth'] / GIB:.2f} GiB). Correlation of its scores with ours at {label}: {corr:.4f} "
            "(traker rescales each checkpoint's kernel by its mean absolute entry)"
        )
    except ImportError:
        if not args.no_traker:
            notes.append("traker not installed (the bench extra): no comparison")
    header = ["figure", "ours", "baseline", "ratio", "target"]
    table = markdown_table(header, rows)
    command = "python benchmarks/attribution_scale.py" + (" --quick" if args.quick else f" --root {root}")
    if args.sizes:
        command += " --sizes " + " ".join(map(str, args.sizes))
    if args.max_minutes:
        command += f" --max-minutes {args.max_minutes:g}"
    report = "\n".join([
        "# Attribution at scale (`benchmarks/attribution_scale.py`)", "",
        f"{sizes['n_train']:,} train x {sizes['n_test']:,} test, k = {sizes['k']:,}, {sizes['checkpoints']} checkpoints, "
        "float16 features; TRAK() defaults, scores float32 into an out store tile by tile.", "",
        table, "", *[f"- {n}" for n in notes], "",
        f"machine: {machine()}; date: {today()}; load average after: {os.getloadavg()[0]:.1f}; "
        "wall times need the machine to itself (a load average near the thread count)", "", f"Command: `{command}`", "",
    ])
    emit_report(report, args.out)
    if temporary is not None:
        temporary.cleanup()
    return report


if __name__ == "__main__":
    main()
