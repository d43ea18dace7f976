"""Calibration: an ensemble of models predicted on subsampled training sets as predictive
uncertainty.

ModelPred predicts the models trained on ``num_models`` random subsamples of the pool in one call;
their averaged class probabilities form the ensemble's prediction. The expected calibration
error (torchmetrics, ``n_bins`` equal-width bins, L1) is reported for the single model trained on
all the data (before) and for the predicted ensemble (after), and for the same ensemble retrained
exactly (the reference the prediction approximates).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from lightning_tda.modelpred.utility import HeldOutUtility
from lightning_tda.results import AnalysisResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_tda.modelpred.modelpred import ModelPred


def expected_calibration_error(probabilities: Tensor, labels: Tensor, n_bins: int = 10) -> float:
    """ECE of class probabilities ``[n, K]`` (torchmetrics; binary uses the positive class)."""
    k = probabilities.shape[-1]
    probs = probabilities.to(torch.float32)
    if k == 2:
        return float(binary_calibration_error(probs[:, 1], labels, n_bins=n_bins, norm="l1"))
    return float(multiclass_calibration_error(probs, labels, num_classes=k, n_bins=n_bins, norm="l1"))


def _reliability(probabilities: Tensor, labels: Tensor, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confidence, prediction = probabilities.max(-1)
    correct = (prediction == labels).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence.to(torch.float64), edges[1:-1])
    count = torch.bincount(which, minlength=n_bins).to(torch.float64)
    conf = torch.bincount(which, confidence.to(torch.float64), n_bins) / count.clamp_min(1)
    acc = torch.bincount(which, correct, n_bins) / count.clamp_min(1)
    return conf.numpy(), acc.numpy(), count.numpy()


@dataclasses.dataclass(frozen=True)
class CalibrationResult(AnalysisResult):
    """ECE before (single model) and after (predicted ensemble), with the exact ensemble.

    Attributes:
        ece_single, ece_predicted_ensemble, ece_exact_ensemble: expected calibration errors.
        accuracy_single, accuracy_predicted_ensemble, accuracy_exact_ensemble: test accuracies.
        bin_confidence, bin_accuracy, bin_count: ``[3, n_bins]`` reliability diagrams (rows:
            single, predicted ensemble, exact ensemble).
    """

    ece_single: float
    ece_predicted_ensemble: float
    ece_exact_ensemble: float
    accuracy_single: float
    accuracy_predicted_ensemble: float
    accuracy_exact_ensemble: float
    bin_confidence: np.ndarray
    bin_accuracy: np.ndarray
    bin_count: np.ndarray
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    ROWS = ("single model (all data)", "ModelPred ensemble", "exact ensemble")

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame({
            "model": list(self.ROWS),
            "expected_calibration_error": [self.ece_single, self.ece_predicted_ensemble, self.ece_exact_ensemble],
            "accuracy": [self.accuracy_single, self.accuracy_predicted_ensemble, self.accuracy_exact_ensemble],
        })

    def summary(self) -> dict[str, float]:
        return {"ece_single": self.ece_single, "ece_predicted_ensemble": self.ece_predicted_ensemble, "ece_exact_ensemble": self.ece_exact_ensemble}

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 5)) if ax is None else ax.figure
        ax = ax if ax is not None else fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
        eces = (self.ece_single, self.ece_predicted_ensemble, self.ece_exact_ensemble)
        for row, (name, ece, marker) in enumerate(zip(self.ROWS, eces, "osd")):
            keep = self.bin_count[row] > 0
            ax.plot(self.bin_confidence[row][keep], self.bin_accuracy[row][keep], marker=marker, label=f"{name}: ECE {ece:.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title("Reliability (test set)")
        ax.legend(fontsize=8, loc="upper left")
        return fig, ax


def calibration_study(
    modelpred: "ModelPred",
    x_test: Any,
    y_test: Any,
    num_models: int = 64,
    subsample_fraction: float = 0.5,
    n_bins: int = 10,
    seed: int = 0,
) -> CalibrationResult:
    """ECE of the full-data model against the ensemble of ``num_models`` models trained on random
    ``subsample_fraction`` subsamples, predicted by ModelPred and solved exactly."""
    if num_models < 2 or not 0 < subsample_fraction <= 1 or n_bins < 1:
        raise ValueError("need num_models >= 2, 0 < subsample_fraction <= 1 and n_bins >= 1")
    target = modelpred.target
    test = HeldOutUtility(target, x_test, y_test)
    n = target.n
    rng = np.random.default_rng(seed)
    size = max(1, int(round(subsample_fraction * n)))
    masks = np.zeros((num_models, n), dtype=bool)
    for m in range(num_models):
        masks[m, rng.choice(n, size=size, replace=False)] = True
    start = time.perf_counter()
    predicted = modelpred.predict_params(masks).to(torch.float64)
    seconds = time.perf_counter() - start
    single = target.solve(np.ones((1, n), dtype=bool))
    exact = target.solve(masks)
    probabilities = [
        torch.softmax(target.logits(single, test.x), -1)[0],
        torch.softmax(target.logits(predicted, test.x), -1).mean(0),
        torch.softmax(target.logits(exact, test.x), -1).mean(0),
    ]
    eces = [expected_calibration_error(p, test.y, n_bins) for p in probabilities]
    accs = [float((p.argmax(-1) == test.y).to(torch.float64).mean()) for p in probabilities]
    bins = [_reliability(p, test.y, n_bins) for p in probabilities]
    return CalibrationResult(
        *eces, *accs, np.stack([b[0] for b in bins]), np.stack([b[1] for b in bins]), np.stack([b[2] for b in bins]), seconds,
        {"num_models": num_models, "subsample_fraction": subsample_fraction, "n_bins": n_bins, "seed": seed},
    )


__all__ = ["CalibrationResult", "calibration_study", "expected_calibration_error"]
