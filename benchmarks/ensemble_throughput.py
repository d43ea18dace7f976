"""Models per second: ``EnsembleModule`` (M copies in one fit) vs M sequential Lightning fits.

Subset training as in a datamodels sweep: M = 64 ``DigitsCNN`` copies, each on its own random
``alpha = 0.5`` subset of the digits training split, SGD (lr 0.05, momentum 0.9, weight decay
5e-4), the same number of epochs.

- ours (``--stream per-copy``, the default): one ``EnsembleModule`` fit on per-copy batch
  streams (``per_copy_loader``): at every step copy m takes exactly ``b = alpha * B`` examples of
  its own subset, in its own shuffle, so no example is masked out;
- ours (``--stream shared``): one fit on the full split in shared batches of ``B`` with the masks
  (copy m takes ``n / B`` steps per epoch on about ``alpha * B`` of its examples each, compacted
  and padded to the largest count in the batch);
- baseline: M fits of ``ImageClassifier(DigitsCNN())`` with a new ``Trainer`` each, on the
  masked subset in shuffled batches of ``b = alpha * B`` (the same subsets, batch size and
  number of steps as the ensemble's copies);
- second baseline: the same M trainings as plain PyTorch loops (no Lightning), which shows how
  much of the ratio is framework overhead rather than arithmetic.

Both run in this process on the same data, alternating, ``--repeats`` times; the ratio is taken
within each repeat. Mean validation accuracy of the M models of each side is reported as a check
that both train the same way. ``--quick`` is a seconds-long smoke run (used by a test).

    python benchmarks/ensemble_throughput.py            # full: M=64, 2 epochs, 3 repeats
    python benchmarks/ensemble_throughput.py --quick
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lightning_tda.data import DigitsDataModule
from lightning_tda.ensemble import EnsembleModule, indexed_loader, per_copy_loader, random_subset_masks
from lightning_tda.models import DigitsCNN, ImageClassifier

HP = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
MASK_SEED, STREAM_SEED = 0, 1  # distinct: a loader seed s would replay random_subset_masks(seed=s) rows
RESULTS = Path(__file__).parent / "results" / "ensemble_throughput.md"


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


def subset_batch(args: argparse.Namespace) -> int:
    """The batch size of one copy / one sequential fit: ``alpha * B``."""
    return max(1, round(args.alpha * args.batch_size))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def run_ensemble(train, val, masks, args) -> tuple[float, float]:
    start = time.perf_counter()
    ens = EnsembleModule(DigitsCNN, num_models=len(masks), masks=masks, optimizer="sgd", **HP)
    if args.stream == "per-copy":
        loader = per_copy_loader(train, subset_batch(args), masks, seed=STREAM_SEED, preload=True)
    else:
        loader = indexed_loader(train, args.batch_size, seed=STREAM_SEED)
    trainer(args.epochs).fit(ens, loader)
    seconds = time.perf_counter() - start
    ens.eval()
    with torch.no_grad():
        acc = accuracy(ens(val.images), val.targets)  # mean over copies
    return seconds, acc


def fit_lightning(model: torch.nn.Module, loader: DataLoader, epochs: int) -> torch.nn.Module:
    module = ImageClassifier(model, optimizer="sgd", **HP)
    trainer(epochs).fit(module, loader)
    return module


def fit_plain(model: torch.nn.Module, loader: DataLoader, epochs: int) -> torch.nn.Module:
    """A hand-written PyTorch loop: the same training without Lightning's overhead."""
    opt = torch.optim.SGD(model.parameters(), **HP)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def run_sequential(train, val, masks, args, fit) -> tuple[float, float]:
    """M separate trainings, one after another, each on its subset in batches of alpha * B."""
    batch = subset_batch(args)
    accs = []
    start = time.perf_counter()
    for m, mask in enumerate(masks):
        torch.manual_seed(m)
        subset = Subset(train, mask.nonzero().flatten().tolist())
        model = fit(DigitsCNN(), DataLoader(subset, batch_size=batch, shuffle=True), args.epochs)
        model.eval()
        with torch.no_grad():
            accs.append(accuracy(model(val.images), val.targets))
    return time.perf_counter() - start, sum(accs) / len(accs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--stream", choices=("per-copy", "shared"), default="per-copy",
        help="ensemble batches: per-copy streams of alpha*B, or shared batches of B with masks",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file (full mode: {RESULTS})")
    args = parser.parse_args()
    if args.quick:
        args.models, args.epochs, args.repeats = 2, 1, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet()
    dm = DigitsDataModule(n_train=128 if args.quick else None)
    dm.setup("fit")
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    masks = random_subset_masks(args.models, len(train), args.alpha, seed=MASK_SEED)
    load_before = os.getloadavg()[0]
    ours, base, plain, ratios, plain_ratios, accs = [], [], [], [], [], ([], [], [])
    for _ in range(args.repeats):
        t_ens, acc_ens = run_ensemble(train, val, masks, args)
        t_seq, acc_seq = run_sequential(train, val, masks, args, fit_lightning)
        t_plain, acc_plain = run_sequential(train, val, masks, args, fit_plain)
        ours.append(args.models / t_ens)
        base.append(args.models / t_seq)
        plain.append(args.models / t_plain)
        ratios.append(t_seq / t_ens)
        plain_ratios.append(t_plain / t_ens)
        for acc, value in zip(accs, (acc_ens, acc_seq, acc_plain)):
            acc.append(value)
    load_after = os.getloadavg()[0]
    seconds = [statistics.median(args.models / v for v in side) for side in (ours, base, plain)]
    table = "\n".join([
        f"## Ensemble throughput: M={args.models} DigitsCNN, alpha={args.alpha}, "
        f"{args.epochs} epochs, n_train={len(train)}",
        "",
        "| figure | ours (EnsembleModule) | baseline | ratio |",
        "| --- | --- | --- | --- |",
        f"| models / s vs {args.models} sequential Lightning fits, median [min-max] of "
        f"{args.repeats} | {spread(ours, '.3f')} | {spread(base, '.3f')} | {spread(ratios, '.2f')}x |",
        f"| models / s vs {args.models} sequential plain PyTorch loops (no Lightning) | "
        f"{spread(ours, '.3f')} | {spread(plain, '.3f')} | {spread(plain_ratios, '.2f')}x |",
        f"| seconds for {args.models} models (ours / Lightning fits / plain loops) | "
        f"{seconds[0]:.1f} | {seconds[1]:.1f} / {seconds[2]:.1f} | |",
        f"| mean val accuracy of the models (ours / Lightning fits / plain loops) | "
        f"{statistics.mean(accs[0]):.3f} | {statistics.mean(accs[1]):.3f} / "
        f"{statistics.mean(accs[2]):.3f} | |",
        "",
        f"- machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs; load average {load_before:.1f} before, {load_after:.1f} after",
        f"- torch {torch.__version__}, lightning {L.__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        (f"- per-copy streams: each copy and each sequential fit takes batches of "
         f"{subset_batch(args)} from its own subset, the same steps"
         if args.stream == "per-copy" else
         f"- shared stream: batch {args.batch_size} (ensemble, full split with masks) vs "
         f"{subset_batch(args)} (each sequential fit, its subset): the same steps per epoch")
        + "; each sequential fit builds its own Trainer, as a sweep script would",
        f"- command: `python benchmarks/ensemble_throughput.py"
        f"{' --quick' if args.quick else ''} --models {args.models} --epochs {args.epochs} "
        f"--repeats {args.repeats}{'' if args.threads is None else f' --threads {args.threads}'}"
        f"{'' if args.stream == 'per-copy' else ' --stream shared'}`",
        "",
    ])
    print(table)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    return table


if __name__ == "__main__":
    main()
