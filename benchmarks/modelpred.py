"""ModelPred: time per utility evaluation, ModelPred against a scikit-learn refit and against our
batched exact solver, as ratios measured in one run.

    python benchmarks/modelpred.py                  # full (a few minutes on 2 CPU cores)
    python benchmarks/modelpred.py --quick          # seconds (used by a test)
    python benchmarks/modelpred.py --out benchmarks/results/modelpred.md

A utility evaluation is :math:`U(S) = -` test loss of the model trained on subset :math:`S`: the
model (predicted, refitted or solved) and its mean test loss. Per dataset and target:

- **ModelPred**: ``predict_params`` of all subsets in one call, then the batched test loss
  (the set network has the default architecture; its training is not timed here and its
  weights do not change the time: the one-time fit is in the cleaning tables of
  ``benchmarks/modelpred_studies.py``, where each ModelPred time includes it);
- **scikit-learn refit**: ``LogisticRegression`` / ``LinearSVC`` (``fit_intercept=False`` on
  ``[x, 1]``: the target's objective) fitted per subset at scikit-learn's default tolerance,
  then the same test loss;
- **our batched exact solver**: ``Target.solve`` on all subsets at once (to
  ``||theta - theta*|| <= 1e-6``), then the same test loss.

Subsets are random with uniform random sizes. Methods are interleaved repeat by repeat; each
ratio is the median of per-repeat ratios (baseline / ModelPred) with its min-max. Target (the
issue): ModelPred at least 100x faster than the scikit-learn refit.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, markdown_table, ratio_spread, spread, today = _common.machine, _common.markdown_table, _common.ratio_spread, _common.spread, _common.today

from lightning_tda.modelpred import HeldOutUtility, ModelPred  # noqa: E402
from lightning_tda.modelpred.pairs import random_size_masks  # noqa: E402
from lightning_tda.modelpred.utility import sklearn_fit  # noqa: E402

RESULTS = _HERE / "results" / "modelpred.md"


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def datasets(n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, ...]]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    from lightning_tda.modelpred.demo import digits_split

    out = {"digits (64 pixels, 10 classes)": digits_split(n_train, n_test, seed=0)}
    bc = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(bc.target))
    x = StandardScaler().fit_transform(bc.data)[order]
    y = bc.target[order]
    out["breast-cancer (30 features, 2 classes)"] = (x[:n_train], y[:n_train], x[n_train : n_train + n_test], y[n_train : n_train + n_test])
    return out


def run(args: argparse.Namespace) -> str:
    quiet()
    rows = []
    load_before = os.getloadavg()[0]
    for name, (x, y, xt, yt) in datasets(args.n_train, args.n_test).items():
        for target in args.targets:
            mp = ModelPred.fit(x, y, target=target, progress=False, num_permutations=0, num_random_subsets=64, num_validation_subsets=16, max_epochs=1)
            utility = HeldOutUtility(mp.target, xt, yt)
            rng = np.random.default_rng(1)
            masks = random_size_masks(len(y), args.subsets, rng, min_size=2)
            # scikit-learn needs every class in a subset: keep one example of each class in each
            for c in np.unique(y):
                masks[:, np.flatnonzero(y == c)[0]] = True
            t_mp, t_sk, t_ex = [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                utility(mp.predict_params(masks))
                t_mp.append((time.perf_counter() - start) / len(masks))
                start = time.perf_counter()
                utility(torch.stack([sklearn_fit(mp.target, m) for m in masks[: args.sklearn_subsets]]))
                t_sk.append((time.perf_counter() - start) / args.sklearn_subsets)
                start = time.perf_counter()
                utility(mp.solve(masks[: args.exact_subsets]))
                t_ex.append((time.perf_counter() - start) / args.exact_subsets)
            label = f"{name}, {target}, n={len(y)}, P={mp.target.num_params}"
            r_sk, s_sk = ratio_spread(t_mp, t_sk)
            r_ex, s_ex = ratio_spread(t_mp, t_ex)
            met = "met" if r_sk >= 100 else "NOT met"
            rows.append([label, "scikit-learn refit", f"{spread(t_mp)} s", f"{spread(t_sk)} s", f"{r_sk:.0f}x", s_sk, f">= 100x: {met}"])
            rows.append([label, "our batched exact solver", f"{spread(t_mp)} s", f"{spread(t_ex)} s", f"{r_ex:.0f}x", s_ex, ""])
    load_after = os.getloadavg()[0]
    header = ["setting", "baseline", "ModelPred per evaluation", "baseline per evaluation", "speed-up (median)", "min-max", "target"]
    command = "python benchmarks/modelpred.py" + (" --quick" if args.quick else "")
    lines = [
        "## ModelPred: time per utility evaluation",
        "",
        f"Command: `{command}`; {args.repeats} interleaved repeats; ModelPred over {args.subsets} subsets in one call, "
        f"scikit-learn over {args.sklearn_subsets}, the exact solver over {args.exact_subsets}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after.",
        "",
        markdown_table(header, rows),
        "",
        f"machine: {machine()}; date: {today()}; torch {torch.__version__}",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--subsets", type=int, default=512, help="subsets ModelPred evaluates per repeat")
    parser.add_argument("--sklearn-subsets", type=int, default=32)
    parser.add_argument("--exact-subsets", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets", nargs="+", default=["logistic", "svm"], choices=["logistic", "svm"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file (full mode: {RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.subsets, args.sklearn_subsets, args.exact_subsets, args.repeats = 60, 40, 32, 4, 4, 1
        args.targets = ["logistic"]
    for name in ("n_train", "n_test", "subsets", "sklearn_subsets", "exact_subsets", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.sklearn_subsets > args.subsets or args.exact_subsets > args.subsets:
        raise SystemExit("--sklearn-subsets and --exact-subsets must be <= --subsets")
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
