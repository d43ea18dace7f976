"""Computing scores in bounded memory: tile by tile, into a store, resumable.

Every scorer's scores have one form (see :mod:`lightning_tda.attribution.scorers`): over the
*jobs* ``c`` (each run's chosen checkpoints), test features ``Psi_c`` ``[m, k]`` and train
features ``Phi_c`` ``[n, k]`` with out-to-loss terms ``q_c``,

.. math::

    S = \\mathrm{finish}\\Big(\\sum_c T_c(\\Psi_c)\\, M_c\\, W_c(\\Phi_c, q_c)^\\top,\\;
        \\bar q\\Big)

with ``T_c``/``W_c`` row or column scalings, ``M_c`` a ``k x k`` *kernel* (TRAK's and the
influence function's inverse curvature; none for GradDot, GradCos, TracIn) and ``finish`` an
average and a column scaling. The work is cut into *tiles* of ``m_t`` test rows by ``n_t``
training columns, and nothing of size ``n x k``, ``m x n`` or ``C x n x k`` is ever held.

**What is read and written, and how many times** (``C`` jobs, ``s`` bytes a stored feature):

1. *Kernels* (TRAK, ProjectedInfluence): each job's train features are read **once**, in row
   blocks, to accumulate ``Phi^T diag(w) Phi`` (``k x k``, float64); the kernel is written once to
   the work store (the ``out`` store, else a temporary one): ``C k^2 8`` bytes.
2. *Tiles*: for each block of ``m_t`` test rows, each job's test rows are read once, transformed
   (and multiplied by its kernel, read once per row block) and held: ``C m_t k`` compute-dtype
   numbers, the largest term of memory. Then for each block of ``n_t`` training columns, each
   job's train rows and ``q`` are read, the ``m_t x n_t`` tile is summed over jobs, finished, and
   written once (float32) as one chunk of ``scores/<scorer>/<test split>``.

In total the train features are read ``ceil(m / m_t)`` times (plus once for kernels), the test
features once, the scores written once. :func:`plan_tiles` picks the fewest row blocks (passes
over the train features, the largest input) whose held rows leave room in the memory budget for
a tile at least 1,024 columns wide, then makes the tiles as wide as the rest allows. Memory is
thus bounded by the budget whatever ``C``, ``m`` and ``n``; more checkpoints or test rows than
the budget holds at once cost more passes, not memory (at the default 1 GiB, 10 checkpoints of
``k = 2,048`` and 10,000 test rows take one pass; 50 checkpoints take five). Tiles are chunks
replaced atomically, so a
scoring killed at any moment is resumed by computing only the tiles that are missing; kernels
already written are not recomputed. A scoring is identified by its scorer settings, splits and
sources (store paths, record tags and steps): a rerun with other settings is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_tda import schema
from lightning_tda.attribution.features import FeatureSource, select_tags
from lightning_tda.store import RunStore, StoreError, check_same_dataset, fingerprint_of

if TYPE_CHECKING:
    from lightning_tda.attribution.scorers import Scorer

DEFAULT_MEMORY_BYTES = 1 << 30
"""Working memory a scoring plans for (kernels, held test rows, a tile, a block of train rows)."""
DEFAULT_MAX_RETURN_BYTES = 1 << 31
"""Scores larger than this stay in the store: ``score()`` returns a :class:`StoredScores`."""
_GRAM_ROWS = 8192  # train rows read at once while accumulating a kernel's curvature
_HELD_CHUNK = 1024  # test rows transformed (and multiplied by the kernel, in float64) at once
_MIN_COLS = 1024  # a tile is at least this wide when the budget allows


@dataclass
class Job:
    """One checkpoint of one run: its train and test features (same record), its run's index."""

    run: int
    train: FeatureSource
    test: FeatureSource
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``rows x cols`` (test rows x training columns)."""

    rows: int
    cols: int


def plan_tiles(
    n_test: int, n_train: int, k: int, n_jobs: int, compute_bytes: int = 4, feature_bytes: int = 4,
    memory_bytes: int = DEFAULT_MEMORY_BYTES, has_kernel: bool = True,
) -> TilePlan:
    """The tile that keeps a scoring within ``memory_bytes`` and reads the train features as few
    times as it can: the fewest row blocks (passes over the train features) whose held rows
    (every job's transformed test rows) leave room for a tile at least ``_MIN_COLS`` wide; then
    as many training columns as the rest holds for the tile (accumulator and float32 output) and
    one job's block of train rows (stored, converted and weighted)."""
    held_per_row = n_jobs * k * compute_bytes
    fixed = (3 * k * k * 8 if has_kernel else 0) + _HELD_CHUNK * k * 8 * 2  # a kernel and its products
    per_col_of_block = k * (feature_bytes + 2 * compute_bytes)
    min_cols = min(n_train, _MIN_COLS)
    rows = 1
    for passes in range(1, n_test + 1):
        rows = -(-n_test // passes)
        if fixed + rows * held_per_row + min_cols * (rows * (compute_bytes + 4) + per_col_of_block) <= memory_bytes:
            break
        if passes > 64 and rows * held_per_row > memory_bytes:  # jump: rows bounded by the budget alone
            rows = max(1, (memory_bytes // 2 - fixed) // held_per_row)
            break
    rest = memory_bytes - fixed - rows * held_per_row
    cols = int(max(1, min(n_train, rest // (rows * (compute_bytes + 4) + per_col_of_block))))
    if cols < n_train and cols > 256:
        cols -= cols % 256  # whole 256-row pieces of train features
    return TilePlan(int(rows), cols)


@dataclass(frozen=True)
class StoredScores:
    """Scores ``[n_test, n_train]`` kept in a store (too large to return as one array).

    Read them in row blocks (:meth:`iter_row_blocks`), or whole with :meth:`read` /
    ``np.asarray(scores)`` when they fit."""

    store: RunStore
    scorer: str
    test_split: str
    train_split: str
    fingerprints: dict[str, Any]

    @classmethod
    def open(cls, store: RunStore, scorer: str, test_split: str) -> "StoredScores":
        """The complete scores of ``scorer`` on ``test_split`` in ``store``."""
        entry = store.manifest.get(schema.SCORES, {}).get(schema.scores_key(scorer, test_split))
        if entry is None or not entry.get(schema.COMPLETE):
            raise StoreError(
                f"{store.path} holds no complete scores of {scorer!r} on {test_split!r}; run "
                f"the scorer with out= this store (a rerun finishes an interrupted scoring)"
            )
        return cls(store, scorer, test_split, entry[schema.TRAIN_SPLIT_FIELD], entry[schema.FINGERPRINTS])

    @property
    def array(self) -> str:
        return schema.scores_array(self.scorer, self.test_split)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.store.layout(self.array).shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return 4 * self.shape[0] * self.shape[1]

    def read(self, rows: slice | None = None) -> np.ndarray:
        """Rows ``rows`` (all by default) as a float32 array."""
        return self.store.read(self.array, rows)

    def iter_row_blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` blocks of test rows (one tile row block at a time by default)."""
        step = block_rows or self.store.layout(self.array).block_rows
        for start in range(0, self.shape[0], step):
            yield start, self.read(slice(start, min(start + step, self.shape[0])))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self.read()
        return values if dtype is None else values.astype(dtype)


def make_jobs(scorer: "Scorer", stores: Sequence[RunStore], train_split: str, test_split: str) -> list[Job]:
    """Every run's chosen checkpoints, paired train/test, after checking the stores hold one dataset."""
    if not stores:
        raise ValueError("no stores given: pass one RunStore per training run")
    for split, role in ((train_split, schema.TRAIN_ROLE), (test_split, schema.TEST_ROLE)):
        check_same_dataset([(f"the RunStore at {s.path}", fingerprint_of(s, split)) for s in stores], f"{role} split {split!r}")
    jobs = []
    for run, store in enumerate(stores):
        for tag in select_tags(store, scorer.checkpoints):
            train, test = FeatureSource(store, train_split, tag), FeatureSource(store, test_split, tag)
            train.check_pairs_with(test)
            job = Job(run, train, test)
            scorer.check_job(job)
            jobs.append(job)
    widths = {job.train.k for job in jobs}
    if len(widths) > 1:
        raise ValueError(f"the stores' features have different widths {sorted(widths)}; record every run with one proj_dim")
    return jobs


class _Kernels:
    """Each job's kernel, in a store's work array (resumable) or in memory."""

    def __init__(self, store: RunStore | None, name: str, n_jobs: int, k: int) -> None:
        self.store, self.name, self.memory = store, name, {}  # type: ignore[var-annotated]
        if store is not None:
            store.ensure_array(name, (n_jobs, k, k), "float64", row_axis=1, block_rows=k)

    def done(self, c: int) -> bool:
        if self.store is None:
            return c in self.memory
        return bool(self.store.completed_blocks(self.name, (c,)).all())

    def put(self, c: int, kernel: Tensor) -> None:
        if self.store is None:
            self.memory[c] = kernel
        else:
            self.store.write_block(self.name, 0, kernel.numpy(), lead=(c,))

    def get(self, c: int) -> Tensor:
        if self.store is None:
            return self.memory[c]
        return torch.from_numpy(self.store.read(self.name, lead=(c,)))


class _OneKernel:
    """Job ``c``'s kernel seen as the only one (the diagonal walks jobs one at a time)."""

    def __init__(self, kernels: _Kernels, c: int) -> None:
        self.kernels, self.c = kernels, c

    def get(self, c: int) -> Tensor:
        return self.kernels.get(self.c)


def _compute_kernels(scorer: "Scorer", jobs: Sequence[Job], kernels: _Kernels) -> None:
    for c, job in enumerate(tqdm(jobs, desc=f"{scorer.name}: kernels", disable=not scorer.progress or len(jobs) < 2)):
        if kernels.done(c):
            continue
        train, k = job.train, job.train.k
        gram = torch.zeros(k, k, dtype=torch.float64)
        for start in range(0, train.n, _GRAM_ROWS):
            stop = min(start + _GRAM_ROWS, train.n)
            phi = train.rows(start, stop, scorer.dtype, scorer.device)
            weights = scorer.curvature_weights(train.q(start, stop, scorer.dtype, scorer.device))
            gram += ((phi.T * weights) @ phi if weights is not None else phi.T @ phi).double().cpu()
        kernels.put(c, scorer.kernel(gram, train.n))


def _held_rows(scorer: "Scorer", jobs: Sequence[Job], kernels: _Kernels | None, start: int, stop: int, diagonal: bool) -> list[Tensor]:
    """Each job's transformed test rows ``start..stop`` (train rows for a diagonal), computed in
    chunks of ``_HELD_CHUNK`` rows so the float64 kernel products stay small."""
    held = []
    for c, job in enumerate(jobs):
        source = job.train if diagonal else job.test
        rows = torch.empty(stop - start, source.k, dtype=scorer.dtype, device=scorer.device)
        kernel = kernels.get(c).to(scorer.device) if kernels is not None else None
        for lo in range(start, stop, _HELD_CHUNK):
            hi = min(lo + _HELD_CHUNK, stop)
            part = scorer.test_side(source.rows(lo, hi, scorer.dtype, scorer.device), job)
            rows[lo - start : hi - start] = part if kernel is None else part.double() @ kernel
        held.append(rows)
        del kernel
    return held


class _TileBuffers:
    """The tile's sum and a block of train rows, allocated once per row block and reused tile
    after tile: fresh tile-sized allocations would leave the heap to grow by fragmentation."""

    def __init__(self, scorer: "Scorer", rows: int, cols: int, k: int) -> None:
        self.cols = cols
        self.total = torch.empty(rows, cols, dtype=scorer.dtype, device=scorer.device)
        self.block = torch.empty(cols, k, dtype=scorer.dtype, device=scorer.device)


def _tile(scorer: "Scorer", jobs: Sequence[Job], held: list[Tensor], start: int, stop: int, n_runs: int,
          buffers: _TileBuffers | None = None) -> Tensor:
    width = stop - start
    full = buffers is not None and width == buffers.cols
    total = buffers.total if full else None  # type: ignore[union-attr]
    q_sum = None
    for c, (rows, job) in enumerate(zip(held, jobs)):
        q = job.train.q(start, stop, scorer.dtype, scorer.device)
        block = job.train.rows(start, stop, scorer.dtype, scorer.device, out=buffers.block[:width] if buffers else None)
        right = scorer.train_side(block, q, job)
        if c == 0:
            total = torch.matmul(rows, right.T, out=total) if total is not None else rows @ right.T
        else:
            total.addmm_(rows, right.T)  # type: ignore[union-attr]
        q_sum = q.clone() if q_sum is None else q_sum.add_(q)
    assert total is not None and q_sum is not None
    return scorer.finish(total, q_sum / len(jobs), len(jobs), n_runs)


def _entry(scorer: "Scorer", jobs: Sequence[Job], train_split: str, test_split: str) -> dict[str, Any]:
    """What identifies a scoring (compared on a rerun)."""
    def where(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)

    return {
        schema.SCORER: scorer.name,
        schema.SETTINGS: scorer.settings(),
        schema.TRAIN_SPLIT_FIELD: train_split,
        schema.TEST_SPLIT_FIELD: test_split,
        schema.SOURCES: [[where(j.train.store.path), j.train.tag, j.train.global_step] for j in jobs],
        schema.FINGERPRINTS: {
            schema.TRAIN_ROLE: fingerprint_of(jobs[0].train.store, train_split),
            schema.TEST_ROLE: fingerprint_of(jobs[0].test.store, test_split),
        },
        schema.SHAPE: [jobs[0].test.n, jobs[0].train.n],
    }


def _claim(out: RunStore, key: str, entry: dict[str, Any], overwrite: bool, arrays: Sequence[str]) -> bool:
    """Record the scoring in ``out``'s manifest; True when it is already complete there."""
    recorded = out.manifest.get(schema.SCORES, {}).get(key)
    if recorded is not None:
        same = {k: v for k, v in recorded.items() if k != schema.COMPLETE} == entry
        if same and not overwrite:
            return bool(recorded.get(schema.COMPLETE))
        if not overwrite:
            raise StoreError(
                f"the store at {out.path} already holds scores {key!r} from other settings or sources "
                f"({recorded.get(schema.SETTINGS)}, {len(recorded.get(schema.SOURCES, []))} checkpoints; asked: "
                f"{entry[schema.SETTINGS]}, {len(entry[schema.SOURCES])} checkpoints); pass overwrite=True to replace "
                "them, or another out store"
            )
        for name in arrays:
            out.remove_array(name)
    for split, role in ((entry[schema.TRAIN_SPLIT_FIELD], schema.TRAIN_ROLE), (entry[schema.TEST_SPLIT_FIELD], schema.TEST_ROLE)):
        if entry[schema.FINGERPRINTS][role] is not None:
            out.set_fingerprint(split, entry[schema.FINGERPRINTS][role])
    out.update_manifest(lambda m: m.setdefault(schema.SCORES, {}).__setitem__(key, {**entry, schema.COMPLETE: False}))
    return False


def compute_scores(
    scorer: "Scorer",
    stores: Sequence[RunStore],
    train_split: str,
    test_split: str,
    out: RunStore | None,
    overwrite: bool = False,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
    max_return_bytes: int = DEFAULT_MAX_RETURN_BYTES,
) -> np.ndarray | StoredScores:
    """Scores ``[n_test, n_train]`` (see the module docstring): an array when they take at most
    ``max_return_bytes``, else (``out`` given) a :class:`StoredScores`."""
    jobs = make_jobs(scorer, stores, train_split, test_split)
    m, n, k = jobs[0].test.n, jobs[0].train.n, jobs[0].train.k
    nbytes = 4 * m * n
    if out is None and nbytes > max_return_bytes:
        raise ValueError(
            f"the scores would take {nbytes / 2**30:.1f} GiB ({m} x {n} float32), more than "
            f"max_return_bytes={max_return_bytes}: pass out=RunStore(...) to write them to a store tile by tile"
        )
    compute_bytes = torch.finfo(scorer.dtype).bits // 8
    feature_bytes = np.dtype(jobs[0].train.store.layout(jobs[0].train.name).dtype).itemsize
    key, name = schema.scores_key(scorer.name, test_split), schema.scores_array(scorer.name, test_split)
    kernel_name = schema.scoring_work_array(scorer.name, test_split, "kernels")
    n_runs = len({j.run for j in jobs})
    with contextlib.ExitStack() as stack:
        work: RunStore | None = out
        if out is not None:
            if _claim(out, key, _entry(scorer, jobs, train_split, test_split), overwrite, [name, kernel_name]):
                return _result(out, scorer.name, test_split, max_return_bytes)
            if out.has_array(name):
                layout = out.layout(name)
                plan = TilePlan(layout.block_rows, int(layout.block_cols or n))
            else:
                plan = TilePlan(*_plan(scorer, m, n, k, len(jobs), compute_bytes, feature_bytes, tile_rows, tile_cols))
            out.ensure_array(name, (m, n), "float32", block_rows=plan.rows, block_cols=plan.cols)
            done = out.completed_tiles(name)
        else:
            plan = TilePlan(*_plan(scorer, m, n, k, len(jobs), compute_bytes, feature_bytes, tile_rows, tile_cols))
            result = np.empty((m, n), dtype=np.float32)
            done = np.zeros((math.ceil(m / plan.rows), math.ceil(n / plan.cols)), dtype=bool)
            kernel_bytes = len(jobs) * k * k * 8
            if scorer.has_kernel and kernel_bytes > scorer.memory_bytes // 4:
                work = RunStore.create(stack.enter_context(tempfile.TemporaryDirectory()) + "/work")
        kernels = None
        if scorer.has_kernel:
            kernels = _Kernels(work, kernel_name, len(jobs), k) if work is not None else _Kernels(None, "", len(jobs), k)
            if not done.all():
                _compute_kernels(scorer, jobs, kernels)
        with tqdm(total=int((~done).sum()), desc=f"{scorer.name}: tiles", disable=not scorer.progress) as bar:
            for rb in range(done.shape[0]):
                if done[rb].all():
                    continue
                r0, r1 = rb * plan.rows, min((rb + 1) * plan.rows, m)
                held = _held_rows(scorer, jobs, kernels, r0, r1, diagonal=False)
                buffers = _TileBuffers(scorer, r1 - r0, plan.cols, k)
                for cb in range(done.shape[1]):
                    if done[rb, cb]:
                        continue
                    c0, c1 = cb * plan.cols, min((cb + 1) * plan.cols, n)
                    tile = _tile(scorer, jobs, held, c0, c1, n_runs, buffers).float().cpu().numpy()
                    if out is None:
                        result[r0:r1, c0:c1] = tile
                    else:
                        out.write_tile(name, r0, c0, tile)
                    bar.update(1)
                del held, buffers
        if out is None:
            return result
        out.remove_array(kernel_name)
        out.update_manifest(lambda man: man[schema.SCORES][key].__setitem__(schema.COMPLETE, True))
        return _result(out, scorer.name, test_split, max_return_bytes)


def _plan(scorer: "Scorer", m: int, n: int, k: int, n_jobs: int, compute_bytes: int, feature_bytes: int,
          tile_rows: int | None, tile_cols: int | None) -> tuple[int, int]:
    plan = plan_tiles(m, n, k, n_jobs, compute_bytes, feature_bytes, scorer.memory_bytes, scorer.has_kernel)
    rows = min(m, tile_rows) if tile_rows else plan.rows
    cols = min(n, tile_cols) if tile_cols else plan.cols
    if rows < 1 or cols < 1:
        raise ValueError(f"tile_rows and tile_cols must be positive, got {tile_rows} and {tile_cols}")
    return rows, cols


def _result(out: RunStore, scorer: str, test_split: str, max_return_bytes: int) -> np.ndarray | StoredScores:
    stored = StoredScores.open(out, scorer, test_split)
    return stored.read() if stored.nbytes <= max_return_bytes else stored


def compute_diagonal(scorer: "Scorer", stores: Sequence[RunStore], split: str, block_rows: int | None = None) -> np.ndarray:
    """``S_ii`` of ``split`` scored against itself (self-influence), ``[n]``, computed as
    :func:`compute_scores` computes each entry, without the ``n x n`` matrix."""
    jobs = make_jobs(scorer, stores, split, split)
    n, k = jobs[0].train.n, jobs[0].train.k
    compute_bytes = torch.finfo(scorer.dtype).bits // 8
    rows = block_rows or max(1, min(n, scorer.memory_bytes // (4 * k * compute_bytes)))  # one job at a time
    n_runs = len({j.run for j in jobs})
    out = np.empty(n, dtype=np.float64)
    with contextlib.ExitStack() as stack:
        kernels = None
        if scorer.has_kernel:
            work = None
            if len(jobs) * k * k * 8 > scorer.memory_bytes // 4:
                work = RunStore.create(stack.enter_context(tempfile.TemporaryDirectory()) + "/work")
            kernels = _Kernels(work, schema.scoring_work_array(scorer.name, split, "kernels"), len(jobs), k)
            _compute_kernels(scorer, jobs, kernels)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            total = torch.zeros(stop - start, dtype=scorer.dtype, device=scorer.device)
            q_sum = torch.zeros_like(total)
            for c, job in enumerate(jobs):
                left = _held_rows(scorer, [job], _OneKernel(kernels, c) if kernels is not None else None, start, stop, True)[0]
                q = job.train.q(start, stop, scorer.dtype, scorer.device)
                total += (left * scorer.train_side(job.train.rows(start, stop, scorer.dtype, scorer.device), q, job)).sum(1)
                q_sum += q
            out[start:stop] = scorer.finish(total, q_sum / len(jobs), len(jobs), n_runs).double().cpu().numpy()
    return out
