"""ModelPred's accuracy figures and the peer comparison (the issue's "Must show" list).

    python benchmarks/modelpred_studies.py                       # all sections (about an hour on 2 cores)
    python benchmarks/modelpred_studies.py --sections shapley    # one section; others come from the cache
    python benchmarks/modelpred_studies.py --quick               # seconds (used by a test)

Sections (each cached as JSON under ``--cache``, so a killed run resumes by section):

- ``accuracy``: relative parameter error and test-accuracy gap of predicted against exactly solved
  models on held-out subsets (fresh permutation prefixes and random-size subsets), for the full
  loss and the ablations without each regulariser (all four trained on the same pairs);
- ``shapley``: on pools of 50, Spearman of ModelPred Shapley values against permutation Shapley
  by exact retraining (many permutations; its split-half Spearman shows its own noise), beside
  TMC Shapley and leave-one-out by scikit-learn retraining;
- ``deletion``: removing 10-50% of the pool: parameter error of ModelPred, the influence
  function, no update and the scikit-learn refit against exact retraining;
- ``cleaning``: 10% flipped labels; precision at the flip rate and wall time of every method.
  ``--peer-settings best|both`` adds each peer at its best setting (grids in
  ``lightning_tda.modelpred.peer_settings``), chosen by precision at the flip rate on a tuning
  problem that the tables never read: split seed ``--tuning-seed`` (1) and flip seed
  ``--tuning-seed`` (the tables: 0 and 0). The tuning is cached as ``peer_tuning_<dataset>.json``,
  the best settings' runs on the reported flips as ``cleaning_best_<dataset>.json`` (a best
  setting equal to the default reuses the default's cached row); ModelPred is not refitted.

Datasets: scikit-learn's digits (pixels / 16, seeded split: 300 train, 300 test) and
breast-cancer (standardised, seeded split: 300 train, 200 test); target: logistic regression
(C = 1). Settings are the defaults (ModelPred's were chosen on other data: a synthetic problem
and another digits split, and its pooling on the tuning splits 1 and 2 of
``benchmarks/modelpred_regularisers.py``; never on these figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, markdown_table, today = _common.machine, _common.markdown_table, _common.today

from lightning_tda.modelpred import (  # noqa: E402
    CleaningResult,
    HeldOutUtility,
    ModelPred,
    ModelPredSettings,
    cleaning_study,
    counterfactual_study,
    exact_utility,
    leave_one_out_values,
    make_target,
    modelpred_shapley,
    permutation_shapley,
    prediction_accuracy,
    sklearn_utility,
)
from lightning_tda.modelpred.baselines import tmc_shapley  # noqa: E402
from lightning_tda.modelpred.cleaning import ALL_METHODS  # noqa: E402
from lightning_tda.modelpred.cleaning import flip_labels  # noqa: E402
from lightning_tda.modelpred.pairs import make_pairs, sample_masks  # noqa: E402
from lightning_tda.modelpred import peer_settings  # noqa: E402

RESULTS = _HERE / "results" / "modelpred_studies.md"
SECTIONS = ("accuracy", "shapley", "deletion", "cleaning")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def split_order(name: str, seed: int = 0) -> np.ndarray:
    """The dataset's row order of a split: the first ``n_train`` rows train, the next ``n_test`` test."""
    from sklearn.datasets import load_breast_cancer, load_digits

    size = len((load_digits() if name == "digits" else load_breast_cancer()).target)
    return np.random.default_rng(seed).permutation(size)


def load_data(name: str, n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The seeded split (seed 0: the reported tables; another seed: the peers' tuning problem)."""
    if name == "digits":
        from lightning_tda.modelpred.demo import digits_split

        return digits_split(n_train, n_test, seed=seed)
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    bc = load_breast_cancer()
    order = split_order(name, seed)
    x = StandardScaler().fit_transform(bc.data)[order]
    y = bc.target[order]
    return x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test]


def classes(dataset: str) -> int:
    return 10 if dataset == "digits" else 2


def cached(cache: Path, name: str, fresh: bool, compute: Callable[[], Any]) -> Any:
    """The JSON result ``name`` under ``cache``, computed and written when missing (or ``fresh``)."""
    path = cache / f"{name}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = compute()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def fitted_model(cache: Path, dataset: str, x: np.ndarray, y: np.ndarray, settings: dict[str, Any], fresh: bool) -> ModelPred:
    """The clean-data ModelPred of a dataset (fitted once, reused by later sections)."""
    path = cache / f"model_{dataset}"
    if (path / "modelpred.json").exists() and not fresh:
        return ModelPred.load(path, x=x, y=y)
    mp = ModelPred.fit(x, y, target="logistic", seed=0, progress=False, num_classes=classes(dataset), **settings)
    mp.save(path)
    return mp


def save_figure(result: Any, path: Path, title: str) -> None:
    """The result's own plot, titled with the dataset, as a PNG beside the cached JSON."""
    fig, ax = result.plot()
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------- sections
def accuracy_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    x, y, xt, yt = load_data(dataset, args.n_train, args.n_test)
    settings = ModelPredSettings(num_classes=classes(dataset), **args.modelpred)
    target = make_target("logistic", x, y, num_classes=classes(dataset))
    start = time.perf_counter()
    cached_model = args.cache / f"model_{dataset}"
    reuse = not args.ablation and (cached_model / "modelpred.json").exists() and not args.fresh
    pairs = validation = None
    if not reuse:
        pairs = make_pairs(target, sample_masks(target.n, settings.num_permutations, settings.prefixes_per_permutation, settings.num_random_subsets, 0))
        half = settings.num_validation_subsets // 2
        validation = make_pairs(target, sample_masks(target.n, max(1, half // 8), 8, settings.num_validation_subsets - 8 * max(1, half // 8), 1_000_003))
    solve_seconds = time.perf_counter() - start if not reuse else float("nan")
    held_out = make_pairs(target, sample_masks(target.n, args.held_out // 16, 8, args.held_out // 2, 999))
    rows = {}
    variants = {"full (global + local)": {}, "without global (KKT)": {"lambda_global": 0.0},
                "without local (utility)": {"lambda_local": 0.0}, "without either": {"lambda_global": 0.0, "lambda_local": 0.0}}
    if not args.ablation:  # the full loss only, from the cached clean-data model when there is one
        variants = {"full (global + local)": {}}
    for label, change in variants.items():
        start = time.perf_counter()
        if reuse:
            mp = ModelPred.load(cached_model, x=x, y=y)
            train_seconds = float("nan")
        else:
            mp = ModelPred.train(target, pairs, validation, dataclasses.replace(settings, **change), progress=False)
            train_seconds = time.perf_counter() - start
        if label.startswith("full"):
            mp.save(cached_model)
        result = prediction_accuracy(mp, held_out.masks, xt, yt, thetas=held_out.thetas, label=label)
        small = result.sizes <= np.median(result.sizes)
        rows[label] = {**result.summary(), "train_seconds": train_seconds, "epochs": len(mp.history),
                       "relative_error_small_half": float(result.relative_errors[small].mean()),
                       "relative_error_large_half": float(result.relative_errors[~small].mean())}
    return {"dataset": dataset, "n": int(target.n), "pairs": len(pairs) if pairs is not None else settings.num_permutations * settings.prefixes_per_permutation + settings.num_random_subsets, "held_out": len(held_out), "solve_seconds": solve_seconds, "variants": rows}


def shapley_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    x, y, xt, yt = load_data(dataset, args.shapley_n, args.n_test)
    start = time.perf_counter()
    path = args.cache / f"model_shapley_{dataset}"  # the fit is kept: a rerun with more reference permutations reuses it
    if (path / "modelpred.json").exists() and (path / "fit_seconds.txt").exists() and not args.fresh:
        mp, fit_seconds = ModelPred.load(path, x=x, y=y), float((path / "fit_seconds.txt").read_text())
    else:
        mp = ModelPred.fit(x, y, target="logistic", seed=0, progress=False, num_classes=classes(dataset), **args.modelpred)
        fit_seconds = time.perf_counter() - start
        mp.save(path)
        (path / "fit_seconds.txt").write_text(f"{fit_seconds}")
    values = modelpred_shapley(mp, xt, yt, num_permutations=args.shapley_permutations, seed=1)
    target = mp.target
    utility = HeldOutUtility(target, xt, yt)
    exact_fn = exact_utility(target, utility)
    truth = permutation_shapley(exact_fn, target.n, utility.empty(), args.truth_permutations, seed=2, method="exact retraining")
    half = args.truth_permutations // 2
    a = permutation_shapley(exact_fn, target.n, utility.empty(), half, seed=3)
    b = permutation_shapley(exact_fn, target.n, utility.empty(), half, seed=4)
    full = float(exact_fn(torch.ones(1, target.n, dtype=torch.bool))[0])
    tmc = tmc_shapley(sklearn_utility(target, utility), target.n, utility.empty(), full, args.tmc_permutations, 0.01, seed=5)
    loo = leave_one_out_values(sklearn_utility(target, utility), target.n, method="leave-one-out (retraining)")

    def rho(v: np.ndarray) -> float:
        return float(spearmanr(v, truth.values)[0])

    return {
        "dataset": dataset, "n": int(target.n), "truth_permutations": args.truth_permutations, "truth_seconds": truth.seconds,
        "truth_split_half_spearman": float(spearmanr(a.values, b.values)[0]),
        "rows": {
            f"ModelPred Shapley ({args.shapley_permutations} permutations)": {"spearman": rho(values.values), "seconds": values.seconds, "fit_seconds": fit_seconds},
            f"TMC Shapley, scikit-learn retraining ({args.tmc_permutations} permutations, tolerance 0.01)": {"spearman": rho(tmc.values), "seconds": tmc.seconds, "fit_seconds": 0.0},
            "leave-one-out, scikit-learn retraining": {"spearman": rho(loo.values), "seconds": loo.seconds, "fit_seconds": 0.0},
        },
    }


def deletion_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    x, y, xt, yt = load_data(dataset, args.n_train, args.n_test)
    mp = fitted_model(args.cache, dataset, x, y, args.modelpred, args.fresh)
    out = {}
    for mode in ("deletion", "addition"):
        fractions = (0.1, 0.2, 0.3, 0.4, 0.5) if mode == "deletion" else (0.1, 0.2, 0.3, 0.4)
        result = counterfactual_study(mp, mode, fractions, args.trials, base_fraction=0.5, x_test=xt, y_test=yt, seed=7)
        save_figure(result, args.cache / f"{mode}_{dataset}.png", f"{mode.capitalize()}: {dataset} (n = {mp.target.n}, {args.trials} trials)")
        out[mode] = {"fractions": list(fractions), "methods": list(result.methods),
                     "errors": result.errors.mean(2).tolist(), "errors_std": result.errors.std(2).tolist(),
                     "accuracy_gaps": np.mean(result.accuracy_gaps, 2).tolist(), "seconds": result.seconds.tolist()}
    return {"dataset": dataset, "n": int(mp.target.n), "trials": args.trials, **out}


def cleaning_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    x, y, xt, yt = load_data(dataset, args.n_train, args.n_test)
    result = cleaning_study(
        x, y, xt, yt, flip_fraction=0.1, target="logistic", num_classes=classes(dataset), shapley_permutations=args.shapley_permutations,
        tmc_permutations=args.tmc_permutations, oob_models=args.oob_models, seed=0, modelpred_settings=args.modelpred,
        methods=args.cleaning_methods or ALL_METHODS,
    )
    return {"dataset": dataset, "n": len(y), "num_flipped": int(result.flipped.sum()), "methods": list(result.methods),
            "precision": result.precision.tolist(), "found": result.found.tolist(), "seconds": result.seconds.tolist(),
            "modelpred_fit_seconds": result.settings["modelpred_fit_seconds"], "tmc_permutations": args.tmc_permutations,
            "shapley_permutations": args.shapley_permutations,
            "values": result.values.tolist(), "flipped": result.flipped.tolist()}


def cleaning_name(dataset: str, methods: list[str] | None) -> str:
    """Cache name of a cleaning run; a run of some methods only (``--cleaning-methods``) is a part."""
    return f"cleaning_{dataset}" + (f"_part_{'+'.join(methods)}" if methods else "")


def merged_cleaning(cache: Path, dataset: str) -> dict[str, Any] | None:
    """The cleaning result of a dataset: the whole run's, or its parts' (same flips) merged."""
    whole = cache / f"{cleaning_name(dataset, None)}.json"
    if whole.exists():
        return json.loads(whole.read_text())
    parts = [json.loads(p.read_text()) for p in sorted(cache.glob(f"cleaning_{dataset}_part_*.json"))]
    if not parts:
        return None
    if any(p["flipped"] != parts[0]["flipped"] for p in parts):
        raise SystemExit(f"the cleaning parts of {dataset} flipped different labels; rerun them with the same settings")
    merged = dict(parts[0])
    for key in ("methods", "precision", "found", "seconds", "values"):
        merged[key] = [v for p in parts for v in p[key]]
    merged["modelpred_fit_seconds"] = next((p["modelpred_fit_seconds"] for p in parts if p["modelpred_fit_seconds"] == p["modelpred_fit_seconds"]), float("nan"))
    merged["tmc_permutations"] = next((p["tmc_permutations"] for p in parts if any("TMC" in m for m in p["methods"])), None)
    return merged


PEERS = ("leave_one_out", "tmc_shapley", "knn_shapley", "data_oob", "data_oob_target", "influence")
REPORTED_SEED = 0  # split and flip seed of the reported cleaning tables


def cleaning_problem(args: argparse.Namespace, dataset: str, seed: int) -> tuple[Any, ...]:
    """The noisy pool of a cleaning problem: split seed = flip seed = ``seed`` (as ``cleaning_study``'s)."""
    from lightning_tda.modelpred.targets import as_features, as_labels

    x, y, xt, yt = load_data(dataset, args.n_train, args.n_test, seed=seed)
    noisy, flipped = flip_labels(y, 0.1, classes(dataset), seed)
    target = make_target("logistic", x, noisy, num_classes=classes(dataset))
    return as_features(x), as_labels(noisy), flipped, target, HeldOutUtility(target, xt, yt)


def peer_tuning_section(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """Each peer's grid on the tuning problem (split and flip seed ``args.tuning_seed``), never the reported one."""
    if args.tuning_seed == REPORTED_SEED:
        raise SystemExit(f"--tuning-seed must differ from the reported tables' seed {REPORTED_SEED}")
    x, noisy, flipped, target, utility = cleaning_problem(args, dataset, args.tuning_seed)
    log = lambda text: print(f"[tuning {dataset}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    tuned = peer_settings.tune_peers(list(PEERS), target, x, noisy, flipped, utility, args.tmc_permutations, args.tuning_seed,
                                     grids=getattr(args, "peer_grids", None), log=log)
    order = split_order(dataset, args.tuning_seed)
    return {"dataset": dataset, "tuning_seed": args.tuning_seed, "split_seed": args.tuning_seed, "flip_seed": args.tuning_seed,
            "train_indices": order[: args.n_train].tolist(), "num_flipped": int(flipped.sum()),
            "tmc_permutations": args.tmc_permutations, "peers": tuned}


def peer_best_section(args: argparse.Namespace, dataset: str, tuning: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """Each peer at its tuned best on the reported problem (seed 0); a best equal to the default
    reuses the default's row from the cached cleaning run when there is one."""
    x, noisy, flipped, target, utility = cleaning_problem(args, dataset, REPORTED_SEED)
    if defaults is not None and (defaults.get("flipped", flipped.tolist()) != flipped.tolist() or defaults["num_flipped"] != int(flipped.sum())):
        raise SystemExit(f"the cached cleaning run of {dataset} flipped other labels than seed {REPORTED_SEED}; rerun it")
    rows = {}
    for method in PEERS:
        best = tuning["peers"][method]["best"]
        row = None
        if defaults is not None and args.reuse_defaults and best == peer_settings.DEFAULTS[method]:
            names = [m for m in defaults["methods"] if method_of(m) == method]
            if names:  # older caches keep no values or flips: their found count is reused (same seeds and code)
                i = defaults["methods"].index(names[0])
                row = {"values": defaults["values"][i] if "values" in defaults else None, "found": defaults["found"][i],
                       "seconds": defaults["seconds"][i], "reused_default": True}
        if row is None:
            r = peer_settings.run_peer(method, best, target, x, noisy, utility, args.tmc_permutations, REPORTED_SEED)
            found = int(flipped[np.argsort(r.values, kind="stable")[: int(flipped.sum())]].sum())
            row = {"values": r.values.tolist(), "found": found, "seconds": r.seconds, "reused_default": False}
            print(f"[best {dataset}] {method} {peer_settings.describe(best)}: {r.seconds:.1f} s", file=sys.stderr, flush=True)
        rows[method] = {**row, "setting": best, "is_default": best == peer_settings.DEFAULTS[method], "precision": row["found"] / int(flipped.sum())}
    return {"dataset": dataset, "tuning_seed": tuning["tuning_seed"], "flipped": flipped.tolist(), "rows": rows}


def method_of(name: str) -> str | None:
    """The method key of a cleaning table's method name (its result's label)."""
    for key, prefix in (("leave_one_out", "leave-one-out"), ("tmc_shapley", "TMC Shapley"), ("knn_shapley", "KNN-Shapley"),
                        ("influence", "influence function")):
        if name.startswith(prefix):
            return key
    if name.startswith("Data-OOB"):
        return "data_oob" if "decision trees" in name else "data_oob_target"
    return None


def cleaning_figure(r: dict[str, Any], cache: Path) -> None:
    if "values" not in r:
        return
    flipped = np.array(r["flipped"], dtype=bool)
    result = CleaningResult(tuple(r["methods"]), np.array(r["values"]), flipped, np.array(r["found"]), np.array(r["seconds"]))
    save_figure(result, cache / f"cleaning_{r['dataset']}.png", f"Cleaning: {r['dataset']}, {int(flipped.sum())} of {r['n']} labels flipped")


# ---------------------------------------------------------------------------------- report
def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = ["## ModelPred: accuracy, Shapley, deletion, cleaning", "",
             f"Command: `python benchmarks/modelpred_studies.py{' --quick' if args.quick else ''}`; machine: {machine()}; date: {today()}. "
             "Accuracy figures do not depend on the machine's load; wall times do (the machine was shared).", ""]
    for r in results.get("accuracy", []):
        lines += [f"### Accuracy of the prediction: {r['dataset']} (pool n = {r['n']}, {r['pairs']} training pairs{' solved in %.0f s' % r['solve_seconds'] if r['solve_seconds'] == r['solve_seconds'] else ''}, {r['held_out']} held-out subsets)", ""]
        rows = [[label, f"{v['relative_error_mean']:.3f}", f"{v['relative_error_median']:.3f}", f"{v['relative_error_small_half']:.3f} / {v['relative_error_large_half']:.3f}",
                 f"{v['accuracy_gap_mean']:.4f}", f"{v['accuracy_exact_mean']:.3f}", f"{v['epochs']} ({v['train_seconds']:.0f} s)" if v["train_seconds"] == v["train_seconds"] else f"{v['epochs']} (cached model)"] for label, v in r["variants"].items()]
        lines += [markdown_table(["loss", "relative parameter error (mean)", "median", "smaller / larger half of subsets", "test-accuracy gap", "exact models' test accuracy", "epochs (time)"], rows), ""]
    for r in results.get("shapley", []):
        lines += [f"### Shapley values against Shapley by retraining: {r['dataset']} (n = {r['n']})", "",
                  f"Reference: permutation Shapley with exact retraining, {r['truth_permutations']} permutations ({r['truth_seconds']:.0f} s); "
                  f"its own split-half Spearman: {r['truth_split_half_spearman']:.3f}.", ""]
        rows = [[label, f"{v['spearman']:.3f}", f"{v['seconds']:.2f} s" + (f" (+ fit {v['fit_seconds']:.0f} s)" if v["fit_seconds"] else "")] for label, v in r["rows"].items()]
        lines += [markdown_table(["method", "Spearman with the reference", "time"], rows), ""]
    for r in results.get("deletion", []):
        for mode in ("deletion", "addition"):
            d = r[mode]
            header = ["method"] + [f"{'-' if mode == 'deletion' else '+'}{int(100 * f)}%" for f in d["fractions"]] + ["time (all trials)"]
            rows = [[m] + [f"{e:.4f}" for e in d["errors"][i]] + [f"{d['seconds'][i]:.2f} s"] for i, m in enumerate(d["methods"])]
            base = "" if mode == "deletion" else " (from a random half of the pool)"
            lines += [f"### {mode.capitalize()}{base}: {r['dataset']} (n = {r['n']}), relative parameter error against exact retraining, mean of {r['trials']} trials", "",
                      markdown_table(header, rows), ""]
    best_of = {b["dataset"]: b for b in results.get("cleaning_best", [])}
    tuning_of = {t["dataset"]: t for t in results.get("peer_tuning", [])}
    for r in results.get("cleaning", []):
        lines += [f"### Cleaning: {r['dataset']} (n = {r['n']}, {r['num_flipped']} labels flipped, 10%)", ""]
        best = best_of.get(r["dataset"])
        rows = []
        fit = r["modelpred_fit_seconds"]
        for m, p, f, s in zip(r["methods"], r["precision"], r["found"], r["seconds"]):
            key = method_of(m)
            time_text = f"{s:.1f} s (fit {fit:.0f} s + {s - fit:.2f} s)" if m.startswith("ModelPred") and fit == fit else f"{s:.1f} s"
            if best is None:
                rows.append([m, f"{p:.3f}", str(f), time_text])
                continue
            rows.append([m, "default" if key else "-", f"{p:.3f}", str(f), time_text])
            if key in best["rows"]:
                b = best["rows"][key]
                same = " (= default; its row reused)" if b["reused_default"] else (" (= default)" if b["is_default"] else "")
                rows.append([f"{m.split(' (')[0]}, tuned best", peer_settings.describe(b["setting"]) + same, f"{b['precision']:.3f}", str(b["found"]), f"{b['seconds']:.1f} s"])
        header = ["method", "precision at the flip rate (= recall)", "flipped found", "wall time"]
        lines += [markdown_table(header if best is None else header[:1] + ["setting"] + header[1:], rows),
                  "", f"Each ModelPred time includes its one fit on the noisy data ({fit:.0f} s), shown apart"
                  + (f"; ModelPred Shapley used {r['shapley_permutations']} permutations" if r.get("shapley_permutations") else "")
                  + (f"; TMC Shapley used {r['tmc_permutations']} permutations." if r.get("tmc_permutations") else "."), ""]
        tuning = tuning_of.get(r["dataset"])
        if tuning is not None:
            lines += [f"How each peer's best setting was chosen ({r['dataset']}): highest precision at the flip rate on a tuning problem the table never reads "
                      f"(split seed {tuning['split_seed']}, flip seed {tuning['flip_seed']}; the table: 0 and 0; {tuning['num_flipped']} flips; "
                      f"TMC at {tuning['tmc_permutations']} permutations, all tolerances from one pass); ties go to the default.", ""]
            rows = [[key, "; ".join(f"{peer_settings.describe(g)}: {p:.3f}" for g, p in zip(t["grid"], t["precision"])) or "no setting of its own",
                     peer_settings.describe(t["best"])] for key, t in tuning["peers"].items()]
            lines += [markdown_table(["peer", "tuning precision per setting", "chosen"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"], choices=["breast-cancer", "digits"])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--shapley-n", type=int, default=50)
    parser.add_argument("--shapley-permutations", type=int, default=1000)
    parser.add_argument("--truth-permutations", type=int, default=400)
    parser.add_argument("--tmc-permutations", type=int, default=50)
    parser.add_argument("--oob-models", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=Path("runs/modelpred_studies"))
    parser.add_argument("--fresh", action="store_true", help="recompute cached sections")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cleaning-methods", nargs="+", default=None, choices=ALL_METHODS,
                        help="cleaning: only these methods, cached as a part (parts with the same flips are merged in the report)")
    parser.add_argument("--peer-settings", choices=["default", "best", "both"], default="default",
                        help="cleaning: the peers at their defaults, at their best setting (tuned on --tuning-seed's problem), or both")
    parser.add_argument("--tuning-seed", type=int, default=1, help="split and flip seed of the peers' tuning problem (not 0, the tables')")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="accuracy: the full loss only (reusing the cached model), not the three ablations")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap ModelPred's training epochs (default: its setting, 300)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file (full mode: {RESULTS})")
    args = parser.parse_args(argv)
    args.modelpred = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    if args.quick:
        args.n_train, args.n_test, args.held_out, args.shapley_n = 40, 30, 32, 8
        args.shapley_permutations, args.truth_permutations, args.tmc_permutations, args.oob_models, args.trials = 20, 8, 3, 10, 2
        args.modelpred = {"num_permutations": 4, "prefixes_per_permutation": 8, "num_random_subsets": 32, "num_validation_subsets": 16,
                          "max_epochs": 2, "hidden": 16, "set_features": 16}
        args.fresh = True
        args.datasets = ["breast-cancer"]
        args.peer_grids = {"data_oob": [{"num_models": 10, "max_features": None}, {"num_models": 10, "max_features": "sqrt"}],
                           "data_oob_target": [{"num_models": 5}, {"num_models": 10}]}
    if args.max_epochs is not None and args.max_epochs < 1:
        raise SystemExit("--max-epochs must be >= 1")
    for name in ("n_train", "n_test", "held_out", "shapley_n", "shapley_permutations", "truth_permutations", "tmc_permutations", "oob_models", "trials"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    args.reuse_defaults = not args.quick and args.oob_models == 1000  # the default rows were made at peer_settings.DEFAULTS
    torch.set_num_threads(args.threads)
    quiet()
    functions = {"accuracy": accuracy_section, "shapley": shapley_section, "deletion": deletion_section, "cleaning": cleaning_section}
    results: dict[str, list[dict[str, Any]]] = {}
    for section in SECTIONS:  # sections not asked for are read from the cache when there
        for dataset in args.datasets:
            name = cleaning_name(dataset, args.cleaning_methods) if section == "cleaning" else f"{section}_{dataset}"
            if section in args.sections and not (section == "cleaning" and args.peer_settings == "best"):
                start = time.perf_counter()
                result = cached(args.cache, name, args.fresh, lambda: functions[section](args, dataset))
                print(f"[{section} {dataset}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            elif args.quick:
                continue
            else:
                path = args.cache / f"{name}.json"
                result = json.loads(path.read_text()) if path.exists() and section != "cleaning" else None
            if section == "cleaning":
                result = merged_cleaning(args.cache, dataset) if not args.quick else result
                if result is not None:
                    cleaning_figure(result, args.cache)
                if section in args.sections and args.peer_settings != "default":
                    tuning = cached(args.cache, f"peer_tuning_{dataset}", args.fresh, lambda: peer_tuning_section(args, dataset))
                    best = cached(args.cache, f"cleaning_best_{dataset}", args.fresh, lambda: peer_best_section(args, dataset, tuning, result))
                    if any(best["rows"][m]["setting"] != tuning["peers"][m]["best"] for m in PEERS):  # the tuning changed: rerun
                        best = cached(args.cache, f"cleaning_best_{dataset}", True, lambda: peer_best_section(args, dataset, tuning, result))
                    results.setdefault("peer_tuning", []).append(tuning)
                    results.setdefault("cleaning_best", []).append(best)
            if result is not None:
                results.setdefault(section, []).append(result)
    text = report(results, args)
    return _common.emit_report(text, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
