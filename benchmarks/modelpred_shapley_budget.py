"""ModelPred Shapley against TMC Shapley by retraining, budget by budget: what each finds for its time.

    python benchmarks/modelpred_shapley_budget.py                     # both datasets, alone (about 25 min)
    python benchmarks/modelpred_shapley_budget.py --quick             # seconds (used by a test)
    python benchmarks/modelpred_shapley_budget.py --report-only --out benchmarks/results/modelpred_shapley_budget.md

Issue #14's target reads "ModelPred Shapley at least matches Shapley by retraining at >= 100x
less time". One valuation each, at one permutation count each, cannot answer it: a Monte-Carlo
Shapley estimate gets better with its permutation count, and the two methods pay very different
prices per permutation (ModelPred one batched prediction, TMC a retraining per prefix until it
truncates). So both are run over a grid of permutation counts fixed before any run, on the
cleaning study's reported problem (split seed 0, 10% of the labels flipped with seed 0,
permutation seed 0, TMC at its default truncation tolerance 0.01): the same problem as the
cleaning table of ``modelpred_studies.py``.

For each budget: precision at the flip rate (the cleaning table's figure) and the ROC AUC of the
values for telling flipped from clean labels (every rank counts, so it moves less from one flip
to the next), and the wall time. TMC's budgets come from one run of the largest (each budget's
estimate is the first ``b`` orderings', with the time spent until then; equal to a separate run,
tested); ModelPred's are separate calls on one fit. ModelPred runs two estimators, both decided
before any figure was seen: plain permutation sampling (``modelpred_shapley``'s default) and the
TMC estimator itself, TMC's truncation rule at TMC's default tolerance 0.01 applied to the
predicted utilities (no tolerance was tried on this problem). The second compares the utilities
alone: same estimator, predicted against retrained models. Then, for each TMC budget, the
cheapest budget of each ModelPred estimator on the grid that at least matches TMC's precision
*and* AUC, and the time ratio after the one-time fit and counting it.

Wall times need the machine to itself; everything runs on one thread. The fit and each result
are cached under ``--cache``: a rerun reads them back.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, markdown_table, today = _common.machine, _common.markdown_table, _common.today

from lightning_tda.modelpred import ModelPred, exact_utility, modelpred_shapley, sklearn_utility  # noqa: E402
from lightning_tda.modelpred.baselines import tmc_shapley_budgets  # noqa: E402
from lightning_tda.modelpred.cleaning import precision_at_flip_rate  # noqa: E402

RESULTS = _HERE / "results" / "modelpred_shapley_budget.md"
FIGURE = _HERE / "results" / "modelpred_shapley_budget.png"
SEED = 0  # the cleaning table's split, flip and permutation seed
TMC_BUDGETS = [10, 20, 50, 100, 200]
MODELPRED_BUDGETS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
TOLERANCE = 0.01  # TMC's default truncation tolerance (peer_settings.DEFAULTS), for both TMCs
VARIANTS = {"modelpred": ("ModelPred Shapley", 0.0), "modelpred_tmc": (f"ModelPred TMC Shapley (tolerance {TOLERANCE:g})", TOLERANCE)}


def roc_auc(values: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of low values for flipped labels (0.5: chance; 1: every flipped label below every clean one)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, -np.asarray(values)))


def scored(values: np.ndarray, flipped: np.ndarray, budget: int, seconds: float) -> dict[str, Any]:
    return {"budget": budget, "precision": precision_at_flip_rate(values, flipped), "auc": roc_auc(values, flipped), "seconds": seconds}


def run_dataset(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    studies = _common.load_benchmark("modelpred_studies")
    problem = argparse.Namespace(n_train=args.n_train, n_test=args.n_test)
    x, noisy, flipped, target, utility = studies.cleaning_problem(problem, dataset, SEED)
    cache = args.cache / dataset
    cache.mkdir(parents=True, exist_ok=True)
    fit_file = cache / "fit.json"
    if fit_file.exists() and not args.fresh:
        mp = ModelPred.load(cache / "model", x=x, y=noisy)
        fit_seconds = json.loads(fit_file.read_text())["seconds"]
    else:
        start = time.perf_counter()
        mp = ModelPred.fit(x, noisy, target="logistic", seed=SEED, progress=False, num_classes=studies.classes(dataset), **args.modelpred)
        fit_seconds = time.perf_counter() - start
        mp.save(cache / "model")
        fit_file.write_text(json.dumps({"seconds": fit_seconds}))
    print(f"[{dataset}] ModelPred fit: {fit_seconds:.1f} s", file=sys.stderr, flush=True)

    def modelpred_rows(label: str, tolerance: float) -> list[dict[str, Any]]:
        rows = []
        for b in args.modelpred_budgets:
            r = modelpred_shapley(mp, utility.x, utility.y, b, SEED, truncation_tolerance=tolerance)
            rows.append(scored(r.values, flipped, b, r.seconds))
            print(f"[{dataset}] {label}, {b} permutations: {r.seconds:.2f} s", file=sys.stderr, flush=True)
        return rows

    def tmc_rows() -> list[dict[str, Any]]:
        full = float(exact_utility(target, utility)(np.ones((1, target.n), dtype=bool))[0])
        runs = tmc_shapley_budgets(sklearn_utility(target, utility), target.n, utility.empty(), full, args.tmc_budgets, TOLERANCE, SEED, progress=False)
        print(f"[{dataset}] TMC Shapley, {max(args.tmc_budgets)} permutations: {runs[-1].seconds:.1f} s", file=sys.stderr, flush=True)
        return [scored(r.values, flipped, b, r.seconds) for b, r in zip(args.tmc_budgets, runs)]

    variants = {label: studies.cached(cache, key, args.fresh, lambda label=label, tolerance=tolerance: modelpred_rows(label, tolerance))
                for key, (label, tolerance) in VARIANTS.items()}
    return {"dataset": dataset, "n": int(target.n), "num_flipped": int(flipped.sum()), "fit_seconds": fit_seconds,
            "variants": variants, "tmc": studies.cached(cache, "tmc", args.fresh, tmc_rows)}


def matches(r: dict[str, Any], variant: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each TMC budget, the cheapest budget of one ModelPred estimator at least as good on both figures."""
    out = []
    for t in r["tmc"]:
        good = [m for m in variant if m["precision"] >= t["precision"] and m["auc"] >= t["auc"]]
        best = min(good, key=lambda m: m["seconds"]) if good else None
        out.append({"tmc": t, "modelpred": best, "after_fit": t["seconds"] / best["seconds"] if best else None,
                    "with_fit": t["seconds"] / (r["fit_seconds"] + best["seconds"]) if best else None})
    return out


def match_row(label: str, m: dict[str, Any]) -> list[Any]:
    t, b = m["tmc"], m["modelpred"]
    if b is None:
        return [label, t["budget"], f"{t['precision']:.3f} / {t['auc']:.3f}", f"{t['seconds']:.1f} s", "none on the grid", "-", "-", "-", "-"]
    with_fit = f"{m['with_fit']:.2f}x" if m["with_fit"] < 10 else f"{m['with_fit']:.0f}x"
    return [label, t["budget"], f"{t['precision']:.3f} / {t['auc']:.3f}", f"{t['seconds']:.1f} s", b["budget"], f"{b['precision']:.3f} / {b['auc']:.3f}",
            f"{b['seconds']:.2f} s", f"{m['after_fit']:.0f}x", with_fit]


def figure(results: list[dict[str, Any]], path: Path) -> None:
    """Precision and AUC against wall time, one column per dataset; ModelPred's one-time fit is the
    grey line (a ModelPred point counts the fit when moved right by that much)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(results), 8.0))
    axes = fig.subplots(2, len(results), squeeze=False)
    for col, r in enumerate(results):
        for row, (key, ylabel) in enumerate((("precision", "precision at the flip rate"), ("auc", "ROC AUC, flipped against clean"))):
            ax = axes[row, col]
            tmc = r["tmc"]
            ax.plot([t["seconds"] for t in tmc], [t[key] for t in tmc], "o-", color="C3", label="TMC Shapley (retraining)")
            for t in tmc:
                ax.annotate(str(t["budget"]), (t["seconds"], t[key]), textcoords="offset points", xytext=(3, -10), fontsize=7, color="C3")
            for (label, mp), color, marker in zip(r["variants"].items(), ("C0", "C2"), ("s", "^")):
                ax.plot([m["seconds"] for m in mp], [m[key] for m in mp], marker + "-", color=color, label=f"{label}, after the fit")
                for m in mp:
                    ax.annotate(str(m["budget"]), (m["seconds"], m[key]), textcoords="offset points", xytext=(3, 4), fontsize=6, color=color)
            ax.axvline(r["fit_seconds"], color="grey", ls="--", lw=1, label="ModelPred's one-time fit")
            ax.set_xscale("log")
            ax.set_xlabel("wall time (s, log scale; numbers: permutations)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{r['dataset']}: n = {r['n']}, {r['num_flipped']} labels flipped, fit {r['fit_seconds']:.0f} s")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["## ModelPred Shapley against TMC Shapley, budget by budget", "",
             f"Command: `python benchmarks/modelpred_shapley_budget.py{' --quick' if args.quick else ''}`; split, flip and permutation seed {SEED} "
             f"(the cleaning table's problem); truncation tolerance {TOLERANCE:g} (TMC's default) for both TMC estimators; one thread; machine: {machine()}; date: {today()}.", ""]
    for r in results:
        lines += [f"### {r['dataset']} (n = {r['n']}, {r['num_flipped']} labels flipped; ModelPred's one fit: {r['fit_seconds']:.1f} s)", ""]
        rows = [["TMC Shapley (retraining)", t["budget"], f"{t['precision']:.3f}", f"{t['auc']:.3f}", f"{t['seconds']:.2f} s", "-"] for t in r["tmc"]]
        rows += [[label, m["budget"], f"{m['precision']:.3f}", f"{m['auc']:.3f}", f"{m['seconds']:.2f} s", f"{r['fit_seconds'] + m['seconds']:.1f} s"]
                 for label, variant in r["variants"].items() for m in variant]
        lines += [markdown_table(["method", "permutations", "precision at the flip rate", "ROC AUC", "time (after the fit)", "time counting the fit"], rows), ""]
        rows = [match_row(label, m) for label, variant in r["variants"].items() for m in matches(r, variant)]
        lines += ["The cheapest ModelPred budget that matches each TMC budget on both figures (TMC time / ModelPred time; "
                  "above 1x ModelPred is faster):", "",
                  markdown_table(["ModelPred estimator", "TMC permutations", "TMC precision / AUC", "TMC time", "ModelPred permutations", "ModelPred precision / AUC",
                                  "ModelPred time", "speed-up after the fit", "speed-up counting the fit"], rows), ""]
    if results:
        lines += [f"![ModelPred Shapley against TMC Shapley, budget by budget]({'results/' + args.figure.name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"], choices=["breast-cancer", "digits"])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--tmc-budgets", type=int, nargs="+", default=TMC_BUDGETS)
    parser.add_argument("--modelpred-budgets", type=int, nargs="+", default=MODELPRED_BUDGETS)
    parser.add_argument("--cache", type=Path, default=Path("runs/modelpred_shapley_budget"))
    parser.add_argument("--fresh", action="store_true", help="recompute what is cached")
    parser.add_argument("--report-only", action="store_true", help="only the cached datasets; compute nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file (full mode: {RESULTS})")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args(argv)
    args.modelpred = {}
    if args.quick:
        args.n_train, args.n_test = 40, 30
        args.tmc_budgets, args.modelpred_budgets = [2, 4], [2, 5, 20]
        args.modelpred = {"num_permutations": 4, "prefixes_per_permutation": 8, "num_random_subsets": 32, "num_validation_subsets": 16,
                          "max_epochs": 2, "hidden": 16, "set_features": 16}
        args.datasets = ["breast-cancer"]
    if min(args.tmc_budgets + args.modelpred_budgets) < 1:
        raise SystemExit("every budget must be >= 1 permutation")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = []
    for dataset in args.datasets:
        if args.report_only and not all((args.cache / dataset / f).exists() for f in ("fit.json", "tmc.json", *(f"{key}.json" for key in VARIANTS))):
            continue
        results.append(run_dataset(args, dataset))
    if results:
        figure(results, args.figure)
    text = report(results, args)
    return _common.emit_report(text, args.out)


if __name__ == "__main__":
    main()
