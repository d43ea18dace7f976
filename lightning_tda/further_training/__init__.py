"""Final-model-only training-data attribution by further training (Wei et al. 2024).

Only the final model is available. The sensitivity of a test example's loss to a training
instance is measured by *further training*: from the final model, once on the full training set
and once without the instance, with the same batch order; the difference in test loss, adjusted
by the full run (which cancels further training's own effect) and averaged over seeds, is the
gold standard that gradient methods (Grad-Dot, Grad-Cos, influence functions, TRAK, DataInf)
approximate.

- :func:`further_training_scores` (``gold.py``): the gold standard, all leave-one-out runs of a
  seed as copies of one vmapped step (``replicas.py``), in the batch order of ``order.py``;
- :class:`FurtherTraining` (``module.py``): the same computation as a LightningModule;
- :func:`final_model_scores` (``methods.py``): the gradient methods on the final model, each in
  the gold standard's sign convention; :func:`compare` (``compare.py``): cosine and Spearman
  agreement over the amount of further training, with plots;
- :func:`further_training_check` (``demo.py``): everything on a handful of digits in seconds.
"""

from lightning_tda.further_training.compare import ComparisonResult, compare
from lightning_tda.further_training.datainf import datainf_scores
from lightning_tda.further_training.demo import further_training_check
from lightning_tda.further_training.gold import further_training_scores, load_final_model
from lightning_tda.further_training.methods import final_model_scores, method_label
from lightning_tda.further_training.module import FurtherTraining
from lightning_tda.further_training.order import BatchOrder, SameOrderBatchSampler, epoch_steps, steps_per_epoch
from lightning_tda.further_training.result import FurtherTrainingResult
from lightning_tda.further_training.settings import FurtherTrainingSettings

__all__ = [
    "BatchOrder",
    "ComparisonResult",
    "FurtherTraining",
    "FurtherTrainingResult",
    "FurtherTrainingSettings",
    "SameOrderBatchSampler",
    "compare",
    "datainf_scores",
    "epoch_steps",
    "final_model_scores",
    "further_training_check",
    "further_training_scores",
    "load_final_model",
    "method_label",
    "steps_per_epoch",
]
