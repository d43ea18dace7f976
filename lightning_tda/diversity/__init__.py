"""Ensemble diversity: which models make different mistakes, and what combining them gains.

After Gontijo-Lopes, Dauphin and Cubuk, "No One Representation to Rule Them All" (ICLR 2022): the
more two models' training methodologies diverge (initialisation < hyper-parameters <
architecture < framework < data), the less their errors coincide and the more their ensemble
gains. The package, in the torchmetrics layout:

- ``functional.py``: the metrics on labels, probabilities or logits, for two models or ``[M, n]``
  pairwise (error inconsistency, error consistency, error correlation, disagreement, ensemble
  gain, conversion rate); ``inputs.py`` checks and stacks those predictions;
- ``metrics.py``: the same as torchmetrics ``Metric`` classes (sum states, synced under DDP);
- ``temperature.py``: temperature scaling on a held-out split;
- ``analysis.py`` / ``result.py``: M models' logits -> :class:`DiversityResult` (pairwise
  matrices, pair ensembles, pairs grouped by what differs, plots);
- ``module.py``: :class:`EnsembleDiversity`, the LightningModule that runs models over a dataset,
  and ``EnsembleDiversity.from_stores`` for recorded runs;
- ``overlap.py``: representation overlap (linear probes on mixed and concatenated embeddings,
  dCor / partial dCor, linear CKA);
- ``selection.py``: greedy ensemble selection;
- ``report.py``: :func:`diversity_report`, all of it in one call;
- ``family.py``: a family of digits models that differ by one factor at a time (examples, demo).
"""

from lightning_tda.diversity.analysis import (
    CalibratedOutputs,
    DiversitySettings,
    analyze_diversity,
    calibrate,
    diversity_of,
    split_held_out,
)
from lightning_tda.diversity.categories import DEFAULT_CATEGORY_ORDER, category_intervals, pair_category
from lightning_tda.diversity.functional import (
    conversion_rate,
    disagreement,
    ensemble_accuracy,
    ensemble_gain,
    error_consistency,
    error_correlation,
    error_inconsistency,
    pairwise_conversion_rate,
    pairwise_disagreement,
    pairwise_diversity,
    pairwise_ensemble_gain,
    pairwise_error_consistency,
    pairwise_error_correlation,
    pairwise_error_inconsistency,
)
from lightning_tda.diversity.metrics import (
    ConversionRate,
    Disagreement,
    EnsembleGain,
    ErrorConsistency,
    ErrorCorrelation,
    ErrorInconsistency,
    PairwiseDiversity,
)
from lightning_tda.diversity.module import EnsembleDiversity
from lightning_tda.diversity.overlap import (
    OverlapResult,
    layer_embeddings,
    linear_cka,
    linear_probe_accuracy,
    representation_overlap,
)
from lightning_tda.diversity.report import DiversityReport, diversity_report
from lightning_tda.diversity.result import DiversityResult
from lightning_tda.diversity.selection import SelectionResult, greedy_ensemble_selection
from lightning_tda.diversity.temperature import fit_temperature, negative_log_likelihood, temperature_scale

__all__ = [
    "DEFAULT_CATEGORY_ORDER",
    "CalibratedOutputs",
    "ConversionRate",
    "Disagreement",
    "DiversityReport",
    "DiversityResult",
    "DiversitySettings",
    "EnsembleDiversity",
    "EnsembleGain",
    "ErrorConsistency",
    "ErrorCorrelation",
    "ErrorInconsistency",
    "OverlapResult",
    "PairwiseDiversity",
    "SelectionResult",
    "analyze_diversity",
    "calibrate",
    "category_intervals",
    "conversion_rate",
    "disagreement",
    "diversity_of",
    "diversity_report",
    "ensemble_accuracy",
    "ensemble_gain",
    "error_consistency",
    "error_correlation",
    "error_inconsistency",
    "fit_temperature",
    "greedy_ensemble_selection",
    "layer_embeddings",
    "linear_cka",
    "linear_probe_accuracy",
    "negative_log_likelihood",
    "pair_category",
    "pairwise_conversion_rate",
    "pairwise_disagreement",
    "pairwise_diversity",
    "pairwise_ensemble_gain",
    "pairwise_error_consistency",
    "pairwise_error_correlation",
    "pairwise_error_inconsistency",
    "representation_overlap",
    "split_held_out",
    "temperature_scale",
]
