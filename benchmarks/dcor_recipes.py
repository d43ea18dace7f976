"""The dCor recipes on digits: transfer attacks with and without the diversity penalty, the
layer-by-layer comparison (exactness and speed), and conditioning one model on another.

    python benchmarks/dcor_recipes.py                     # full: 5 seeds per setting (resumable)
    python benchmarks/dcor_recipes.py --section transfer  # one section at a time
    python benchmarks/dcor_recipes.py --quick             # seconds-scale smoke run (a test runs it)

Every (setting, seed) result is saved under ``--cache`` and reused, so a killed run resumes where
it stopped. Seeds: family / run ``s`` uses model seeds ``100 s + i`` (``i`` the model's place),
for ``s`` in ``--seeds``. Accuracy figures do not depend on machine load; the timing rows do
(marked provisional when the machine is shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
# benchmarks/dcor.py is named like the dcor package (the baseline here): keep this folder off the
# import path so that `import dcor` finds the package, and load the shared helpers by file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, markdown_table, spread, today = _common.machine, _common.markdown_table, _common.spread, _common.today

from lightning_tda.data import DigitsDataModule  # noqa: E402
from lightning_tda.dcor import functional as D  # noqa: E402
from lightning_tda.dcor.conditioning import ConditioningResult, condition_on_model  # noqa: E402
from lightning_tda.dcor.layers import compare_layers, demo_layer_comparison, layer_activations  # noqa: E402
from lightning_tda.dcor.attacks import DEFAULT_EPS  # noqa: E402
from lightning_tda.dcor.transfer_attacks import TransferAttackResult, diverse_models_against_transfer_attacks  # noqa: E402

RESULTS = _HERE / "results" / "dcor_recipes.md"


def cached(path: Path, cls, make):
    if (path / "result.json").exists():
        return cls.load(path)
    result = make()
    result.save(path)
    return result


def positive_seeds(result: TransferAttackResult) -> list[str]:
    """Per column: in how many seeds the penalised models beat their twins (mean of the family)."""
    groups, acc = result.group_accuracy()
    gain = acc[:, groups.index("dcor penalty")] - acc[:, groups.index("independent")]
    return [f"{int((gain[:, c] > 0).sum())}/{len(result.seeds)}" for c in range(gain.shape[1])]


def transfer_section(args, cache: Path) -> str:
    out = ["## Transfer attacks: diverse models against FGSM/PGD crafted on the source", ""]
    settings = dict(size=args.size, epochs=args.epochs, eps=args.eps, pgd_steps=args.pgd_steps)
    out.append(
        f"Digits (DigitsCNN, SGD lr 0.05, {args.epochs} epochs on {args.n_train or 1438} images), families of "
        f"{args.size}: M0 the source, M1..M{args.size - 1} each penalised by mean dCor^2 to the frozen earlier "
        "models (L2-normalised penultimate features), twins M1'.. from the same seeds without the penalty. "
        f"Attacks crafted on M0 (L-inf, inputs in [0, 1], PGD {args.pgd_steps} steps of 2.5 eps / steps, random "
        f"start), evaluated on the 359 validation images. Seeds {list(args.seeds)}; accuracy in %, mean ± sd "
        "over seeds (each seed's value is the mean of its family's targets); 'better in' counts the seeds where "
        "the penalised models beat their twins."
    )
    for weight in args.weights:
        results = [
            cached(cache / f"transfer_w{weight}_s{seed}", TransferAttackResult,
                   lambda seed=seed: diverse_models_against_transfer_attacks(
                       datamodule=DigitsDataModule(batch_size=64, n_train=args.n_train), seeds=(seed,),
                       weight=weight, **settings))
            for seed in args.seeds
        ]
        result = TransferAttackResult.stack(results)
        dcor = result.dcor_to_source
        groups = np.array(result.groups)
        pen, ind = dcor[:, groups == "dcor penalty"].mean(1), dcor[:, groups == "independent"].mean(1)
        out += ["", f"### Penalty weight {weight}", "", result.to_markdown()]
        out.append("| better in (seeds) | " + " | ".join(positive_seeds(result)) + " |")
        out += ["", f"dCor of the targets' penultimate features with the source's: penalised "
                f"{pen.mean():.3f} ± {pen.std():.3f}, independent {ind.mean():.3f} ± {ind.std():.3f}."]
    return "\n".join(out)


def layers_section(args) -> str:
    out = ["## Layer-by-layer comparison", ""]
    rows = []
    summaries = []
    for seed in args.seeds:
        start = time.perf_counter()
        result = demo_layer_comparison(fast=args.quick, seed=100 * seed)
        rows.append(time.perf_counter() - start)
        summaries.append(result.summary())
    keys = ["dcor_diagonal_mean", "cka_diagonal_mean", "dcor_last_layers", "cka_last_layers", "dcor_signal_last_a",
            "pdcor_last_a_given_b", "pdcor_last_b_given_a"]
    table = [[k, f"{np.mean([s[k] for s in summaries]):.3f} ± {np.std([s[k] for s in summaries]):.3f}"]
             for k in keys]
    out.append(f"`demo_layer_comparison(fast={args.quick})`: two DigitsCNN from seeds 100 s and 100 s + 1 "
               f"({3 if args.quick else 8} epochs), 8 layers each, 359 validation images, one-hot labels as the "
               f"signal; seeds s in {list(args.seeds)} (mean ± sd). End to end (training included): "
               f"{spread(rows)} s (provisional: machine shared).")
    out += ["", markdown_table(["figure", "value"], table), ""]

    # exactness and speed on one pair of trained models
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    data = datamodule.recording_dataset("val")
    from lightning_tda.dcor._data import fit_quietly
    from lightning_tda.models import DigitsCNN, ImageClassifier

    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = ImageClassifier(DigitsCNN())
        fit_quietly(model, datamodule, 1 if args.quick else 8, seed)
        models.append(model)
    layers = ["model.fc1", "model.fc2"] if args.quick else None  # the dense loop takes minutes on all 8
    same = compare_layers(models[0], models[0], data, layers_a=layers, layers_b=layers, dtype=torch.float64)
    timings = {"joint": [], "dense": [], "dcor": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        blockwise = compare_layers(models[0], models[1], data, layers_a=layers, layers_b=layers, signal="labels",
                                   dtype=torch.float64)
        timings["joint"].append(time.perf_counter() - start)
    acts = [layer_activations(m, data, layers, dtype=torch.float64) for m in models]
    labels = torch.nn.functional.one_hot(data.targets).double()
    for _ in range(1):  # minutes: once
        start = time.perf_counter()
        dense = np.array([[float(D.distance_correlation(a, b, method="dense")) for b in acts[1].values()]
                          for a in acts[0].values()])
        partial = np.array([[float(D.partial_distance_correlation(a, labels, b, method="dense"))
                             for b in acts[1].values()] for a in acts[0].values()])
        timings["dense"].append(time.perf_counter() - start)
    baseline = "not installed" if not args.quick else "skipped (quick)"
    pairs = len(blockwise.layers_a) * len(blockwise.layers_b)
    if importlib.util.find_spec("dcor") is not None and not args.quick:
        import dcor

        torch.set_num_threads(1)  # importing numba resets the OpenMP thread count torch shares
        np_a = [a.numpy() for a in acts[0].values()]
        np_b = [b.numpy() for b in acts[1].values()]
        for _ in range(1):
            start = time.perf_counter()
            theirs = np.array([[dcor.distance_correlation(a, b) for b in np_b] for a in np_a])
            timings["dcor"].append(time.perf_counter() - start)
        baseline = f"{spread(timings['dcor'])} (max abs diff to ours {np.abs(theirs - blockwise.dcor).max():.1e})"
    out.append(f"Exactness and speed (float64, two DigitsCNN trained {1 if args.quick else 8} epochs from seeds 1 "
               f"and 2, {len(blockwise.layers_a)} layers each, 359 validation images):")
    out += ["", markdown_table(["figure", "value"], [
        ["model against itself: max abs(dCor_ii - 1), CKA", f"{np.abs(np.diagonal(same.dcor) - 1).max():.1e}, "
         f"{np.abs(np.diagonal(same.cka) - 1).max():.1e}"],
        ["blockwise joint pass vs dense pairwise dCor: max abs diff", f"{np.abs(blockwise.dcor - dense).max():.1e}"],
        ["blockwise joint pass vs dense pairwise pdCor(A_i, labels; B_j): max abs diff",
         f"{np.abs(blockwise.partial_a_given_b - partial).max():.1e}"],
        [f"time: compare_layers, one blockwise pass ({pairs} dCor + {2 * pairs} pdCor + {pairs} CKA, hooks "
         "included), s", spread(timings["joint"])],
        [f"time: functional dense path pairwise ({pairs} dCor + {pairs} pdCor), s", spread(timings["dense"])],
        [f"time: dcor package pairwise ({pairs} dCor), s", baseline],
    ]), "", f"Timings provisional (machine shared by up to 8 engineers): ours {args.repeats} repeats, the pairwise "
           "loops once, median (min-max)."]
    return "\n".join(out)


def conditioning_section(args, cache: Path) -> str:
    out = ["## Conditioning: B trained on what A does not capture", "",
           f"Digits, DigitsCNN (SGD lr 0.05, {args.epochs} epochs): A trained normally (seed 100 s), B trained with "
           "weight * (1 - semi-partial dCor((B | A), one-hot labels)) on the penultimate features (seed 100 s + 1), "
           f"B' its twin without the term. 359 validation images; seeds s in {list(args.seeds)}, mean ± sd."]
    for weight in args.conditioning_weights:
        results = [
            cached(cache / f"conditioning_w{weight}_s{seed}", ConditioningResult,
                   lambda seed=seed: condition_on_model(
                       datamodule=DigitsDataModule(batch_size=64, n_train=args.n_train), seeds=(seed,),
                       weight=weight, epochs=args.epochs))
            for seed in args.seeds
        ]
        fields = ("accuracy_given", "accuracy", "pdcor_beyond_given", "pdcor_given_beyond", "dcor_to_given",
                  "ensemble_accuracy")
        stacked = ConditioningResult(
            seeds=tuple(s for r in results for s in r.seeds), statistic=results[0].statistic,
            n_examples=results[0].n_examples, settings=results[0].settings,
            **{f: np.concatenate([getattr(r, f) for r in results]) for f in fields})
        diff = stacked.pdcor_beyond_given[:, 0] - stacked.pdcor_beyond_given[:, 1]
        out += ["", f"### Weight {weight}", "", stacked.to_markdown(), "",
                f"R*(B given A, labels) higher for the conditioned B in {int((diff > 0).sum())}/{len(diff)} seeds; "
                f"accuracy of A {stacked.accuracy_given.mean():.3f} ± {stacked.accuracy_given.std():.3f}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--section", choices=["transfer", "layers", "conditioning", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.05, 0.5], help="transfer: penalty weights")
    parser.add_argument("--conditioning-weights", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_dcor_recipes"))
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} (full runs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.size, args.epochs, args.eps, args.pgd_steps, args.n_train = 3, 8, list(DEFAULT_EPS), 40, None
    if args.quick:
        args.seeds, args.weights, args.conditioning_weights = [0], [0.5], [1.0]
        args.size, args.epochs, args.eps, args.pgd_steps, args.n_train, args.repeats = 2, 1, [0.1], 5, 320, 1
    torch.set_num_threads(1)
    where = machine()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    cache = args.cache / ("quick" if args.quick else "full")
    sections = []
    if args.section in ("transfer", "all"):
        sections.append(transfer_section(args, cache))
    if args.section in ("layers", "all"):
        sections.append(layers_section(args))
    if args.section in ("conditioning", "all"):
        sections.append(conditioning_section(args, cache))
    command = "python benchmarks/dcor_recipes.py" + (" --quick" if args.quick else "") + \
        ("" if args.section == "all" else f" --section {args.section}")
    text = "\n\n".join([f"# dCor recipes on digits ({'quick' if args.quick else 'full'})",
                        f"`{command}`; {where}; {today()}.", *sections]) + "\n"
    print(text)
    out = args.out
    if out is None:  # full runs write the results file (a section its own part), quick ones the cache
        name = "dcor_recipes.md" if args.section == "all" else f"dcor_recipes_{args.section}.md"
        out = cache / name if args.quick else RESULTS.with_name(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    main()
