"""The result of a ModelDiff comparison: distinguishing training directions of one algorithm.

:class:`DistinguishingDirections` holds, for the ``num`` directions that algorithm ``of`` uses
and the other does not: unit weight vectors over the training set, the test examples' loadings,
the variance fraction of both algorithms along each, and the noise floor they are judged
against (see :mod:`lightning_tda.modeldiff.comparison`). With :meth:`~DistinguishingDirections.with_images`
it also carries the images of each direction's top training and test examples, so tables and
figures show them (and W&B gets image tables through the reporter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tda.images import to_uint8_image
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class RankedTrainExamples:
    """The training examples with the most positive and the most negative weights of a direction."""

    positive: np.ndarray
    positive_weights: np.ndarray
    negative: np.ndarray
    negative_weights: np.ndarray


def images_and_labels(data: Dataset | torch.Tensor | np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (and labels, when ``data`` is a dataset of ``(x, y)``) of ``indices``."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return np.stack([to_uint8_image(data[int(i)]) for i in indices]), None
    images, labels = [], []
    for i in indices:
        item = data[int(i)]
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item["x"], item["y"])
        images.append(to_uint8_image(x))
        labels.append(int(y))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _all_labels(data: Any) -> np.ndarray | None:
    targets = getattr(data, "targets", None)
    return None if targets is None else np.asarray(torch.as_tensor(targets).cpu(), dtype=np.int64)


@dataclass(frozen=True)
class DistinguishingDirections(AnalysisResult):
    """Directions in training-set space that algorithm ``of`` uses and the other does not.

    Attributes:
        names: the two algorithms' names, ``(A, B)`` as given to :class:`ModelDiff`.
        of: ``"a"`` or ``"b"``: whose directions these are.
        train_weights: ``[num, n_train]`` unit vectors over the training examples (signed so the
            largest-magnitude weight is positive).
        test_loadings: ``[n_test, num]`` each test example's residual projected on each direction.
        variance_a, variance_b: ``[num]`` fraction of A's (B's) row-normalised, column-centred
            attribution variance along each direction.
        total_variance_a, total_variance_b: those totals per test example (``1 - ||mean row||^2``);
            ``variance * total`` is the variance MadryLab's ``modeldiff`` package reports.
        residual_variance_ratio: ``[num]`` explained-variance ratio of each direction in the
            residual PCA; ``singular_values`` its singular values.
        noise_floor: the largest variance gap a direction reaches between two independent halves
            of one algorithm's models (NaN when not measured); a direction is *distinguishing*
            when its gap exceeds ``noise_margin * noise_floor``.
        residual_of, method, seed: how the residual and its PCA were computed.
        top_train_images, top_test_images: optional uint8 images of the ``k`` top positive and
            negative training examples ``[num, 2, k, ...]`` and top test examples ``[num, k, ...]``
            (:meth:`with_images`); ``train_labels``/``test_labels``: optional labels of all examples.
    """

    names: tuple[str, str]
    of: str
    train_weights: np.ndarray
    test_loadings: np.ndarray
    variance_a: np.ndarray
    variance_b: np.ndarray
    total_variance_a: float
    total_variance_b: float
    residual_variance_ratio: np.ndarray
    singular_values: np.ndarray
    noise_floor: float = float("nan")
    noise_margin: float = 1.5
    residual_of: str = "normalized"
    method: str = "auto"
    seed: int = 0
    top_train_images: np.ndarray | None = None
    top_test_images: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    # ------------------------------------------------------------------ derived
    @property
    def num(self) -> int:
        return int(self.train_weights.shape[0])

    @property
    def name(self) -> str:
        """The name of the algorithm whose directions these are."""
        return self.names[0] if self.of == "a" else self.names[1]

    @property
    def other(self) -> str:
        return self.names[1] if self.of == "a" else self.names[0]

    @property
    def variance_own(self) -> np.ndarray:
        return self.variance_a if self.of == "a" else self.variance_b

    @property
    def variance_other(self) -> np.ndarray:
        return self.variance_b if self.of == "a" else self.variance_a

    @property
    def gap(self) -> np.ndarray:
        """``[num]`` variance under this algorithm minus variance under the other."""
        return self.variance_own - self.variance_other

    @property
    def floor_measured(self) -> bool:
        return bool(np.isfinite(self.noise_floor))

    @property
    def distinguishing(self) -> np.ndarray:
        """``[num]`` bool: the gap is above ``noise_margin`` times the noise floor (all False when
        the floor was not measured: nothing is called distinguishing without it)."""
        if not self.floor_measured:
            return np.zeros(self.num, dtype=bool)
        return self.gap > self.noise_margin * self.noise_floor

    def _check_direction(self, j: int) -> int:
        if not isinstance(j, (int, np.integer)) or not 0 <= j < self.num:
            raise ValueError(f"direction index must be in [0, {self.num}), got {j!r}")
        return int(j)

    @staticmethod
    def _check_k(k: int, n: int) -> int:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return min(int(k), n)

    def top_train(self, j: int, k: int = 10) -> RankedTrainExamples:
        """The ``k`` training examples with the most positive and the ``k`` with the most negative
        weight in direction ``j``."""
        w = self.train_weights[self._check_direction(j)]
        k = self._check_k(k, w.size)
        order = np.argsort(-w, kind="stable")
        positive, negative = order[:k], order[::-1][:k]
        return RankedTrainExamples(positive, w[positive], negative, w[negative])

    def top_test(self, j: int, k: int = 10, side: Literal["absolute", "positive", "negative"] = "absolute") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` test examples that load most on direction ``j``: ``(indices, loadings)``.

        By default the largest loadings in absolute value (a test example whose prediction A
        makes *against* the direction's training examples loads negatively); ``side="positive"``
        or ``"negative"`` keeps one sign."""
        loadings = self.test_loadings[:, self._check_direction(j)]
        k = self._check_k(k, loadings.size)
        keys = {"absolute": -np.abs(loadings), "positive": -loadings, "negative": loadings}
        if side not in keys:
            raise ValueError(f"side must be 'absolute', 'positive' or 'negative', got {side!r}")
        order = np.argsort(keys[side], kind="stable")[:k]
        return order, loadings[order]

    def with_images(self, train: Dataset | torch.Tensor | np.ndarray, test: Dataset | torch.Tensor | np.ndarray, k: int = 8) -> "DistinguishingDirections":
        """A copy that carries the images (and labels) of every direction's ``k`` top positive and
        negative training examples and ``k`` top test examples, for tables and figures."""
        k = self._check_k(k, min(self.train_weights.shape[1], self.test_loadings.shape[0]))
        if len(train) != self.train_weights.shape[1] or len(test) != self.test_loadings.shape[0]:  # type: ignore[arg-type]
            raise ValueError(
                f"the datasets have {len(train)} training and {len(test)} test examples, the scores "  # type: ignore[arg-type]
                f"{self.train_weights.shape[1]} and {self.test_loadings.shape[0]}: give the datasets the scores were computed on"
            )
        train_rows, test_rows = [], []
        for j in range(self.num):
            top = self.top_train(j, k)
            train_rows.append(np.stack([images_and_labels(train, top.positive)[0], images_and_labels(train, top.negative)[0]]))
            test_rows.append(images_and_labels(test, self.top_test(j, k)[0])[0])
        return dataclasses.replace(
            self, top_train_images=np.stack(train_rows), top_test_images=np.stack(test_rows),
            train_labels=_all_labels(train), test_labels=_all_labels(test),
        )

    # ------------------------------------------------------------------ views
    def to_frame(self, k: int = 5) -> "pd.DataFrame":
        """One row per direction: variances, gap, floor, verdict, and the top examples' indices."""
        import pandas as pd

        rows = []
        for j in range(self.num):
            top = self.top_train(j, k)
            rows.append({
                "direction": j, "of": self.name, f"variance_{self.names[0]}": float(self.variance_a[j]),
                f"variance_{self.names[1]}": float(self.variance_b[j]), "gap": float(self.gap[j]),
                "noise_floor": float(self.noise_floor), "distinguishing": bool(self.distinguishing[j]),
                "residual_variance_ratio": float(self.residual_variance_ratio[j]),
                "top_train_positive": " ".join(map(str, top.positive.tolist())),
                "top_train_negative": " ".join(map(str, top.negative.tolist())),
                "top_test": " ".join(map(str, self.top_test(j, k)[0].tolist())),
            })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Distinguishing count, floor, and the top direction's gap and variances (``_a`` is the
        first algorithm given, ``_b`` the second)."""
        return {
            "num_distinguishing": float(self.distinguishing.sum()),
            "noise_floor": float(self.noise_floor),
            "top_gap": float(self.gap[0]),
            "top_variance_a": float(self.variance_a[0]),
            "top_variance_b": float(self.variance_b[0]),
        }

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Each direction's variance under both algorithms, with the noise-floor threshold."""
        from lightning_tda.modeldiff.plots import plot_direction_variances

        return plot_direction_variances(self, ax=ax)

    def plot_examples(self, directions: Sequence[int] | None = None) -> "Figure":
        """Per direction, its top positive and negative training images and top test images
        (needs :meth:`with_images`)."""
        from lightning_tda.modeldiff.plots import plot_direction_examples

        return plot_direction_examples(self, directions)

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, the table and the variance figure; with images, also one image table per
        direction (rank, index, weight or loading, label, image) and the examples figure."""
        super().log(reporter, prefix)
        if self.top_train_images is None or self.top_test_images is None:
            return
        for j in range(self.num):
            frame, images = self.examples_frame(j)
            reporter.log_frame(f"{prefix}_direction{j}_examples", frame, images=images)
        reporter.log_figure(f"{prefix}_examples", self.plot_examples(), close=True)

    def examples_frame(self, j: int) -> tuple["pd.DataFrame", dict[str, list[np.ndarray]]]:
        """The image table of direction ``j``: one row per rank, with the top positive and
        negative training examples and the top test examples, and their images."""
        import pandas as pd

        if self.top_train_images is None or self.top_test_images is None:
            raise ValueError("no images: call with_images(train, test) first")
        k = self.top_test_images.shape[1]
        top, (test_idx, test_load) = self.top_train(j, k), self.top_test(j, k)

        def label(labels: np.ndarray | None, i: int) -> int | None:
            return None if labels is None else int(labels[i])

        frame = pd.DataFrame({
            "rank": np.arange(k),
            "train_positive": top.positive, "train_positive_weight": top.positive_weights,
            "train_positive_label": [label(self.train_labels, i) for i in top.positive],
            "train_negative": top.negative, "train_negative_weight": top.negative_weights,
            "train_negative_label": [label(self.train_labels, i) for i in top.negative],
            "test": test_idx, "test_loading": test_load,
            "test_label": [label(self.test_labels, i) for i in test_idx],
        })
        images = {
            "train_positive_image": list(self.top_train_images[j, 0]),
            "train_negative_image": list(self.top_train_images[j, 1]),
            "test_image": list(self.top_test_images[j]),
        }
        return frame, images


__all__ = ["DistinguishingDirections", "RankedTrainExamples", "images_and_labels"]
