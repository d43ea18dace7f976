"""Subcommands that analyse existing RunStores: ``attribute``, ``lds``, ``modeldiff``,
``diversity`` and ``report``. Each opens its stores first (a path that is not a store, stores of
different datasets, a store without what the command needs: an error before anything is
written), then writes a report directory: PNG/CSV files and one HTML page, and a W&B run with
``--wandb true``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from matplotlib.figure import Figure

from lightning_tda import schema
from lightning_tda.cli.datasets import store_dataset
from lightning_tda.cli.output import check_output_dir, finish, make_reporter
from lightning_tda.store import RunStore, check_stores_share_datasets

ScorerName = Literal["trak", "grad_dot", "grad_cos", "tracin", "influence"]


def open_stores(paths: Sequence[str], what: str = "STORE") -> list[RunStore]:
    """Open every store (never creating one); at least one."""
    if not paths:
        raise ValueError(f"give at least one {what}")
    return [RunStore(p) for p in paths]


def check_same_datasets(stores: Sequence[RunStore], splits: Sequence[str]) -> None:
    """Every store recorded ``splits`` on the same datasets, checked before any work starts."""
    check_stores_share_datasets(stores, splits, "give stores recorded on one dataset")


def make_scorer(name: str, progress: bool = True):  # type: ignore[no-untyped-def]
    from lightning_tda.attribution import TRAK, GradCos, GradDot, ProjectedInfluence, TracIn

    scorers = {"trak": TRAK, "grad_dot": GradDot, "grad_cos": GradCos, "tracin": TracIn, "influence": ProjectedInfluence}
    if name not in scorers:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(scorers)}")
    return scorers[name](progress=progress)


def log_top_examples(reporter, scores: np.ndarray, train_ds, test_ds, name: str, rows: int = 6, k: int = 5) -> None:  # type: ignore[no-untyped-def]
    """The ``k`` most helpful and harmful training examples of the first ``rows`` test examples:
    a figure (test image | helpful | harmful) when the images are known, and a long table (one
    row per test example, kind and rank; with image cells) that sorts and filters."""
    from lightning_tda.attribution import example_grid, top_k

    top = top_k(scores, k=min(k, scores.shape[1]))
    n = min(rows, scores.shape[0])
    train_images, test_images = getattr(train_ds, "images", None), getattr(test_ds, "images", None)
    have_images = train_images is not None and test_images is not None
    if have_images:
        fig = example_grid(
            test_images, train_images, top, list(range(n)), k=top.helpful.shape[1],
            test_labels=test_ds.targets.tolist(), train_labels=train_ds.targets.tolist(),
        )
        reporter.log_figure(f"{name}_top_examples", fig)
    table, test_cells, train_cells = [], [], []
    for i in range(n):
        for kind, index, value in (("helpful", top.helpful, top.helpful_scores), ("harmful", top.harmful, top.harmful_scores)):
            for rank in range(index.shape[1]):
                table.append([i, kind, rank + 1, int(index[i, rank]), float(value[i, rank])])
                if have_images:
                    test_cells.append(test_images[i])
                    train_cells.append(train_images[int(index[i, rank])])
    images = {"test_image": test_cells, "train_image": train_cells} if have_images else None
    reporter.log_table(f"{name}_top_examples", ["test", "kind", "rank", "train", "score"], table, images=images)


def attribute(
    stores: list[str],
    scorer: ScorerName = "trak",
    train_split: str = "train",
    test_split: str = "val",
    out: str = "runs/attribute",
    top: int = 5,
    wandb: bool = False,
) -> Path:
    """Attribution scores of recorded runs: every test example's most helpful and harmful
    training examples.

    Reads the projected gradients that GradientRecorder wrote into each STORE (one per training
    run; several are averaged), scores them with --scorer, and writes ``scores.npy``
    ([n_test, n_train]), a table of top examples (with images for the bundled digits) and an
    HTML report to --out.

    Args:
        stores: RunStore paths, one per training run, all recorded on the same datasets.
        scorer: trak, grad_dot, grad_cos, tracin or influence (projected Gauss-Newton).
        train_split: the split whose examples are attributed.
        test_split: the split whose predictions are explained.
        out: report directory.
        top: helpful/harmful training examples shown per test example.
        wandb: also log to a W&B run (offline unless you are logged in).
    """
    from lightning_tda.attribution import self_influence
    from lightning_tda.attribution.features import gradient_records

    runs = open_stores(stores)
    check_same_datasets(runs, [train_split, test_split])
    for store in runs:
        gradient_records(store)  # a clear error for a store without gradients
    target = check_output_dir(out)
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    scores = make_scorer(scorer).score(runs, train_split=train_split, test_split=test_split)
    reporter = make_reporter(target, f"lightning-tda attribute: {scorer}", wandb, f"attribute-{scorer}")
    np.save(target / "scores.npy", scores)
    reporter.section(
        f"Attribution ({scorer})",
        f"{scores.shape[0]} {test_split} examples x {scores.shape[1]} {train_split} examples, "
        f"{len(runs)} run(s): {', '.join(s.path for s in runs)}. Scores in {target / 'scores.npy'}.",
    )
    reporter.log_metrics({"attribute/n_test": scores.shape[0], "attribute/n_train": scores.shape[1], "attribute/runs": len(runs)})
    train_ds = store_dataset(runs[0], train_split, required=False)
    test_ds = store_dataset(runs[0], test_split, required=False)
    log_top_examples(reporter, scores, train_ds, test_ds, scorer, k=top)
    if scorer == "trak":
        flagged = self_influence(runs, split=train_split)
        order = np.argsort(-flagged)[:16]
        reporter.section("Self-influence", "Training examples with the highest TRAK self-influence: likely mislabelled, atypical or memorised.")
        images = getattr(train_ds, "images", None)
        if images is not None:
            labels = getattr(train_ds, "targets").numpy()
            reporter.log_image_grid("self_influence_top", images[order], [f"#{i} y={labels[i]}" for i in order])
        reporter.log_table("self_influence", ["train_index", "self_influence"], [[int(i), float(flagged[i])] for i in order])
    where = finish(reporter)
    print(f"scores: {target / 'scores.npy'}  shape {scores.shape}\nreport: {where['report']}" + (f"\nW&B run: {where['wandb']}" if "wandb" in where else ""))
    return target


attribute.positional = "stores"  # type: ignore[attr-defined]
attribute.positional_help = "RunStore paths, one per training run"  # type: ignore[attr-defined]


def lds_command(
    stores: list[str],
    sweep: str,
    scorers: list[ScorerName] = ["trak", "grad_dot"],  # noqa: B006 (jsonargparse reads the default)
    split: str = "val",
    out: str = "runs/lds",
    wandb: bool = False,
) -> Path:
    """Linear datamodeling score (LDS) of attribution scores against a subset sweep.

    Scores the recorded runs (STORE...) with each of --scorers and correlates their predictions
    with the margins of the sweep's subset models (``lightning-tda sweep`` or SubsetSweep) on
    --split; the stores and the sweep must be of the same datasets.

    Args:
        stores: RunStore paths with projected gradients (GradientRecorder), one per run.
        sweep: the SubsetSweep store (the ground truth).
        scorers: scorers to compare.
        split: the test split, recorded by the stores and the sweep.
        out: report directory.
        wandb: also log to a W&B run.
    """
    from lightning_tda.attribution.features import gradient_records
    from lightning_tda.datamodels import lds
    from lightning_tda.sweep import read_sweep

    runs = open_stores(stores)
    truth = RunStore(sweep)
    if schema.SWEEP not in truth.manifest:
        raise ValueError(f"{truth.path} holds no subset sweep; make one with lightning-tda sweep")
    check_same_datasets([*runs, truth], ["train", split])
    for store in runs:
        gradient_records(store)
    target = check_output_dir(out)
    masks, margins = read_sweep(truth, split)
    if len(masks) < 2:
        raise ValueError(f"the sweep at {truth.path} has {len(masks)} finished models; LDS needs at least 2")
    rows = []
    for name in scorers:
        scores = make_scorer(name).score(runs, train_split="train", test_split=split)
        result = lds(scores, masks, margins)
        rows.append([name, result.value, result.ci_low, result.ci_high])
    reporter = make_reporter(target, "lightning-tda lds", wandb, "lds")
    reporter.section("Linear datamodeling score", f"{len(masks)} subset models of {truth.path}; {len(runs)} run(s) scored.")
    reporter.log_metrics({f"lds/{name}": value for name, value, _, _ in rows})
    reporter.log_table("lds", ["scorer", "lds", "ci_low", "ci_high"], rows)
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    values = [r[1] for r in rows]
    errors = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]])
    ax.bar([r[0] for r in rows], values, yerr=errors, color="#4c72b0", capsize=4)
    ax.set_ylabel("LDS (95% CI)")
    ax.set_title(f"LDS on {split}, {len(masks)} subset models")
    reporter.log_figure("lds", fig)
    where = finish(reporter)
    for name, value, low, high in rows:
        print(f"{name:>9}: LDS {value:.3f} [{low:.3f}, {high:.3f}]")
    print(f"report: {where['report']}")
    return target


lds_command.positional = "stores"  # type: ignore[attr-defined]
lds_command.positional_help = "RunStore paths with projected gradients, one per training run"  # type: ignore[attr-defined]


def diversity_command(
    stores: list[str],
    split: str = "val",
    held_out: float = 0.5,
    out: str = "runs/diversity",
    wandb: bool = False,
) -> Path:
    """Which recorded models make different mistakes, and what ensembling them gains.

    Reads each STORE's logits (MarginRecorder(..., logits=True)) on --split; a --held-out
    fraction of its examples temperature-scales every model; every pair is compared (error
    inconsistency, error consistency, ensemble gain, ...).

    Args:
        stores: RunStore paths (one per model; an ensemble store gives one model per copy).
        split: the evaluation split (its labels come from the bundled dataset it was recorded on).
        held_out: fraction of the split used for temperature scaling and greedy selection.
        out: report directory.
        wandb: also log to a W&B run.
    """
    from lightning_tda.diversity import diversity_report

    runs = open_stores(stores)
    check_same_datasets(runs, [split])
    dataset = store_dataset(runs[0], split)
    target = check_output_dir(out)
    report = diversity_report([s.path for s in runs], dataset, held_out=held_out, split=split)
    reporter = make_reporter(target, "lightning-tda diversity", wandb, "diversity")
    reporter.section("Ensemble diversity", f"{len(runs)} store(s) on {split}")
    report.log(reporter, "diversity")
    where = finish(reporter)
    print(f"report: {where['report']}")
    return target


diversity_command.positional = "stores"  # type: ignore[attr-defined]
diversity_command.positional_help = "RunStore paths recorded with logits"  # type: ignore[attr-defined]


def modeldiff_command(
    a: list[str],
    b: list[str],
    names: list[str] | None = None,
    num: int = 5,
    scorer: ScorerName = "trak",
    train_split: str = "train",
    test_split: str = "val",
    out: str = "runs/modeldiff",
    wandb: bool = False,
) -> Path:
    """How two learning algorithms differ in the training data they use (ModelDiff).

    Scores each algorithm's runs with --scorer (averaged over its STOREs), then finds the
    distinguishing training directions of each: weightings of the training set that one
    algorithm's predictions depend on and the other's do not, with a noise floor from halves of
    each algorithm's models (at least 2 runs each). Writes tables and figures of the directions
    and their top training and test examples (with images for the bundled digits).

    Args:
        a: RunStore paths of algorithm A, one per training run (projected gradients recorded).
        b: RunStore paths of algorithm B, recorded on the same datasets as A's.
        names: the two algorithms' names (default: the stores' algorithm labels, else A and B).
        num: directions per algorithm.
        scorer: the attribution scorer.
        train_split: the split whose examples are attributed.
        test_split: the split whose predictions are explained.
        out: report directory.
        wandb: also log to a W&B run.
    """
    from lightning_tda.attribution.features import gradient_records
    from lightning_tda.modeldiff import compare_algorithms

    runs_a, runs_b = open_stores(a, "--a STORE"), open_stores(b, "--b STORE")
    if len(runs_a) < 2 or len(runs_b) < 2:
        raise ValueError(
            f"ModelDiff's noise floor needs at least 2 runs per algorithm (got {len(runs_a)} for --a and "
            f"{len(runs_b)} for --b); record more runs of each"
        )
    if names is not None and len(names) != 2:
        raise ValueError(f"--names takes two names (A's and B's), got {len(names)}")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    check_same_datasets([*runs_a, *runs_b], [train_split, test_split])
    for store in (*runs_a, *runs_b):
        gradient_records(store)  # a clear error for a store without gradients
    target = check_output_dir(out)
    train = store_dataset(runs_a[0], train_split, required=False)
    test = store_dataset(runs_a[0], test_split, required=False)
    result = compare_algorithms(
        runs_a, runs_b, train, test, names=names, num=num, scorer=make_scorer(scorer),
        train_split=train_split, test_split=test_split,
    )
    reporter = make_reporter(target, "lightning-tda modeldiff", wandb, "modeldiff")
    reporter.section(
        "ModelDiff",
        f"{len(runs_a)} run(s) of A against {len(runs_b)} of B, {scorer} scores of {test_split} over {train_split}.",
    )
    result.log(reporter, "modeldiff")
    where = finish(reporter)
    for key, value in result.summary().items():
        print(f"{key}: {value:.4g}")
    print(f"report: {where['report']}")
    return target


modeldiff_command.several = {  # type: ignore[attr-defined]
    "a": "RunStore paths of algorithm A, one per training run (at least 2)",
    "b": "RunStore paths of algorithm B, recorded on the same datasets (at least 2)",
}


def report(stores: list[str], out: str = "runs/report", wandb: bool = False) -> Path:
    """A report on recorded runs: what each store holds, accuracy and margins over training,
    the hardest examples.

    Args:
        stores: RunStore paths.
        out: report directory.
        wandb: also log to a W&B run.
    """
    from lightning_tda.cli.store_report import log_store

    runs = open_stores(stores)
    target = check_output_dir(out)
    reporter = make_reporter(target, "lightning-tda report", wandb, "report")
    for store in runs:
        log_store(reporter, store)
    where = finish(reporter)
    print(f"report: {where['report']}")
    return target


report.positional = "stores"  # type: ignore[attr-defined]
report.positional_help = "RunStore paths"  # type: ignore[attr-defined]
