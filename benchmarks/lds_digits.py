"""LDS on digits: our scorers against traker's TRAK, compared the way a careful traker user runs it.

    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage sweeps
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage runs --set tuning
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage runs --set table
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage traker --k 512
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage traker --k 1024
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage tune
    python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage table
    python benchmarks/lds_digits.py --quick            # everything, seconds-scale sizes

Every stage caches what it makes under ``--out`` and skips what is finished, so the stages can run
as separate commands (each well under 20 minutes on one core) and a rerun reuses them.

Data (scikit-learn digits, fixed split): 1,000 training digits; 300 *test* digits (the first 300
of the validation split) on which the LDS table is measured; 300 *held-out* digits (training-pool
digits outside the 1,000) on which the ridge is chosen.

Ground truth: two SubsetSweeps of DigitsCNN models on random halves (alpha = 0.5) of the 1,000
training digits, 15 epochs each: the *table* sweep (256 models, seed 0, margins on the test digits)
and the *held-out* sweep (128 other models, seed 1, margins on the held-out digits).

Attribution models: two sets of 10 DigitsCNN runs on all 1,000 digits (15 epochs): *table* runs
(seeds 100-109) and *tuning* runs (seeds 200-209). Each run records, with GradientRecorders every 3
epochs (5 records), projected margin gradients at k = 512 and 1,024 with both of our engines
(``factored``: Kronecker-structured, per layer; ``exact``: one dense Johnson-Lindenstrauss matrix).

Ridge (no tuning on the test set): TRAK's ridge is ``lambda = r * trace(Phi^T Phi) / n`` per
checkpoint; ``r`` is chosen by ``--stage tune`` on the tuning runs against the held-out sweep
(other models, other digits, other attribution runs than the table), as the grid value with the
best LDS averaged over k in {512, 1,024} and 1, 5 and 10 models, factored engine. traker's
``lambda_reg`` is chosen the same way (its own grid, in units of its own features'
``trace / n``), separately for each k and number of models. The table uses only the choices.

traker 0.3.2 on the CPU: its defaults (``TRAKer(..., device="cpu", proj_dim=k)``: BasicProjector
with normal entries and ``block_size = 100``, float16, ``lambda_reg = 0``) and its best settings
(float32, ``lambda_reg`` chosen on the held-out split). Each model gets its own projection seed in
traker; ours use the same per-run seeds (``projection seed = run index``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, today  # noqa: E402

from lightning_tda import schema  # noqa: E402
from lightning_tda.attribution import TRAK, GradCos, GradDot, ProjectedInfluence, TracIn  # noqa: E402
from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder  # noqa: E402
from lightning_tda.data import DigitsDataModule, TensorImageDataset  # noqa: E402
from lightning_tda.datamodels import lds  # noqa: E402
from lightning_tda.models import DigitsCNN, ImageClassifier  # noqa: E402
from lightning_tda.store import RunStore  # noqa: E402
from lightning_tda.sweep import SubsetSweep, read_sweep  # noqa: E402

COMMANDS = """Commands (each stage caches under --out and skips what is finished; one core each):

```
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage sweeps
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage runs --set tuning
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage runs --set table
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage traker --k 512   # and --k 1024
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage tune
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage table
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage projection
python benchmarks/lds_digits.py --out /tmp/attribution-fair/lds --stage report --results benchmarks/results/lds_digits.md
```

Seeds: sweeps 0 (table, 256 models) and 1 (held-out, 128 models); attribution runs 100-109 (table)
and 200-209 (tuning); projection seed = run index; traker: projector seed 0 + its own per-model
offset; bootstrap seed 0.
"""
ENGINES = ("factored", "exact")
RIDGE_GRID = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Candidate ridges ``r`` (multiples of ``trace(Phi^T Phi) / n``) for ours and for traker."""


@dataclass(frozen=True)
class Config:
    n_train: int = 1000
    n_test: int = 300
    n_heldout: int = 300
    table_models: int = 256
    heldout_models: int = 128
    sweep_epochs: int = 15
    runs: int = 10
    epochs: int = 15
    record_every: int = 3
    ks: tuple[int, ...] = (512, 1024)
    model_counts: tuple[int, ...] = (1, 5, 10)
    models_per_block: int = 64
    n_bootstrap: int = 500


QUICK = Config(
    n_train=200, n_test=40, n_heldout=40, table_models=16, heldout_models=16, sweep_epochs=2, runs=2,
    epochs=2, record_every=1, ks=(64,), model_counts=(1, 2), models_per_block=16, n_bootstrap=50,
)
SETS = {"table": ("test", 100), "tuning": ("heldout", 200)}
"""Attribution run sets: the split they are scored on and the first training seed."""


# ------------------------------------------------------------------------------------- data


def datasets(cfg: Config) -> dict[str, TensorImageDataset]:
    """``train`` (the first ``n_train`` of the training pool), ``test`` (the first ``n_test`` of
    the validation split) and ``heldout`` (the next ``n_heldout`` of the training pool)."""
    dm = DigitsDataModule(n_train=None)
    dm.setup()
    pool, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    if cfg.n_train + cfg.n_heldout > len(pool) or cfg.n_test > len(val):
        raise ValueError("digits has 1,438 training-pool and 359 validation digits: sizes too large")
    cut = cfg.n_train + cfg.n_heldout
    return {
        "train": TensorImageDataset(pool.images[: cfg.n_train], pool.targets[: cfg.n_train]),
        "test": TensorImageDataset(val.images[: cfg.n_test], val.targets[: cfg.n_test]),
        "heldout": TensorImageDataset(pool.images[cfg.n_train : cut], pool.targets[cfg.n_train : cut]),
    }


class FixedData(L.LightningDataModule):
    def __init__(self, train: TensorImageDataset, other: dict[str, TensorImageDataset], batch_size: int = 64) -> None:
        super().__init__()
        self.train, self.other, self.batch_size = train, other, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def recording_dataset(self, split: str) -> TensorImageDataset:
        return self.train if split == "train" else self.other[split]


# ------------------------------------------------------------------------------------- stages


def run_sweeps(cfg: Config, root: Path, data: dict[str, TensorImageDataset]) -> None:
    """Both ground-truth sweeps (resumable block by block)."""
    for name, split, models, seed in (("sweep", "test", cfg.table_models, 0), ("sweep_heldout", "heldout", cfg.heldout_models, 1)):
        t0 = time.perf_counter()
        SubsetSweep(
            root / name, model_fn=lambda: DigitsCNN(), train_dataset=data["train"], eval_datasets={split: data[split]},
            num_models=models, alpha=0.5, seed=seed, models_per_block=cfg.models_per_block, epochs=cfg.sweep_epochs,
            batch_size=64, lr=0.05, progress=False,
        ).run()
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)


def sweep_data(root: Path, set_name: str) -> tuple[np.ndarray, np.ndarray]:
    split = SETS[set_name][0]
    return read_sweep(RunStore(root / ("sweep" if set_name == "table" else "sweep_heldout")), split)


def run_dir(root: Path, set_name: str, r: int) -> Path:
    return root / "runs" / set_name / f"run{r}"


def feature_path(root: Path, set_name: str, r: int, engine: str, k: int) -> Path:
    return run_dir(root, set_name, r) / f"{engine}-k{k}"


def run_attribution(cfg: Config, root: Path, data: dict[str, TensorImageDataset], set_name: str, runs: range) -> None:
    """Train the attribution runs of ``set_name`` (skipping finished ones), recording checkpoints
    and, for every engine and k, projected gradients on the training split and the set's split."""
    split, first_seed = SETS[set_name]
    for r in runs:
        folder = run_dir(root, set_name, r)
        if (folder / "done").exists():
            continue
        if folder.exists():  # a run killed part-way: start it again from scratch
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        L.seed_everything(first_seed + r, verbose=False)
        recorders = [
            GradientRecorder(
                feature_path(root, set_name, r, engine, k), proj_dim=k, engine=engine, seed=r,
                every_n_epochs=cfg.record_every, splits=("train", split),
            )
            for engine in ENGINES
            for k in cfg.ks
        ]
        trainer = L.Trainer(
            max_epochs=cfg.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1,
            callbacks=[*recorders, CheckpointRecorder(folder / "checkpoints", every_n_epochs=cfg.record_every)],
        )
        trainer.fit(ImageClassifier(DigitsCNN(), lr=0.05), FixedData(data["train"], {split: data[split]}))
        (folder / "done").write_text("finished\n")
        print(f"{set_name} run {r}: {time.perf_counter() - t0:.0f} s", flush=True)


def stores_of(root: Path, set_name: str, engine: str, k: int, runs: range) -> list[RunStore]:
    return [RunStore(feature_path(root, set_name, r, engine, k)) for r in runs]


def model_groups(cfg: Config, m: int) -> list[range]:
    """Disjoint groups of ``m`` runs (their spread is the spread over seeds)."""
    return [range(s, s + m) for s in range(0, cfg.runs - m + 1, m)]




OURS = "ours-streaming"
"""Cache-key prefix of our scorers' LDS values: those scored by the streaming scorers (TRAK with a
per-checkpoint ``relative_damping``, q-weighted TracIn). Keys ``ours/...`` hold the values of the
earlier scorers (TRAK with one absolute ridge from the models' mean ``trace/n``, unweighted TracIn)
and are no longer read."""


class LDSCache:
    """LDS values of named score computations, kept in a JSON file under the output folder."""

    def __init__(self, path: Path, cfg: Config) -> None:
        self.path, self.cfg = path, cfg
        self.values: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, masks: np.ndarray, margins: np.ndarray, make_scores) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
        if key not in self.values:
            scores = np.asarray(make_scores(), dtype=np.float64)
            if not np.isfinite(scores).all():
                self.values[key] = [float("nan")] * 3
            else:
                result = lds(scores, masks, margins, n_bootstrap=self.cfg.n_bootstrap, seed=0)
                self.values[key] = [float(result.value), float(result.ci_low), float(result.ci_high)]
            self.path.write_text(json.dumps(self.values, indent=0, sort_keys=True))
        return tuple(self.values[key])  # type: ignore[return-value]


def ours_trak(cfg: Config, root: Path, set_name: str, engine: str, k: int, runs: range, r: float, checkpoints: int = 1) -> np.ndarray:
    split = SETS[set_name][0]
    stores = stores_of(root, set_name, engine, k, runs)
    trak = TRAK(relative_damping=r, checkpoints=checkpoints, progress=False)
    return trak.score(stores, schema.TRAIN_SPLIT, split)



def final_checkpoints(root: Path, set_name: str, runs: range) -> list[dict[str, torch.Tensor]]:
    states = []
    for r in runs:
        store = RunStore(run_dir(root, set_name, r) / "checkpoints")
        states.append(store.load_checkpoint(store.checkpoint_tags()[-1])[0])
    return states


def traker_runner(cfg: Config, root: Path, set_name: str, k: int, half: bool):  # type: ignore[no-untyped-def]
    from _lds_traker import TrakerScores

    return TrakerScores(root / "traker" / f"{set_name}-k{k}-{'float16' if half else 'float32'}", cfg.n_train, k, half)


def run_traker(cfg: Config, root: Path, data: dict[str, TensorImageDataset], ks: tuple[int, ...]) -> None:
    """traker's features of the final checkpoints: float32 for both sets (its best settings are
    chosen on the tuning set), and its float16 default for the table set."""
    for k in ks:
        for set_name, half in (("tuning", False), ("table", False), ("table", True)):
            runner = traker_runner(cfg, root, set_name, k, half)
            if runner.done:
                continue
            t0 = time.perf_counter()
            split = SETS[set_name][0]
            runner.featurize(final_checkpoints(root, set_name, range(cfg.runs)), data["train"], {split: data[split]})
            print(f"traker {set_name} k={k} {'float16' if half else 'float32'}: {time.perf_counter() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------- the ridge


def group_mean(cache: LDSCache, key: str, groups: list[range], masks: np.ndarray, margins: np.ndarray, make) -> float:  # type: ignore[no-untyped-def]
    """Mean LDS over disjoint groups of runs (``make(group) -> scores``)."""
    return float(np.mean([cache.get(f"{key}/runs{g.start}-{g.stop}", masks, margins, lambda g=g: make(g))[0] for g in groups]))


def tune(cfg: Config, root: Path) -> dict:
    """Choose our ``r`` and traker's ``lambda_reg`` on the tuning runs and the held-out sweep."""
    masks, margins = sweep_data(root, "tuning")
    cache = LDSCache(root / "lds_tuning.json", cfg)
    ours: dict[str, dict[str, float]] = {}
    for engine in ENGINES:
        for k in cfg.ks:
            for m in cfg.model_counts:
                groups = model_groups(cfg, m)
                ours[f"{engine} k={k} m={m}"] = {
                    str(r): group_mean(cache, f"{OURS}/{engine}/k{k}/r{r}", groups, masks, margins,
                                       lambda g, engine=engine, k=k, r=r: ours_trak(cfg, root, "tuning", engine, k, g, r))
                    for r in RIDGE_GRID
                }
    factored = [v for key, v in ours.items() if key.startswith("factored")]
    mean_over_settings = {str(r): float(np.mean([v[str(r)] for v in factored])) for r in RIDGE_GRID}
    r_best = float(max(mean_over_settings, key=lambda r: mean_over_settings[r]))
    traker: dict[str, dict[str, float]] = {}
    traker_best: dict[str, float] = {}
    for k in cfg.ks:
        runner = traker_runner(cfg, root, "tuning", k, half=False)
        unit = runner.trace_per_example(range(cfg.runs))
        for m in cfg.model_counts:
            groups = model_groups(cfg, m)
            values = {
                str(r): group_mean(cache, f"traker/float32/k{k}/r{r}", groups, masks, margins,
                                   lambda g, r=r: runner.scores("heldout", list(g), r * unit))
                for r in RIDGE_GRID
            }
            traker[f"k={k} m={m}"] = values
            traker_best[f"k={k} m={m}"] = float(max(values, key=lambda r: values[r]))
    result = {"r": r_best, "mean_lds_factored": mean_over_settings, "ours": ours, "traker": traker, "traker_best_r": traker_best}
    (root / "tuning.json").write_text(json.dumps(result, indent=1))
    return result


def tuning_report(result: dict) -> str:
    grid = [str(r) for r in RIDGE_GRID]
    rows = [[f"ours {key}", *[f"{v[r]:.3f}" for r in grid]] for key, v in result["ours"].items()]
    rows += [[f"traker float32 {key}", *[f"{v[r]:.3f}" for r in grid]] for key, v in result["traker"].items()]
    rows.append(["ours factored, mean over k and models", *[f"{result['mean_lds_factored'][r]:.3f}" for r in grid]])
    header = ["held-out LDS (mean over disjoint run groups)", *[f"r={r:g}" for r in RIDGE_GRID]]
    return (
        f"{markdown_table(header, rows)}\n\nchosen: ours r = {result['r']:g} (best mean held-out LDS of the factored "
        f"engine over k and 1/5/10 models); traker lambda_reg = r x trace/n with r per setting: "
        + ", ".join(f"{key}: {r:g}" for key, r in result["traker_best_r"].items())
    )



# ------------------------------------------------------------------------------------- the table


def cell(cache: LDSCache, key: str, cfg: Config, m: int, masks: np.ndarray, margins: np.ndarray, make) -> str:  # type: ignore[no-untyped-def]
    """``value [95% CI over test examples]`` for one group of runs; ``mean (min-max over G
    disjoint groups)`` for several (the spread over training and projection seeds)."""
    groups = model_groups(cfg, m)
    values = [cache.get(f"{key}/runs{g.start}-{g.stop}", masks, margins, lambda g=g: make(g)) for g in groups]
    points = [v[0] for v in values]
    if any(np.isnan(points)):
        return "non-finite scores"
    if len(values) == 1:
        return f"{points[0]:.3f} [{values[0][1]:.3f}, {values[0][2]:.3f}]"
    return f"{np.mean(points):.3f} ({min(points):.3f} to {max(points):.3f}, {len(points)} groups)"


def table(cfg: Config, root: Path, tuning: dict) -> str:
    masks, margins = sweep_data(root, "table")
    cache = LDSCache(root / "lds_table.json", cfg)
    r_star = float(tuning["r"])
    trak_rows, other_rows = [], []
    for k in cfg.ks:
        half = traker_runner(cfg, root, "table", k, half=True)
        full = traker_runner(cfg, root, "table", k, half=False)
        unit = full.trace_per_example(range(cfg.runs))
        for m in cfg.model_counts:
            r_traker = float(tuning["traker_best_r"][f"k={k} m={m}"])

            def c(key, make):  # type: ignore[no-untyped-def]
                return cell(cache, f"{key}/k{k}", cfg, m, masks, margins, make)

            trak_rows.append([
                k, m,
                c(f"{OURS}/factored/r0", lambda g: ours_trak(cfg, root, "table", "factored", k, g, 0.0)),
                c(f"{OURS}/factored/r{r_star}", lambda g: ours_trak(cfg, root, "table", "factored", k, g, r_star)),
                c(f"{OURS}/exact/r0", lambda g: ours_trak(cfg, root, "table", "exact", k, g, 0.0)),
                c(f"{OURS}/exact/r{r_star}", lambda g: ours_trak(cfg, root, "table", "exact", k, g, r_star)),
                c("traker/float16/r0", lambda g: half.scores("test", list(g), 0.0)) if half.done
                else "not featurized (--stage traker)",
                c("traker/float32/r0", lambda g: full.scores("test", list(g), 0.0)),
                c(f"traker/float32/r{r_traker}", lambda g: full.scores("test", list(g), r_traker * unit))
                + f" (lambda_reg = {r_traker:g} x trace/n)",
            ])
            split = "test"

            def score(cls, g, checkpoints=1, **kw):  # type: ignore[no-untyped-def]
                stores = stores_of(root, "table", "factored", k, g)
                return cls(checkpoints=checkpoints, progress=False, **kw).score(stores, schema.TRAIN_SPLIT, split)

            other_rows.append([
                k, m,
                c(f"{OURS}/factored/graddot", lambda g: score(GradDot, g)),
                c(f"{OURS}/factored/gradcos", lambda g: score(GradCos, g)),
                c(f"{OURS}/factored/influence", lambda g: score(ProjectedInfluence, g)),
                c(f"{OURS}/factored/tracin-all", lambda g: score(TracIn, g, checkpoints=None)),
                c(f"{OURS}/factored/trak-all/r{r_star}", lambda g: ours_trak(cfg, root, "table", "factored", k, g, r_star, checkpoints=None)),
            ])
    control = cache.get("random", masks, margins, lambda: np.random.default_rng(0).normal(size=(margins.shape[1], masks.shape[1])))
    trak_table = markdown_table(
        ["k", "models", "ours factored, r = 0", f"ours factored, r = {r_star:g}", "ours exact (dense JL), r = 0",
         f"ours exact (dense JL), r = {r_star:g}", "traker default (float16, lambda_reg = 0)",
         "traker float32, lambda_reg = 0", "traker best (float32, lambda_reg chosen on held-out)"],
        trak_rows,
    )
    other_table = markdown_table(
        ["k", "models", "GradDot", "GradCos", "InfluenceFunction (projected GN)", "TracIn (5 checkpoints per model)",
         f"TRAK (ours, r = {r_star:g}, 5 checkpoints per model)"],
        other_rows,
    )
    return (
        f"TRAK family, final checkpoint of each model:\n\n{trak_table}\n\n"
        f"Other scorers (factored engine):\n\n{other_table}\n\n"
        f"random scores (control): {control[0]:.3f} [{control[1]:.3f}, {control[2]:.3f}]\n\n"
        f"Cells: LDS [95% bootstrap CI over test examples] for one group of models; for 1 and 5 models the "
        f"mean (min to max) over disjoint groups of runs (different training and projection seeds). Ground "
        f"truth: {cfg.table_models} DigitsCNN models on random halves of {cfg.n_train} digits "
        f"({cfg.sweep_epochs} epochs, sweep seed 0), margins on {cfg.n_test} test digits. Attribution: "
        f"{cfg.runs} runs x {cfg.epochs} epochs (seeds {SETS['table'][1]}-{SETS['table'][1] + cfg.runs - 1}, "
        f"projection seed = run index). r = ridge / (trace(Phi^T Phi) / n), chosen on the held-out split "
        f"(--stage tune). machine: {machine()}; date: {today()}"
    )



# ------------------------------------------------------------------------------------- projection study


def equal_split(sizes: list[int], proj_dim: int) -> list[int]:
    """The factored engine's split of k among layers before the fix: equal shares, water-filled."""
    alloc, open_groups, remaining = [0] * len(sizes), list(range(len(sizes))), proj_dim
    while open_groups:
        share = remaining // len(open_groups)
        capped = [i for i in open_groups if sizes[i] <= share]
        if not capped:
            break
        for i in capped:
            alloc[i], remaining = sizes[i], remaining - sizes[i]
        open_groups = [i for i in open_groups if sizes[i] > share]
    base, extra = divmod(remaining, max(1, len(open_groups)))
    for j, i in enumerate(open_groups):
        alloc[i] = base + (j < extra)
    return alloc


def study_features(model: torch.nn.Module, variant: str, k: int, seed: int, data: dict[str, TensorImageDataset]):  # type: ignore[no-untyped-def]
    """``(phi_train, q_train, phi_test)`` in float64 after float32 storage, as a recorder keeps them."""
    import lightning_tda.grads.projectors as projectors
    from lightning_tda.grads import make_gradient_engine

    engine_name = "exact" if variant == "exact" else "factored"
    saved = projectors.allocate_dims
    if variant == "factored, equal split (before)":
        projectors.allocate_dims = equal_split  # type: ignore[assignment]
    try:
        engine = make_gradient_engine(engine_name, model, proj_dim=k, seed=seed)
    finally:
        projectors.allocate_dims = saved
    out = []
    for split in ("train", "test"):
        phi = engine.project(data[split].images, data[split].targets).double()
        out.append(phi)
        if split == "train":
            p = torch.softmax(engine.last_logits.double(), 1).gather(1, data[split].targets[:, None])[:, 0]  # type: ignore[union-attr]
            out.append(1 - p)
    return out


def study_trak(features: list, r: float) -> np.ndarray:  # type: ignore[type-arg]
    """TRAK as the scorer computes it (per model ``phi_test (Phi^T Phi + lambda I)^-1 Phi^T``,
    averaged, times the mean out-to-loss term) on in-memory features."""
    total, q_sum = 0.0, 0.0
    for phi, q, phi_test in features:
        cov = phi.T @ phi
        cov.diagonal().add_(r * float(cov.diagonal().sum()) / phi.shape[0])
        try:
            total = total + phi_test @ torch.linalg.solve(cov, phi.T)
        except torch.linalg.LinAlgError:  # exactly singular: the scorer fails the same way
            return np.full((phi_test.shape[0], phi.shape[0]), np.nan)
        q_sum = q_sum + q
    return ((total / len(features)) * (q_sum / len(features))[None, :]).numpy()


def projection_study(cfg: Config, root: Path, data: dict[str, TensorImageDataset], r_star: float, runs: int = 5) -> str:
    """TRAK's LDS with the factored engine's old (equal) and new (proportional) split of k among
    layers and with the dense projection, on the table's ground truth, at 1 and ``runs`` models; and
    the k at which the factored engine catches up with the dense projection at the first k."""
    masks, margins = sweep_data(root, "table")
    k = cfg.ks[0]
    cases = [("factored, equal split (before)", k), ("factored, proportional split (now)", k), ("exact", k)]
    cases += [("factored, proportional split (now)", k * f) for f in (2, 4, 8)]
    rows = []
    states = final_checkpoints(root, "table", range(runs))
    for variant, dim in cases:
        features = []
        for r, state in enumerate(states):
            model = ImageClassifier(DigitsCNN())
            model.load_state_dict(state)
            features.append(study_features(model.eval(), variant, dim, r, data))
        rank = int(torch.linalg.matrix_rank(features[0][0], rtol=1e-6))
        row = [variant.replace("exact", "exact (dense JL)"), dim, f"{rank} of {min(dim, cfg.n_train)}"]
        for r in (0.0, r_star):
            scores = [study_trak(features[i : i + 1], r) for i in range(runs)]
            single = [lds(s, masks, margins, n_bootstrap=10).value for s in scores if np.isfinite(s).all()]
            both = study_trak(features, r)
            joint = lds(both, masks, margins, n_bootstrap=cfg.n_bootstrap, seed=0) if np.isfinite(both).all() else None
            failed = f", {runs - len(single)} singular" if len(single) < runs else ""
            row.append(f"{np.mean(single):.3f} ({min(single):.3f} to {max(single):.3f}{failed})" if single else "singular")
            row.append(f"{joint.value:.3f} [{joint.ci_low:.3f}, {joint.ci_high:.3f}]" if joint else "singular")
        rows.append(row)
        print(row, flush=True)
    header = ["features (float32, as recorded)", "k", "rank of Phi (run 0)", "TRAK r = 0, 1 model (mean, min to max)",
              f"TRAK r = 0, {runs} models", f"TRAK r = {r_star:g}, 1 model", f"TRAK r = {r_star:g}, {runs} models"]
    return (f"Table ground truth, runs 0-{runs - 1}, TRAK computed in memory as the scorer does (float64 solve "
            f"of float32 features):\n\n{markdown_table(header, rows)}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--stage", default="all", choices=("all", "sweeps", "runs", "traker", "tune", "table", "projection", "report")
    )
    parser.add_argument("--results", type=Path, default=None,
                        help="with --stage report: write the tuning, table and projection study here "
                        "(e.g. benchmarks/results/lds_digits.md)")
    parser.add_argument("--set", default=None, choices=tuple(SETS))
    parser.add_argument("--first-run", type=int, default=0)
    parser.add_argument("--last-run", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else Config()
    root = args.out or Path(tempfile.mkdtemp(prefix="lds_digits_"))
    root.mkdir(parents=True, exist_ok=True)
    data = datasets(cfg)
    stage = args.stage
    if stage in ("all", "sweeps"):
        run_sweeps(cfg, root, data)
    if stage in ("all", "runs"):
        last = cfg.runs if args.last_run is None else args.last_run + 1
        for set_name in [args.set] if args.set else list(SETS):
            run_attribution(cfg, root, data, set_name, range(args.first_run, last))
    if stage in ("all", "traker"):
        run_traker(cfg, root, data, (args.k,) if args.k else cfg.ks)
    out = ""
    if stage in ("all", "tune"):
        result = tune(cfg, root)
        out = tuning_report(result)
        (root / "tuning.md").write_text(out + "\n")
        print(out, flush=True)
    if stage in ("all", "table"):
        result = json.loads((root / "tuning.json").read_text())
        out = table(cfg, root, result)
        (root / "table.md").write_text(out + "\n")
        print(out, flush=True)
    if stage == "projection":
        result = json.loads((root / "tuning.json").read_text())
        out = projection_study(cfg, root, data, float(result["r"]), runs=min(5, cfg.runs))
        (root / "projection.md").write_text(out + "\n")
        print(out, flush=True)
    if stage == "report":
        parts = [(root / f"{name}.md") for name in ("table", "tuning", "projection")]
        titles = ("LDS on the test digits", "How the ridge was chosen (held-out split)", "Why the factored projection lost information")
        out = "\n".join(f"### {t}\n\n{p.read_text()}" for t, p in zip(titles, parts) if p.exists())
        if args.results is not None:
            args.results.write_text(f"## LDS on digits (`benchmarks/lds_digits.py`)\n\n{COMMANDS}\n{out}")
        print(out)
    return out


if __name__ == "__main__":
    main()
