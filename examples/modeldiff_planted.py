"""ModelDiff on a known answer: a planted feature that only one algorithm can use.

The feature is a bright 2x2 square in the top-left corner, where digits are blank. It is planted
in a subset of one class (``--planted-class``, 4 by default): ``--planted`` (40) training images
of other digits get the square and the label of that class, so for them the square is the only
evidence of their label (a backdoor). In the test set, the square is pasted into a random 40% of
the images, whose labels stay as they are.

- Algorithm A (``plain``) trains on the training set as it is: the square predicts the class.
- Algorithm B (``corner-augmented``) trains with an augmentation that redraws the corner of every
  training image it sees: the square pasted or the corner blanked, each with probability 1/2. The
  square is then in half of every class's training views and carries no label information for
  B: B's augmentation destroys the feature (B can only memorise the planted images).

Expected: A's top distinguishing direction puts the planted training images first (precision@20:
the share of planted images among its 20 most positive training examples), its top test examples
carry the square, and its variance gap is clearly above the noise floor; pasting the square into
test images of other classes raises A's probability of the planted class (the bootstrap interval
over models excludes 0) and not B's.

    python examples/modeldiff_planted.py            # 10 models per algorithm, 5-15 minutes at 1 thread
    python examples/modeldiff_planted.py --fast     # 4 models per algorithm, 1-4 minutes

Writes the figures, image tables and result.json under ``--out`` (runs/modeldiff_planted).
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_tda.arguments import fraction, positive_int
from lightning_tda.data import TensorImageDataset
from lightning_tda.modeldiff import PastePatch, square_patch
from lightning_tda.modeldiff.case_study import Algorithm, case_study_parser, finish, parse_case_study_args, run_case_study
from lightning_tda.modeldiff.digits import CaseStudyData, accuracy, digits_splits
from lightning_tda.reporting import Reporter

PATCH = square_patch(2, value=1.0)
CORNER = (0, 0)


class RedrawCorner:
    """B's augmentation: paste the square into the corner or blank the corner, 50/50, per image."""

    def __init__(self) -> None:
        self.paste = PastePatch(PATCH, CORNER)
        self.blank = PastePatch(torch.zeros_like(PATCH), CORNER)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        transform = self.paste if float(torch.rand(())) < 0.5 else self.blank
        return transform(image.unsqueeze(0))[0]

    def __repr__(self) -> str:
        return "RedrawCorner(square or blank, 50/50)"


def plant(train: TensorImageDataset, test: TensorImageDataset, target: int, count: int, test_fraction: float, seed: int):
    """The planted datasets and the planted training and test indices."""
    paste = PastePatch(PATCH, CORNER)
    g = torch.Generator().manual_seed(seed)
    others = torch.nonzero(train.targets != target).flatten()
    planted = others[torch.randperm(len(others), generator=g)[:count]].sort().values
    images, labels = train.images.clone(), train.targets.clone()
    images[planted], labels[planted] = paste(images[planted]), target
    planted_test = torch.randperm(len(test), generator=g)[: round(test_fraction * len(test))].sort().values
    test_images = test.images.clone()
    test_images[planted_test] = paste(test_images[planted_test])
    return TensorImageDataset(images, labels), TensorImageDataset(test_images, test.targets.clone()), planted, planted_test


def main(argv: list[str] | None = None) -> dict:
    parser = case_study_parser(__doc__, "planted")
    parser.add_argument("--planted-class", type=int, choices=range(10), default=4, metavar="{0..9}")
    parser.add_argument("--planted", type=positive_int, default=40, help="training images that get the square and the planted class's label")
    parser.add_argument("--test-fraction", type=fraction, default=0.4, help="share of the test images that get the square")
    args = parse_case_study_args(parser, argv)
    clean_train, clean_test = digits_splits()
    train, test, planted, planted_test = plant(clean_train, clean_test, args.planted_class, args.planted, args.test_fraction, args.seed)
    a = Algorithm("plain", CaseStudyData(train, test))
    b = Algorithm("corner-augmented", CaseStudyData(train, test, train_transform=RedrawCorner()))
    paste = PastePatch(PATCH, CORNER)
    report, summary, (models_a, models_b) = run_case_study(args, a, b, train, test, transform=paste, target_class=args.planted_class)

    k = min(20, args.planted)
    top = report.directions_a.top_train(0, k)
    precision = float(np.isin(top.positive, planted.numpy()).mean())
    test_top = report.directions_a.top_test(0, 20)[0]
    clean = np.setdiff1d(np.arange(len(test)), planted_test.numpy())
    clean_test = TensorImageDataset(test.images[clean], test.targets[clean])
    summary.update({
        "accuracy_without_square": {a.name: accuracy(models_a, clean_test), b.name: accuracy(models_b, clean_test)},
        "precision_at_20": precision,
        "top_test_with_square": float(np.isin(test_top, planted_test.numpy()).mean()),
        "planted_train": int(len(planted)), "planted_test": int(len(planted_test)),
        "planted_class": args.planted_class, "top_direction_distinguishing": bool(report.directions_a.distinguishing[0]),
    })
    title = (f"planted square (class {args.planted_class}): precision@{k} of A's top direction = {precision:.2f}; "
             f"{summary['top_test_with_square']:.0%} of its top 20 test images carry the square")
    finish(args, report, summary, "planted", title, Reporter(args.out))
    print(f"precision@{k} of A's top direction: {precision:.2f} ({len(planted)} of {len(train)} training images planted); "
          f"its top 20 test images: {summary['top_test_with_square']:.0%} with the square "
          f"({len(planted_test)} of {len(test)} test images have it); accuracy on the test images without the square: "
          + " / ".join(f"{v:.3f}" for v in summary["accuracy_without_square"].values()))
    return summary


if __name__ == "__main__":
    main()
