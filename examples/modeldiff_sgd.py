"""ModelDiff case study: two SGD settings, on digits.

- Algorithm A (``lr0.05-b16``): SGD with learning rate 0.05 and batches of 16 (noisy steps:
  learning rate / batch size = 3.1e-3).
- Algorithm B (``lr0.02-b64``): SGD with learning rate 0.02 and batches of 64 (ten times less
  noise: 3.1e-4).

Everything else (model, epochs, momentum 0.9, weight decay 5e-4, data) is the same, and both
reach about the same test accuracy. Both are
trained ``--models`` times and recorded; TRAK over each algorithm's models gives its attribution
matrix; ModelDiff finds the training directions each uses and the other does not, judged against
the noise floor of two halves of one algorithm's models; the verification applies a feature
transformation (``--verify``) to the test images and compares how much it moves each algorithm's
probability of the correct class.

    python examples/modeldiff_sgd.py            # 10 models per algorithm, 5-15 minutes at 1 thread
    python examples/modeldiff_sgd.py --fast     # 4 models per algorithm, 1-4 minutes

Writes the figures, image tables and result.json under ``--out`` (runs/modeldiff_sgd).
"""

from __future__ import annotations

from lightning_tda.modeldiff.case_study import (
    Algorithm, case_study_parser, finish, parse_case_study_args, run_case_study, verification_transforms,
)
from lightning_tda.modeldiff.digits import CaseStudyData, digits_splits
from lightning_tda.reporting import Reporter


def main(argv: list[str] | None = None) -> dict:
    parser = case_study_parser(__doc__, "sgd", verify="blur")
    args = parse_case_study_args(parser, argv)
    train, test = digits_splits()
    a = Algorithm("lr0.05-b16", CaseStudyData(train, test, batch_size=16), lr=0.05)
    b = Algorithm("lr0.02-b64", CaseStudyData(train, test, batch_size=64), lr=0.02)
    report, summary, _ = run_case_study(args, a, b, train, test, transform=verification_transforms()[args.verify], target_class="label")
    finish(args, report, summary, "sgd", "SGD: lr 0.05, batch 16 (A) against lr 0.02, batch 64 (B)", Reporter(args.out))
    return summary


if __name__ == "__main__":
    main()
