"""Diverse models by distance decorrelation, on digits (the recipe of Zhen et al., ECCV 2022).

1. Model A is trained normally.
2. Model B is trained with ``DistanceCorrelationPenalty.diverse_from``: its loss gets
   ``weight * dCor^2(features_B, features_A)`` with A frozen (features of the penultimate layer,
   L2-normalised; weight 0.05 by default, the seed's value).
3. Model C is B without the penalty: same seed, same data order, weight 0, the "two
   independently trained models" baseline together with A.

Reported on the validation split: accuracy of A, B and C; dCor(A, B) (with the penalty) and
dCor(A, C) (without); and the accuracy of the two-model ensembles A+B and A+C (mean of the
softmax probabilities).

    python examples/dcor_diverse_models.py                # ~1 minute on a laptop CPU
    python examples/dcor_diverse_models.py --quick        # seconds (what the test runs)
    python examples/dcor_diverse_models.py --weight 0.5 --seed 1 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_tda.arguments import non_negative_float, positive_float, positive_int
from lightning_tda.data import DigitsDataModule
from lightning_tda.dcor import DistanceCorrelation, DistanceCorrelationPenalty
from lightning_tda.models import DigitsCNN, ImageClassifier

def new_directory_parent(text: str) -> str:
    """An output file whose directory exists."""
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory of {text} does not exist")
    return text


LAYER = "model.relu"  # the 64-d penultimate features of DigitsCNN (after fc1 and its ReLU)


def train(module: L.LightningModule, datamodule: DigitsDataModule, epochs: int, seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        limit_val_batches=0,  # evaluated once at the end instead
    )
    trainer.fit(module, datamodule=datamodule)


def make_model(seed: int, lr: float) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(DigitsCNN(), lr=lr)


@torch.no_grad()
def features_and_probs(model: nn.Module, loader, layer: str = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and softmax probabilities of ``model`` over ``loader``."""
    model.eval()
    feats: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: feats.append(out))
    try:
        probs = torch.cat([torch.softmax(model(x), 1) for x, _ in loader])
    finally:
        handle.remove()
    return torch.cat(feats), probs


def run(
    epochs: int = 8, weight: float = 0.05, lr: float = 0.05, n_train: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Train A (seed ``seed``), then B with the penalty and C without (both seed ``seed + 1``)."""
    datamodule = DigitsDataModule(batch_size=64, n_train=n_train)
    datamodule.setup()
    labels = torch.cat([y for _, y in datamodule.val_dataloader()])

    model_a = make_model(seed, lr)
    train(model_a, datamodule, epochs, seed=seed)

    model_b = make_model(seed + 1, lr)
    wrapped = DistanceCorrelationPenalty.diverse_from(model_b, earlier=model_a, layer=LAYER, weight=weight)
    train(wrapped, datamodule, epochs, seed=seed + 1)

    model_c = make_model(seed + 1, lr)
    train(model_c, datamodule, epochs, seed=seed + 1)

    val = datamodule.val_dataloader()
    out = {name: features_and_probs(m, val) for name, m in (("A", model_a), ("B", model_b), ("C", model_c))}

    def accuracy(probs: torch.Tensor) -> float:
        return float((probs.argmax(1) == labels).float().mean())

    def dcor(p: str, q: str) -> float:
        metric = DistanceCorrelation()
        metric.update(out[p][0], out[q][0])
        return float(metric.compute())

    return {
        "epochs": epochs,
        "weight": weight,
        "seed": seed,
        "n_val": int(labels.numel()),
        "accuracy": {name: accuracy(probs) for name, (_, probs) in out.items()},
        "dcor": {"A,B (penalty)": dcor("A", "B"), "A,C (no penalty)": dcor("A", "C")},
        "ensemble_accuracy": {
            "A+B (penalty)": accuracy((out["A"][1] + out["B"][1]) / 2),
            "A+C (independent)": accuracy((out["A"][1] + out["C"][1]) / 2),
        },
    }


def report(result: dict[str, Any]) -> str:
    acc, dc, ens = result["accuracy"], result["dcor"], result["ensemble_accuracy"]
    rows = [
        "| figure | with dCor penalty (B) | without (C) |",
        "| --- | --- | --- |",
        f"| accuracy of A | {acc['A']:.4f} | {acc['A']:.4f} |",
        f"| accuracy of the second model | {acc['B']:.4f} | {acc['C']:.4f} |",
        f"| dCor(A, second model), val features | {dc['A,B (penalty)']:.4f} | {dc['A,C (no penalty)']:.4f} |",
        f"| ensemble accuracy A + second | {ens['A+B (penalty)']:.4f} | {ens['A+C (independent)']:.4f} |",
    ]
    head = (
        f"digits, {result['epochs']} epochs, penalty weight {result['weight']}, seed {result['seed']}, "
        f"{result['n_val']} validation examples"
    )
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=8, help="training epochs per model (>= 1)")
    parser.add_argument("--weight", type=non_negative_float, default=0.05, help="penalty weight (seed: 0.05)")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="A trains with this seed, B and C with seed + 1")
    parser.add_argument("--quick", "--fast", action="store_true", help="2 epochs on 320 training examples")
    parser.add_argument("--out", type=new_directory_parent, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    epochs, n_train = (2, 320) if args.quick else (args.epochs, None)
    result = run(epochs=epochs, weight=args.weight, lr=args.lr, n_train=n_train, seed=args.seed)
    print(report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
