"""EK-FAC influence from kronfluence (Grosse et al. 2023), as the seed paper compares it.

kronfluence is a peer package (the ``bench`` extra), imported only here. Its pairwise score with
the test loss as measurement is ``grad loss_z^T (G + lambda I)^-1 grad loss_i`` with ``G`` the
EK-FAC approximation of the Gauss-Newton Hessian (from labels sampled from the model: the true
Fisher): positive when ``i`` is helpful, the gold standard's sign (checked against the exact
influence function in the tests). Files kronfluence writes go to a temporary directory.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def _task():  # type: ignore[no-untyped-def]
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Cross-entropy training loss (summed, as kronfluence expects) and test-loss measurement."""

        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def ekfac_scores(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    columns: Tensor,
    heuristic_damping: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    """EK-FAC scores ``[n_test, len(columns)]`` (module docstring). ``heuristic_damping``:
    kronfluence's ``damping_factor=None`` (0.1 x the mean eigenvalue) instead of its default 1e-8."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "EK-FAC needs kronfluence, a peer package of the bench extra: pip install 'lightning-tda[bench]'"
        ) from err
    for name in ("kronfluence", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    task = _task()
    # wrapped, so a bare nn.Linear is a submodule kronfluence can track
    net = prepare_model(nn.Sequential(copy.deepcopy(model).float().cpu().eval()), task)
    train = TensorDataset(x_train.float().cpu(), y_train.cpu())
    scored = TensorDataset(x_train[columns].float().cpu(), y_train[columns].cpu())
    query = TensorDataset(x_test.float().cpu(), y_test.cpu())
    score_args = ScoreArguments(damping_factor=None) if heuristic_damping else ScoreArguments()
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="further_training", model=net, task=task, cpu=True,
                            output_dir=tmp, disable_tqdm=True)
        analyzer.fit_all_factors(
            factors_name="ekfac", dataset=train, per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="scores", factors_name="ekfac", query_dataset=query, train_dataset=scored,
            per_device_query_batch_size=batch_size, per_device_train_batch_size=batch_size,
            score_args=score_args, overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]
    return scores.double().numpy()
