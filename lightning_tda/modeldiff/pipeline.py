"""The whole ModelDiff analysis in one call, from recorded runs: what the demo runs.

:func:`compare_algorithms` scores each algorithm's stores with TRAK (and each half of them, for
the noise floor), finds both algorithms' distinguishing directions with the images of their top
examples, and, given a transformation, verifies it on both algorithms' models. It returns a
:class:`ModelDiffReport`, whose ``log(reporter, prefix)`` logs every table (with images), figure
and scalar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_tda import schema
from lightning_tda.modeldiff.comparison import ModelDiff
from lightning_tda.modeldiff.directions import DistinguishingDirections
from lightning_tda.modeldiff.verification import VerificationResult, verify
from lightning_tda.results import ReporterLike
from lightning_tda.store import RunStore

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from lightning_tda.attribution import Scorer


@dataclass(frozen=True)
class ModelDiffReport:
    """Both algorithms' directions and, when a transformation was given, its verification."""

    directions_a: DistinguishingDirections
    directions_b: DistinguishingDirections
    verification: VerificationResult | None = None

    @property
    def names(self) -> tuple[str, str]:
        return self.directions_a.names

    def summary(self) -> dict[str, float]:
        out = {f"directions_a/{k}": v for k, v in self.directions_a.summary().items()}
        out.update({f"directions_b/{k}": v for k, v in self.directions_b.summary().items()})
        if self.verification is not None:
            out.update({f"verification/{k}": v for k, v in self.verification.summary().items()})
        return out

    def plot(self, show: int = 2, title: str | None = None) -> "Figure":
        """The summary picture (:func:`~lightning_tda.modeldiff.plots.summary_figure`)."""
        from lightning_tda.modeldiff.plots import summary_figure

        return summary_figure(self.directions_a, self.directions_b, self.verification, show=show, title=title)

    def log(self, reporter: ReporterLike, prefix: str = "modeldiff") -> None:
        """Log both directions (tables with images, figures, scalars), the verification and the
        summary picture, under ``prefix``."""
        self.directions_a.log(reporter, f"{prefix}_directions_a")
        self.directions_b.log(reporter, f"{prefix}_directions_b")
        if self.verification is not None:
            self.verification.log(reporter, f"{prefix}_verification")
        if self.directions_a.top_train_images is not None:
            reporter.log_figure(f"{prefix}_summary", self.plot(), close=True)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Each part as its own saved result under ``path`` (no pickle)."""
        out = Path(path)
        self.directions_a.save(out / "directions_a")
        self.directions_b.save(out / "directions_b")
        if self.verification is not None:
            self.verification.save(out / "verification")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelDiffReport":
        src = Path(path)
        verification = VerificationResult.load(src / "verification") if (src / "verification").exists() else None
        return cls(DistinguishingDirections.load(src / "directions_a"), DistinguishingDirections.load(src / "directions_b"), verification)


def markdown_table(frame: "pd.DataFrame", digits: int = 4) -> str:
    """A DataFrame as a markdown table (floats to ``digits`` significant digits), without the
    optional ``tabulate`` dependency pandas' ``to_markdown`` needs."""

    def cell(value: object) -> str:
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def compare_algorithms(
    stores_a: Sequence[RunStore],
    stores_b: Sequence[RunStore],
    train_dataset: Dataset | Tensor | None = None,
    test_dataset: Dataset | Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    num: int = 5,
    scorer: "Scorer | None" = None,
    train_split: str = schema.TRAIN_SPLIT,
    test_split: str = "val",
    transform: Callable[[Tensor], Tensor] | None = None,
    target_class: int | str | None = None,
    models_a: Sequence[nn.Module] | None = None,
    models_b: Sequence[nn.Module] | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    images: int = 8,
    noise_floor: bool = True,
    fast: bool = False,
    seed: int = 0,
) -> ModelDiffReport:
    """ModelDiff from recorded runs, end to end.

    Args:
        stores_a, stores_b: one RunStore per model of each algorithm, with GradientRecorder
            records of ``train_split`` and ``test_split`` (at least 2 each for the noise floor).
        train_dataset, test_dataset: the recorded datasets, for the images of the top examples
            (none without them).
        num: directions per algorithm (3 with ``fast``).
        scorer: the attribution scorer (TRAK by default).
        transform, target_class: a feature transformation to verify on both algorithms'
            models on ``test_dataset``; the models are ``models_a``/``models_b`` when given, else
            the stores' last checkpoints loaded into ``model_fn()``.
        images: top examples shown per direction (6 with ``fast``).
        fast: fewer directions, images and bootstrap draws (well under a minute on digits).
    """
    if fast:
        num, images = min(num, 3), min(images, 6)
    diff = ModelDiff.from_stores(
        stores_a, stores_b, scorer=scorer, train_split=train_split, test_split=test_split, names=names,
        noise_floor=noise_floor, seed=seed,
    )
    directions = [diff.directions(of, num) for of in ("a", "b")]
    if train_dataset is not None and test_dataset is not None and images > 0:
        directions = [d.with_images(train_dataset, test_dataset, images) for d in directions]
    verification = None
    if transform is not None:
        if target_class is None or test_dataset is None:
            raise ValueError("verifying a transformation needs target_class and test_dataset")
        verification = verify(
            list(models_a) if models_a is not None else list(stores_a),
            list(models_b) if models_b is not None else list(stores_b),
            test_dataset, transform, target_class,  # type: ignore[arg-type]
            names=diff.names, model_fn=model_fn, n_bootstrap=500 if fast else 2000, seed=seed,
        )
    return ModelDiffReport(directions[0], directions[1], verification)


__all__ = ["ModelDiffReport", "compare_algorithms", "markdown_table"]
