"""The seed's finding in our numbers: error inconsistency and ensemble gain by what two models differ in.

Gontijo-Lopes et al. (ICLR 2022) order training methodologies from least to most divergent
(initialisation, hyper-parameters, architecture, framework, data) and find that pairs that diverge
more make more uncorrelated errors and gain more from ensembling. This runs ``examples/diversity.py``
(a digits family of ``--seeds`` models per configuration, trained with the ensemble engine) on
each configuration and tabulates, per category, the mean over pairs with a 95% Student-t interval
of the error inconsistency and the ensemble gains, for all pairs (a pair is labelled by its most
divergent difference) and for the pairs with a base CNN (each differs from the base by one factor).

    python benchmarks/diversity.py --quick     # seconds: a tiny family (what the test runs)
    python benchmarks/diversity.py             # digits (all training examples) and digits with
                                               # 300 training examples: ~10-20 min on 2 busy cores

Each configuration's report is saved under ``--runs`` and reused when present (rerun with
``--fresh`` to train again), so an interrupted run resumes. Accuracy-type figures: they do not
depend on the machine's load. Writes ``benchmarks/results/diversity.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, markdown_table, today  # noqa: E402

from lightning_tda.diversity import DiversityReport  # noqa: E402

CONFIGS = {
    "digits": [],  # the default family: 4 seeds, 30 epochs, all 899 training examples
    "digits, 300 training examples": ["--n-train", "300"],
}
QUICK = {"digits (quick: 2 seeds, 2 epochs)": ["--fast"]}
ORDER = ("seed", "hyperparameters", "architecture", "augmentation", "data")


def _example():
    spec = importlib.util.spec_from_file_location("diversity_example", HERE.parent / "examples" / "diversity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(mean: float, low: float, high: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(low):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def category_table(report: DiversityReport, anchored: bool) -> tuple[str, list[float]]:
    result = report.diversity
    frame = result.category_frame(anchors=result.anchors if anchored else None)
    rows, means = [], []
    for row in frame.to_dict("records"):
        rows.append([
            row["category"], row["pairs"], f"{100 * row['member_accuracy_mean']:.2f}",
            _cell(row["error_inconsistency_mean"], row["error_inconsistency_low"], row["error_inconsistency_high"], 100),
            _cell(row["ensemble_gain_mean_mean"], row["ensemble_gain_mean_low"], row["ensemble_gain_mean_high"], 100),
            _cell(row["ensemble_gain_best_mean"], row["ensemble_gain_best_low"], row["ensemble_gain_best_high"], 100),
            _cell(row["error_consistency_mean"], row["error_consistency_low"], row["error_consistency_high"]),
        ])
        means.append(row["error_inconsistency_mean"])
    header = ["pairs differ by", "pairs", "member accuracy %", "error inconsistency % [95% CI]",
              "gain over mean, points [CI]", "gain over best, points [CI]", "error consistency (kappa) [CI]"]
    return markdown_table(header, rows), means


def reading(report: DiversityReport) -> list[str]:
    """Whether the ordering holds, in words (both views)."""
    lines = []
    for anchored in (False, True):
        frame = report.diversity.category_frame(anchors=report.diversity.anchors if anchored else None)
        by = {r["category"]: r for r in frame.to_dict("records")}
        cats = [c for c in ORDER if c in by]
        ei = [by[c]["error_inconsistency_mean"] for c in cats]
        gain = [by[c]["ensemble_gain_mean_mean"] for c in cats]
        seed_high = by["seed"]["error_inconsistency_high"] if "seed" in by else float("nan")
        above = [c for c in cats[1:] if by[c]["error_inconsistency_low"] > seed_high]
        view = "pairs with a base CNN" if anchored else "all pairs"
        lines.append(
            f"- {view}: error inconsistency by category {', '.join(f'{c} {100 * v:.2f}%' for c, v in zip(cats, ei))}; "
            f"monotone in the seed's order: {'yes' if all(np.diff(ei) > 0) else 'no'}; categories whose interval lies "
            f"above the seed pairs': {', '.join(above) or 'none'}; gain monotone: {'yes' if all(np.diff(gain) > 0) else 'no'}"
        )
    sel = report.selection
    if sel is not None:
        picks = ", ".join(f"{sel.pool_names[m]} (rank {r})" for m, r in zip(sel.members, sel.member_rank))
        lines.append(
            f"- greedy selection (held-out split): {picks}; test accuracy {100 * sel.evaluation_accuracy[0]:.2f}% -> "
            f"{100 * sel.evaluation_accuracy[-1]:.2f}%; picks below the pool's median accuracy: "
            f"{', '.join(sel.low_accuracy_picks()) or 'none'}"
        )
    for o in report.overlaps:
        s = o.summary()
        lines.append(
            f"- overlap {o.names[0]} vs {o.names[1]}: probes best single at {o.total_dim} dims "
            f"{100 * s['probe_best_single_at_total_dim']:.2f}%, best mix {100 * s['probe_best_mix']:.2f}%, concatenation "
            f"{100 * s['probe_concatenation']:.2f}%; dCor {s['distance_correlation']:.3f}, pdCor(a, b | labels) "
            f"{s['partial_dcor_given_labels']:.3f}, pdCor(a, labels | b) {s['partial_dcor_a_labels_given_b']:.3f}, "
            f"pdCor(b, labels | a) {s['partial_dcor_b_labels_given_a']:.3f}, linear CKA {s['linear_cka']:.3f}"
        )
    return lines


def run(configs: dict[str, list[str]], runs: Path, fresh: bool) -> str:
    example = _example()
    sections = []
    for title, argv in configs.items():
        out = runs / title.split(" (")[0].replace(", ", "_").replace(" ", "_")
        if (out / "result" / "result.json").exists() and not fresh:
            report = DiversityReport.load(out / "result")
            print(f"{title}: reusing {out / 'result'}")
        else:
            report = example.main(argv + ["--out", str(out)])
        result = report.diversity
        n_models = result.num_models
        all_table, _ = category_table(report, anchored=False)
        anchored_table, _ = category_table(report, anchored=True)
        sections.append("\n".join([
            f"### {title}: {n_models} models, {len(result.target)} test examples, {result.n_held_out} held-out",
            "",
            f"Command: `python examples/diversity.py {' '.join(argv)}`".rstrip() + " (seeds fixed: split seed 0, model seeds 1000g+s)",
            "",
            "All pairs (a pair is labelled by the most divergent factor it differs in):",
            "",
            all_table,
            "",
            f"Pairs with a base CNN ({', '.join(result.anchors)}): each other model differs from it by one factor group:",
            "",
            anchored_table,
            "",
            *reading(report),
        ]))
    return "\n\n".join(sections) + f"\n\nmachine: {machine()}; date: {today()}\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny family (seconds); does not write the results file")
    parser.add_argument("--runs", type=Path, default=Path("runs/diversity_benchmark"), help="where reports are saved and reused")
    parser.add_argument("--fresh", action="store_true", help="train again even when a saved report exists")
    args = parser.parse_args(argv)
    text = run(QUICK if args.quick else CONFIGS, args.runs, args.fresh or args.quick)
    print(text)
    if not args.quick:
        out = HERE / "results" / "diversity.md"
        out.write_text("# Ensemble diversity: the seed's finding on digits\n\n" + text, encoding="utf-8")
        print(f"wrote {out}")
    return text


if __name__ == "__main__":
    main()
