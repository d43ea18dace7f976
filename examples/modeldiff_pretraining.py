"""ModelDiff case study: training from scratch against fine-tuning a pre-trained network, on digits.

- Algorithm A (``scratch``): a DigitsCNN trained from a random initialisation.
- Algorithm B (``pretrained``): the same network fine-tuned (all layers, learning rate 0.02) from
  one pre-trained to tell the rotation of the training images (0, 90, 180 or 270 degrees: a
  task made from the bundled data, without digit labels), with a fresh output layer per model.

Both are trained ``--models`` times and recorded; TRAK over each algorithm's models gives its
attribution matrix; ModelDiff finds the training directions each uses and the other does not,
judged against the noise floor of two halves of one algorithm's models; the verification applies
a feature transformation (``--verify``) to the test images and compares how much it moves each
algorithm's probability of the correct class.

    python examples/modeldiff_pretraining.py            # 10 models per algorithm, 5-15 minutes at 1 thread
    python examples/modeldiff_pretraining.py --fast     # 4 models per algorithm, 1-4 minutes

Writes the figures, image tables and result.json under ``--out`` (runs/modeldiff_pretraining).
"""

from __future__ import annotations

from lightning_tda.arguments import positive_int
from lightning_tda.modeldiff.case_study import (
    Algorithm, case_study_parser, finish, parse_case_study_args, run_case_study, verification_transforms,
)
from lightning_tda.modeldiff.digits import CaseStudyData, digits_splits, fine_tune_start, rotation_pretrained
from lightning_tda.reporting import Reporter


def main(argv: list[str] | None = None) -> dict:
    parser = case_study_parser(__doc__, "pretraining", verify="rotate")
    parser.add_argument("--pretrain-epochs", type=positive_int, default=None, help="epochs of the rotation task (default 10; 3 with --fast)")
    args = parse_case_study_args(parser, argv)
    pretrain_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (3 if args.fast else 10)
    train, test = digits_splits()
    pretrained = rotation_pretrained(train, epochs=pretrain_epochs, seed=args.seed + 7)
    a = Algorithm("scratch", CaseStudyData(train, test))
    b = Algorithm("pretrained", CaseStudyData(train, test), make_model=fine_tune_start(pretrained), lr=0.02)
    report, summary, _ = run_case_study(args, a, b, train, test, transform=verification_transforms()[args.verify], target_class="label")
    summary["pretrain_epochs"] = pretrain_epochs
    finish(args, report, summary, "pretraining", "from scratch (A) against fine-tuned from rotation pre-training (B)", Reporter(args.out))
    return summary


if __name__ == "__main__":
    main()
