"""ModelDiff case study: training without and with data augmentation, on digits.

- Algorithm A (``plain``): a DigitsCNN trained on the digits as they are.
- Algorithm B (``augmented``): the same, with every training image randomly shifted by up to one
  pixel and rotated by up to 15 degrees each time it is seen.

Both are trained ``--models`` times and recorded (projected gradients at several epochs, final
checkpoints); TRAK over each algorithm's models gives its attribution matrix; ModelDiff finds the
training directions each uses and the other does not, judged against the noise floor of two
halves of one algorithm's models. The verification then applies a feature transformation
(``--verify``, a one-pixel shift of the test images by default) and compares how much it moves each
algorithm's probability of the correct class: models that never saw shifted digits should depend
more on exact pixel positions.

    python examples/modeldiff_augmentation.py            # 10 models per algorithm, 5-15 minutes at 1 thread
    python examples/modeldiff_augmentation.py --fast     # 4 models per algorithm, 1-4 minutes

Writes the figures, image tables and result.json under ``--out`` (runs/modeldiff_augmentation).
"""

from __future__ import annotations

from lightning_tda.modeldiff import Compose, PerImage, RandomShift, Rotate
from lightning_tda.modeldiff.case_study import (
    Algorithm, case_study_parser, finish, parse_case_study_args, run_case_study, verification_transforms,
)
from lightning_tda.modeldiff.digits import CaseStudyData, digits_splits
from lightning_tda.reporting import Reporter


def main(argv: list[str] | None = None) -> dict:
    parser = case_study_parser(__doc__, "augmentation", verify="shift")
    args = parse_case_study_args(parser, argv)
    train, test = digits_splits()
    augment = PerImage(Compose([RandomShift(1), Rotate(15.0, random=True)]))
    a = Algorithm("plain", CaseStudyData(train, test))
    b = Algorithm("augmented", CaseStudyData(train, test, train_transform=augment))
    report, summary, _ = run_case_study(args, a, b, train, test, transform=verification_transforms()[args.verify], target_class="label")
    finish(args, report, summary, "augmentation", "without (A) and with (B) shift+rotation augmentation", Reporter(args.out))
    return summary


if __name__ == "__main__":
    main()
