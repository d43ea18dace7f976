"""Leave-one-out replicas per second: batched further training vs sequential Lightning fits.

The work: from a final digits MLP (64-32-32-10), further train for one epoch (23 SGD steps of 64,
lr 0.01, weight decay 5e-4) without each of ``m`` training instances, in seed 0's batch order,
then take the test losses of 100 digits.

- ours: ``further_training_scores`` with the ``m`` leave-one-out runs and the full run as copies
  of one vmapped step (``m / seconds`` replicas per second; the full run is included in ours'
  time, not in the baselines');
- ours in a Trainer: the ``FurtherTraining`` LightningModule, one ``Trainer.fit``;
- baseline: one Lightning ``Trainer.fit`` per instance of an ``ImageClassifier`` wrapping a copy
  of the final MLP, on a ``DataLoader`` with the ``SameOrderBatchSampler`` of that instance (the
  very batches of its copy), then its test losses;
- second baseline: the same sequential runs as plain PyTorch loops (no Lightning), which shows
  how much of the ratio is framework overhead rather than arithmetic.

The baselines' test-loss differences are checked against ours (max abs difference reported).
All sides run in this process, alternating, ``--repeats`` times, at 1 and 2 threads; the ratio is
taken within each repeat.

    python benchmarks/further_training.py            # m = 64 (baselines on 8 of them), 3 repeats
    python benchmarks/further_training.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, markdown_table, ratio_spread, spread, today  # noqa: E402

from lightning_tda.arguments import positive_int  # noqa: E402
from lightning_tda.data import DigitsDataModule  # noqa: E402
from lightning_tda.further_training import (  # noqa: E402
    FurtherTraining,
    SameOrderBatchSampler,
    further_training_scores,
    steps_per_epoch,
)
from lightning_tda.further_training.demo import train_classifier  # noqa: E402
from lightning_tda.models import MLP, ImageClassifier  # noqa: E402

LR, WD, BATCH, SEED = 0.01, 5e-4, 64, 0
RESULTS = Path(__file__).parent / "results" / "further_training.md"


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )


def test_losses(model: nn.Module, test) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(test.dataset.images[test.indices]),
                                           test.dataset.targets[test.indices], reduction="none")


def lightning_run(final: nn.Module, train, test, steps: int, leave_out: int | None) -> torch.Tensor:
    module = ImageClassifier(copy.deepcopy(final), lr=LR, momentum=0.0, weight_decay=WD)
    sampler = SameOrderBatchSampler(len(train), BATCH, SEED, steps, leave_out=leave_out)
    trainer(steps).fit(module, train_dataloaders=DataLoader(train, batch_sampler=sampler))
    return test_losses(module.model, test)


def plain_run(final: nn.Module, train, test, steps: int, leave_out: int | None) -> torch.Tensor:
    model = copy.deepcopy(final).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    for batch in SameOrderBatchSampler(len(train), BATCH, SEED, steps, leave_out=leave_out):
        index = torch.tensor(batch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.images[index]), train.targets[index]).backward()
        opt.step()
    return test_losses(model, test)


def measure(threads: int, final, train, test, instances, baseline_instances, steps, repeats) -> dict:
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"ours": [], "module": [], "lightning": [], "plain": []}
    diffs = {"lightning": 0.0, "plain": 0.0}
    for _ in range(repeats):
        start = time.perf_counter()
        ours = further_training_scores(final, train, test, instances, (steps,), [SEED], lr=LR, batch_size=BATCH,
                                       weight_decay=WD, progress=False)
        times["ours"].append(time.perf_counter() - start)

        start = time.perf_counter()
        module = FurtherTraining(final, train, test, instances, (steps,), [SEED], lr=LR, batch_size=BATCH, weight_decay=WD)
        trainer(module.total_steps).fit(module)
        times["module"].append(time.perf_counter() - start)

        for name, run in (("lightning", lightning_run), ("plain", plain_run)):
            full = run(final, train, test, steps, None)  # untimed: the baselines' full run is free
            start = time.perf_counter()
            losses = [run(final, train, test, steps, int(i)) for i in baseline_instances]
            times[name].append(time.perf_counter() - start)
            ref = torch.stack([loss - full for loss in losses], 1).numpy()
            column = [list(instances).index(i) for i in baseline_instances]
            diffs[name] = max(diffs[name], float(abs(ours.scores[0][:, column] - ref).max()))
    per_replica = {
        "ours": [t / len(instances) for t in times["ours"]],
        "module": [t / len(instances) for t in times["module"]],
        "lightning": [t / len(baseline_instances) for t in times["lightning"]],
        "plain": [t / len(baseline_instances) for t in times["plain"]],
    }
    return {"per_replica": per_replica, "diffs": diffs}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (a test runs it)")
    parser.add_argument("--instances", type=positive_int, default=64, help="leave-one-out replicas batched")
    parser.add_argument("--baseline-instances", type=positive_int, default=8, help="replicas run sequentially")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quiet()
    dm = DigitsDataModule()
    dm.setup()
    train, val = dm.recording_dataset("train"), dm.recording_dataset("val")
    test = Subset(val, list(range(100)))
    torch.manual_seed(0)
    final = train_classifier(MLP(64, 32, 10, depth=3), train, epochs=3 if args.quick else 20)
    steps = 4 if args.quick else steps_per_epoch(len(train), BATCH)  # one epoch: 23 steps
    m, r, repeats = (8, 2, 1) if args.quick else (args.instances, min(args.baseline_instances, args.instances), args.repeats)
    instances = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:m].tolist()
    baseline_instances = instances[:r]

    header = ["figure", "ours", "baseline", "ratio", "median (min-max) ratio", "machine", "date"]
    rows = []
    notes = []
    for threads in args.threads:
        res = measure(threads, final, train, test, instances, baseline_instances, steps, repeats)
        per = res["per_replica"]
        rate = {k: [1.0 / t for t in v] for k, v in per.items()}
        for ours_key, ours_name in (("ours", "further_training_scores"), ("module", "FurtherTraining + Trainer")):
            for base_key, base_name in (("lightning", "sequential Lightning fits"), ("plain", "sequential plain PyTorch loops")):
                ratio, rng = ratio_spread(per[ours_key], per[base_key])
                rows.append([
                    f"LOO replicas / s, {threads} thread{'s' if threads > 1 else ''}: {ours_name} vs {base_name}",
                    f"{statistics.median(rate[ours_key]):.1f}", f"{statistics.median(rate[base_key]):.2f}",
                    f"{ratio:.1f}x", f"{ratio:.1f} ({rng})", machine(), today(),
                ])
        notes.append(
            f"{threads} thread(s): seconds per replica ours {spread(per['ours'])}, FurtherTraining {spread(per['module'])}, "
            f"Lightning {spread(per['lightning'])}, plain {spread(per['plain'])}; max |ours - baseline| test-loss "
            f"difference {res['diffs']['lightning']:.1e} (Lightning), {res['diffs']['plain']:.1e} (plain; 0 = bitwise equal)"
        )
    table = markdown_table(header, rows)
    text = (
        f"{table}\n\n{m} leave-one-out replicas batched (baselines: {r} of them, sequentially), {steps} SGD steps of "
        f"{BATCH} from a final digits MLP 64-32-32-10, test losses of 100 digits; {repeats} repeat(s).\n"
        + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
