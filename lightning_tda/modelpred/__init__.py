"""ModelPred (Zeng et al., SaTML 2023): a set network that predicts the model trained on any
subset of the training data, as a cheap stand-in for retraining.

- targets: the convex learners predicted (:class:`LogisticTarget`, :class:`SquaredHingeSVMTarget`),
  with exact batched solvers;
- :class:`ModelPredModule`: DeepSets with global (KKT) and local (utility) regularisation;
- :meth:`ModelPred.fit`: the one-call entry point;
- applications: Shapley and leave-one-out values, deletion/addition, cleaning, memorisation,
  data selection, calibration; peers in :mod:`~lightning_tda.modelpred.baselines`.
"""

from lightning_tda.modelpred.calibration import CalibrationResult, calibration_study, expected_calibration_error
from lightning_tda.modelpred.cleaning import CleaningResult, cleaning_study, flip_labels
from lightning_tda.modelpred.counterfactual import (
    CounterfactualResult,
    PredictionAccuracyResult,
    counterfactual_study,
    influence_update,
    prediction_accuracy,
)
from lightning_tda.modelpred.features import embeddings_from_store
from lightning_tda.modelpred.memorization import MemorizationResult, memorization
from lightning_tda.modelpred.modelpred import ModelPred, ModelPredSettings
from lightning_tda.modelpred.module import ModelPredModule, global_regularizer, local_regularizer
from lightning_tda.modelpred.network import SetNetwork
from lightning_tda.modelpred.selection import SelectionResult, greedy_selection
from lightning_tda.modelpred.targets import LogisticTarget, SquaredHingeSVMTarget, Target, make_target
from lightning_tda.modelpred.utility import HeldOutUtility, exact_utility, predicted_utility, sklearn_utility
from lightning_tda.modelpred.valuation import (
    ValuationResult,
    exact_shapley,
    leave_one_out_values,
    modelpred_leave_one_out,
    modelpred_shapley,
    permutation_shapley,
)

__all__ = [
    "CalibrationResult", "CleaningResult", "CounterfactualResult", "HeldOutUtility", "LogisticTarget", "MemorizationResult",
    "ModelPred", "ModelPredModule", "ModelPredSettings", "PredictionAccuracyResult", "SelectionResult", "SetNetwork",
    "SquaredHingeSVMTarget", "Target", "ValuationResult", "calibration_study", "cleaning_study", "counterfactual_study",
    "embeddings_from_store", "exact_shapley", "exact_utility", "expected_calibration_error", "flip_labels",
    "global_regularizer", "greedy_selection", "influence_update", "leave_one_out_values", "local_regularizer",
    "make_target", "memorization", "modelpred_leave_one_out", "modelpred_shapley", "permutation_shapley",
    "predicted_utility", "prediction_accuracy", "sklearn_utility",
]
