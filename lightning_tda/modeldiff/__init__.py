"""ModelDiff (Shah, Park, Ilyas, Madry 2023): compare two learning algorithms by how their
predictions use the training data.

- ``functional.py``: the core on two attribution matrices (normalise, residual, PCA, explained
  variance; randomized SVD in torch on an implicit residual), each step documented there;
- ``comparison.py``: :class:`ModelDiff` (from matrices, per-model matrices or RunStores) and the
  noise floor from two independent halves of each algorithm's models;
- ``directions.py``: :class:`DistinguishingDirections`, the result;
- ``transformations.py`` and ``verification.py``: feature transformations and :func:`verify`,
  the counterfactual check with bootstrap intervals over models;
- ``plots.py``: the figures; ``pipeline.py``: :func:`compare_algorithms`, the whole analysis from
  stores in one call; ``demo.py``: :func:`~lightning_tda.modeldiff.demo.digits_model_diff`, the
  fast comparison of the ``lightning-tda demo``'s digits stores (imported from there: it needs the
  recorders and models).
"""

from lightning_tda.modeldiff.comparison import ModelDiff, check_same_datasets
from lightning_tda.modeldiff.directions import DistinguishingDirections, RankedTrainExamples
from lightning_tda.modeldiff.pipeline import ModelDiffReport, compare_algorithms
from lightning_tda.modeldiff.functional import RankError, residual, residual_pca, variance_along
from lightning_tda.modeldiff.transformations import (
    ChangeIntensity,
    Compose,
    GaussianBlur,
    PastePatch,
    PerImage,
    RandomShift,
    Rotate,
    Shift,
    checker_patch,
    square_patch,
)
from lightning_tda.modeldiff.verification import VerificationResult, verify

__all__ = [
    "ChangeIntensity", "Compose", "DistinguishingDirections", "GaussianBlur", "ModelDiff", "ModelDiffReport", "PastePatch", "PerImage",
    "RandomShift", "RankError", "RankedTrainExamples", "Rotate", "Shift", "VerificationResult",
    "check_same_datasets", "checker_patch", "compare_algorithms", "residual", "residual_pca", "square_patch", "variance_along", "verify",
]
