"""``lightning-tda demo``: every capability on the bundled digits, end to end, in minutes.

Two learning algorithms are trained, several models each, with the recorders on: A without data
augmentation, B with random 1-pixel shifts. Then, from what the recorders wrote:

1. attribution (TRAK over A's models) and its linear datamodeling score against a subset sweep;
2. ModelDiff of A against B, with its counterfactual check;
3. diversity between all the models (which make different mistakes, what ensembling gains);
4. distance correlation between A's and B's representations, layer by layer;
5. further training (the final-model-only gold standard) on a handful of examples;
6. ModelPred data values on a digits subset with flipped labels, and how many flips they find.

Everything goes to one report directory (PNG/CSV, one HTML page, the stores) and a W&B run
(offline unless you are logged in). ``--fast`` runs each step at a smaller size (under 90 s on 2
CPU cores); the default takes a few minutes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_tda.cli.output import check_output_dir, finish, make_reporter
from lightning_tda.reporting import Reporter
from lightning_tda.store import RunStore


@dataclass(frozen=True)
class DemoSettings:
    """The sizes of every step (``full()`` and ``fast()`` are the two the command runs)."""

    n_train: int | None
    epochs: int
    models_per_algorithm: int
    proj_dim: int
    sweep_models: int
    sweep_epochs: int
    further_training_instances: int
    further_training_seeds: int
    modelpred_n_train: int
    modelpred_fit: str = "fast"
    seed: int = 0

    @classmethod
    def full(cls, seed: int = 0) -> "DemoSettings":
        return cls(n_train=None, epochs=10, models_per_algorithm=5, proj_dim=1024, sweep_models=128, sweep_epochs=10,
                   further_training_instances=12, further_training_seeds=5, modelpred_n_train=150, modelpred_fit="demo", seed=seed)

    @classmethod
    def fast(cls, seed: int = 0) -> "DemoSettings":
        return cls(n_train=500, epochs=6, models_per_algorithm=3, proj_dim=256, sweep_models=32, sweep_epochs=6,
                   further_training_instances=6, further_training_seeds=2, modelpred_n_train=150, seed=seed)


MODELPRED_DEMO_FIT = {
    "num_permutations": 32, "prefixes_per_permutation": 16, "num_random_subsets": 512, "num_validation_subsets": 128,
    "max_epochs": 150, "patience": 15, "pooling": "sum",
}
"""The full demo's ModelPred fit: about 50 s on 2 cores at 150 digits; its Shapley values find 8-10 of the
15 flipped labels (seeds 0, 1), where ``--fast``'s smaller fit (8 s) finds 2-4."""

ALGORITHMS = {"A": {"augment": False, "description": "no augmentation"}, "B": {"augment": True, "description": "random 1-pixel shifts"}}


def _quiet_trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


def train_algorithms(root: Path, settings: DemoSettings, progress: bool = True) -> dict[str, list[RunStore]]:
    """Train ``models_per_algorithm`` digits CNNs per algorithm, each with the three recorders
    into its own store (margins + logits + embeddings every epoch, projected gradients and the
    checkpoint at the end)."""
    from lightning_tda.callbacks import CheckpointRecorder, GradientRecorder, MarginRecorder
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.models import DigitsCNN, ImageClassifier

    stores: dict[str, list[RunStore]] = {}
    jobs = [(name, m) for name in ALGORITHMS for m in range(settings.models_per_algorithm)]
    for name, m in tqdm(jobs, desc="demo: training A and B", disable=not progress):
        seed = settings.seed * 1000 + m
        path = root / f"{name}_{m}"
        RunStore.create(path, run_name=f"{name}_{m}", algorithm=name, seed=seed)
        L.seed_everything(seed, verbose=False)
        dm = DigitsDataModule(n_train=settings.n_train, augment=ALGORITHMS[name]["augment"], batch_size=32)
        trainer = _quiet_trainer(max_epochs=settings.epochs, callbacks=[
            MarginRecorder(path, logits=True, embeddings="model.relu"),
            GradientRecorder(path, proj_dim=settings.proj_dim, seed=settings.seed),
            CheckpointRecorder(path, every_n_epochs=None),
        ])
        trainer.fit(ImageClassifier(DigitsCNN(), lr=0.01, optimizer="adam"), dm)
        stores.setdefault(name, []).append(RunStore(path))
    return stores


def attribution_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """TRAK over A's models, the top training examples of a few test digits, and the LDS of
    TRAK and Grad-Dot against a subset sweep of the same architecture."""
    from lightning_tda.attribution import TRAK, GradDot
    from lightning_tda.cli.analyses import log_top_examples
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.datamodels import lds
    from lightning_tda.models import DigitsCNN
    from lightning_tda.sweep import SubsetSweep, read_sweep

    runs = stores["A"]
    dm = DigitsDataModule(n_train=settings.n_train)
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    reporter.section(
        "Attribution (TRAK)",
        f"TRAK scores of {len(val)} validation digits over {len(train)} training digits, from the projected "
        f"gradients (k = {settings.proj_dim}) the GradientRecorder wrote for {len(runs)} models of algorithm A. "
        f"Ground truth: {settings.sweep_models} CNNs trained on random halves of the training set (a subset sweep).",
    )
    trak = TRAK(progress=False).score(runs, train_split="train", test_split="val")
    log_top_examples(reporter, trak, train, val, "trak", rows=4, k=4)
    sweep = SubsetSweep(root / "sweep", model_fn=DigitsCNN, train_dataset=train, eval_datasets={"val": val},
                        num_models=settings.sweep_models, alpha=0.5, seed=settings.seed, models_per_block=min(32, settings.sweep_models),
                        epochs=settings.sweep_epochs, batch_size=32, optimizer="adam", lr=0.01, progress=False)
    masks, margins = read_sweep(sweep.run(), "val")
    values = {"trak": lds(trak, masks, margins)}
    values["grad_dot"] = lds(GradDot(progress=False).score(runs, train_split="train", test_split="val"), masks, margins)
    rows = [[name, r.value, r.ci_low, r.ci_high] for name, r in values.items()]
    reporter.log_table("lds", ["scorer", "lds", "ci_low", "ci_high"], rows)
    if values["trak"].value < values["grad_dot"].value:
        reporter.note(
            "TRAK ranks below Grad-Dot here. TRAK weights each training example by q = 1 - p (its out-to-loss term) "
            "from the attribution models, which were trained on every example and fit them almost perfectly, so q "
            "concentrates on a few examples; the subset models of the ground truth never saw half of them. With more "
            "models and data (benchmarks/RESULTS.md, LDS on digits) TRAK leads."
        )
    metrics = {f"attribution/lds_{name}": r.value for name, r in values.items()}
    reporter.log_metrics(metrics)
    return metrics


def modeldiff_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """ModelDiff of A against B: the training directions that one algorithm's predictions use and
    the other's do not (TRAK over each algorithm's models, a noise floor from halves of each),
    and the counterfactual check: a 1-pixel shift of the test digits moves A's predictions, not
    B's (B was trained on shifts)."""
    from lightning_tda.modeldiff.demo import digits_model_diff

    reporter.section(
        "ModelDiff (A against B)",
        f"Distinguishing training directions of A (no augmentation) and B (random 1-pixel shifts) from TRAK over "
        f"{len(stores['A'])} models each, a noise floor from halves of each algorithm's models, and the "
        "counterfactual check: how a 1-pixel shift of the validation digits moves each algorithm's probability of "
        "the true class.",
    )
    result = digits_model_diff(stores["A"], stores["B"], names=("A", "B"), seed=settings.seed)
    result.log(reporter, "modeldiff")
    return {f"modeldiff/{k}": float(v) for k, v in result.summary().items()}


def modelpred_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """ModelPred data values on a digits subset with 10% flipped labels: a set network predicts
    the logistic-regression model trained on any subset, its Shapley values come from thousands of
    predicted models instead of retrainings, and the lowest values should be the flipped labels."""
    from lightning_tda.modelpred.demo import FAST_SETTINGS, run_demo

    reporter.section(
        "ModelPred data values and cleaning",
        f"ModelPred on {settings.modelpred_n_train} digits (pixels, multinomial logistic regression) with 10% of the "
        "labels flipped: Shapley values from predicted models, and how many flipped labels the lowest values find "
        "(KNN-Shapley and the influence function beside it).",
    )
    fit = FAST_SETTINGS if settings.modelpred_fit == "fast" else MODELPRED_DEMO_FIT
    values, cleaning = run_demo(fast=True, seed=settings.seed, n_train=settings.modelpred_n_train, settings=fit)
    reporter.note(
        "ModelPred's values are only as good as its fit of the set network: the full demo's fit finds most flipped "
        "labels, --fast's smaller one few. KNN-Shapley and the influence function are cheap references; the "
        "ModelPred studies in benchmarks/RESULTS.md compare every peer at 300 examples."
    )
    cleaning.log(reporter, "modelpred_cleaning")
    values.log(reporter, "modelpred_values")
    return {f"modelpred/{k}": float(v) for k, v in cleaning.summary().items()}


def diversity_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """Pairwise error inconsistency and ensemble gains of all the models, grouped by whether a
    pair shares its algorithm (only the seed differs) or not (augmentation differs)."""
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.diversity import diversity_report

    members = [s for name in ALGORITHMS for s in stores[name]]
    names = [f"{name}{m}" for name in ALGORITHMS for m in range(len(stores[name]))]
    descriptions = [{"seed": int(s.manifest["seed"]), "augmentation": ALGORITHMS[s.manifest["algorithm"]]["description"]} for s in members]
    val = DigitsDataModule(n_train=settings.n_train).recording_dataset("val")
    reporter.section("Ensemble diversity", "Which of the models make different mistakes, and what ensembling a pair gains "
                     "(temperature-scaled on half of the validation digits, measured on the other half).")
    report = diversity_report([s.path for s in members], val, held_out=0.5, names=names, descriptions=descriptions)
    report.log(reporter, "diversity")
    summary = report.summary()
    return {f"diversity/{k}": float(v) for k, v in summary.items() if k in ("mean_accuracy", "mean_error_inconsistency", "mean_ensemble_gain_mean", "best_pair_ensemble_accuracy")}


def load_model(store: RunStore) -> torch.nn.Module:
    """The digits classifier of ``store``'s last recorded checkpoint (safetensors, no pickle)."""
    from lightning_tda.models import DigitsCNN, ImageClassifier

    tensors, _ = store.load_checkpoint(store.checkpoint_tags()[-1])
    model = ImageClassifier(DigitsCNN())
    model.load_state_dict(tensors)
    return model.eval()


def dcor_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """Distance correlation between the representations of A's and B's models: the penultimate
    features the MarginRecorder wrote, and every layer against every layer (with the partial
    dCor given the labels: what one model's layer knows about the labels beyond the other's)."""
    from lightning_tda.callbacks.margin_recorder import read_margins
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.dcor import distance_correlation
    from lightning_tda.dcor.layers import compare_layers

    def features(store: RunStore) -> torch.Tensor:
        values, _ = read_margins(store, "val", prefix="embeddings")
        return torch.from_numpy(values[-1]).double()

    a0, a1, b0 = (features(s) for s in (stores["A"][0], stores["A"][1], stores["B"][0]))
    metrics = {
        "dcor/A0_A1_penultimate": float(distance_correlation(a0, a1)),
        "dcor/A0_B0_penultimate": float(distance_correlation(a0, b0)),
    }
    reporter.section("Distance correlation", "dCor between the penultimate features of two seeds of algorithm A, and "
                     "of A against B; then every layer of A's first model against every layer of B's.")
    reporter.log_metrics(metrics)
    val = DigitsDataModule(n_train=settings.n_train).recording_dataset("val")
    layers = compare_layers(load_model(stores["A"][0]), load_model(stores["B"][0]), val, signal="labels")
    layers.log(reporter, "dcor_layers")
    return metrics


def further_training_step(reporter: Reporter, stores: dict[str, list[RunStore]], settings: DemoSettings, root: Path) -> dict[str, float]:
    """The final-model-only gold standard on A's first model: further training with and without
    each of a handful of training digits, and how well gradient methods on that final model
    approximate it as further training grows."""
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.further_training import further_training_check

    dm = DigitsDataModule(n_train=settings.n_train)
    model = load_model(stores["A"][0]).model
    epochs = (1, 2, 4) if settings.n_train is not None else (1, 2, 4, 8)
    reporter.section(
        "Further training",
        f"Sensitivity of {settings.further_training_instances} training digits by further training A's final model "
        f"(with and without each, same batch order, {settings.further_training_seeds} seeds) for {epochs} epochs, "
        "against Grad-Dot, Grad-Cos, projected influence, TRAK and DataInf on the final model.",
    )
    result = further_training_check(
        model, dm.recording_dataset("train"), dm.recording_dataset("val"), fast=True,
        num_instances=settings.further_training_instances, num_test=32, seeds=settings.further_training_seeds,
        epochs=epochs, seed=settings.seed,
    )
    result.log(reporter, "further_training")
    keep = ("grad_dot/cosine_first_K", "grad_dot/cosine_last_K", "trak/cosine_first_K", "trak/cosine_last_K")
    return {f"further_training/{k}": float(v) for k, v in result.summary().items() if k in keep}


Step = Callable[[Reporter, "dict[str, list[RunStore]]", DemoSettings, Path], "dict[str, float]"]
STEPS: list[tuple[str, Step]] = [
    ("attribution", attribution_step),
    ("modeldiff", modeldiff_step),
    ("diversity", diversity_step),
    ("dcor", dcor_step),
    ("further_training", further_training_step),
    ("modelpred", modelpred_step),
]


def demo(out: str = "runs/demo", fast: bool = False, seed: int = 0, wandb: bool = True) -> dict[str, float]:
    """Every capability on the bundled digits, end to end: train two algorithms with the
    recorders, then attribution and LDS, ModelDiff, diversity, dCor, further training and
    ModelPred, into one report (HTML, PNG/CSV) and a W&B run.

    Args:
        out: the demo's directory (stores, report); a fresh or empty directory, or an earlier demo's.
        fast: every step at a smaller size (under 90 s on 2 CPU cores).
        seed: seeds every model, sweep and split.
        wandb: log to a W&B run (offline unless you are logged in).
    """
    target = check_output_dir(out)
    if target.exists() and any(target.iterdir()) and not (target / "demo.json").exists():
        raise ValueError(f"--out {target} is a non-empty directory that holds no earlier demo; give a new directory")
    if (target / "stores").exists():
        import shutil

        shutil.rmtree(target / "stores")  # an earlier demo's runs: every demo trains afresh
    settings = DemoSettings.fast(seed) if fast else DemoSettings.full(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    reporter = make_reporter(target, f"lightning-tda demo ({'fast' if fast else 'full'})", wandb, "demo")
    reporter.section("Demo", "Two learning algorithms on scikit-learn's bundled digits, several CNNs each: A without "
                     "augmentation, B with random 1-pixel shifts. Settings: " + json.dumps(asdict(settings)))
    stores = train_algorithms(target / "stores", settings)
    seconds = {"train": time.perf_counter() - start}
    from lightning_tda.callbacks.margin_recorder import read_margins

    summary: dict[str, float] = {}
    for name in ALGORITHMS:
        accuracy = [float((read_margins(s, "val")[0][-1] > 0).mean()) for s in stores[name]]
        summary[f"accuracy/{name}"] = float(np.mean(accuracy))
    reporter.log_metrics(dict(summary))
    for name, step in tqdm(STEPS, desc="demo: analyses"):
        begin = time.perf_counter()
        summary.update(step(reporter, stores, settings, target / "stores"))
        seconds[name] = time.perf_counter() - begin
    summary.update({f"seconds/{name}": value for name, value in seconds.items()})
    summary["seconds/total"] = time.perf_counter() - start
    reporter.section("Summary")
    reporter.log_metrics({"summary/" + k: v for k, v in summary.items()})
    where = finish(reporter)
    (target / "demo.json").write_text(json.dumps({"settings": asdict(settings), "summary": summary, **where}, indent=2))
    print_summary(summary, where)
    return summary


def print_summary(summary: dict[str, float], where: dict[str, str]) -> None:
    print("\nlightning-tda demo")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        text = "nan" if math.isnan(value) else f"{value:.4g}"
        print(f"  {key:<{width}}  {text}")
    print(f"report:  {where['report']}")
    if "wandb" in where:
        print(f"W&B run: {where['wandb']}")
