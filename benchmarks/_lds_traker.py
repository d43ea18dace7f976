"""traker's TRAK for the LDS benchmark, run through traker's own API on the CPU.

One :class:`TrakerScores` per (set of checkpoints, k, precision) keeps a traker ``save_dir``:
:meth:`featurize` runs ``load_checkpoint`` / ``featurize`` / ``finalize_features`` over the
training set and ``start_scoring_checkpoint`` / ``score`` over each target split, once (a marker
file makes a rerun skip it). :meth:`scores` then returns ``finalize_scores`` for any subset of the
models and any ``lambda_reg``: the stored gradients are re-finalised with that ridge by traker's own
score computer (``finalize_features`` after clearing its "finalized" flags), exactly what a fresh
``TRAKer(lambda_reg=...)`` over the same checkpoints computes (checked by
``tests/test_bench_lds_digits.py``), without projecting every gradient again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from lightning_tda.data import TensorImageDataset
from lightning_tda.models import DigitsCNN, ImageClassifier

BATCH = 250
"""Examples per featurize/score call (the projection matrix is regenerated per call at block_size 100)."""


def make_traker(save_dir: Path, n_train: int, k: int, half: bool, lambda_reg: float = 0.0):  # type: ignore[no-untyped-def]
    """A TRAKer as a CPU user builds it: only ``device``, ``proj_dim`` and (for the best settings)
    ``use_half_precision=False`` / ``lambda_reg`` differ from the defaults. On the CPU traker then
    picks its BasicProjector (normal entries, ``block_size`` 100, seed + model_id per model)."""
    from trak import TRAKer

    return TRAKer(
        model=ImageClassifier(DigitsCNN()).eval(), task="image_classification", train_set_size=n_train,
        save_dir=str(save_dir), device="cpu", proj_dim=k, use_half_precision=half, lambda_reg=lambda_reg,
        logging_level=logging.ERROR,
    )


class TrakerScores:
    """traker features of some checkpoints in one ``save_dir``, and their TRAK scores."""

    def __init__(self, save_dir: Path, n_train: int, k: int, half: bool) -> None:
        self.save_dir, self.n_train, self.k, self.half = Path(save_dir), n_train, k, half
        self.marker = self.save_dir / "featurized.json"

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def featurize(
        self,
        checkpoints: Sequence[Mapping[str, torch.Tensor]],
        train: TensorImageDataset,
        targets: Mapping[str, TensorImageDataset],
    ) -> None:
        """traker's featurize + finalize_features on ``train`` and scoring pass on each target split."""
        if self.done:
            return
        traker = make_traker(self.save_dir, self.n_train, self.k, self.half)
        for model_id, state in enumerate(checkpoints):  # resumable: featurized models are skipped
            registered = traker.saver.model_ids.get(model_id)
            if registered is not None and registered["is_featurized"] == 1:
                continue
            traker.load_checkpoint(dict(state), model_id=model_id)
            for lo in range(0, len(train), BATCH):
                hi = min(lo + BATCH, len(train))
                traker.featurize(batch=(train.images[lo:hi], train.targets[lo:hi]), num_samples=hi - lo)
        traker.finalize_features()
        for exp, data in targets.items():
            for model_id, state in enumerate(checkpoints):
                scored = self.save_dir / f"scored-{exp}-{model_id}"
                if scored.exists():
                    continue
                traker.start_scoring_checkpoint(exp_name=exp, checkpoint=dict(state), model_id=model_id, num_targets=len(data))
                for lo in range(0, len(data), BATCH):
                    hi = min(lo + BATCH, len(data))
                    traker.score(batch=(data.images[lo:hi], data.targets[lo:hi]), num_samples=hi - lo)
                scored.write_text("done\n")
        self.marker.write_text(json.dumps({"models": len(checkpoints), "targets": sorted(targets)}))

    def scores(self, exp: str, model_ids: Sequence[int], lambda_reg: float) -> np.ndarray:
        """``finalize_scores`` of ``exp`` over ``model_ids`` with ``lambda_reg``: ``[n_target, n_train]``."""
        traker = make_traker(self.save_dir, self.n_train, self.k, self.half, lambda_reg)
        ids = [int(i) for i in model_ids]
        for model_id in ids:
            traker.saver.model_ids[model_id]["is_finalized"] = 0
        traker.finalize_features(model_ids=ids)
        scores = traker.finalize_scores(exp_name=exp, model_ids=ids)
        return np.asarray(scores, dtype=np.float64).T

    def trace_per_example(self, model_ids: Sequence[int]) -> float:
        """Mean over ``model_ids`` of ``trace(Phi^T Phi) / n`` of traker's training features (the
        unit of the ridge grid, so that its ``lambda_reg`` is searched on the same relative scale
        as our ``r``)."""
        traker = make_traker(self.save_dir, self.n_train, self.k, self.half)
        values = []
        for model_id in model_ids:
            traker.saver.load_current_store(int(model_id))
            g = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
            values.append(float((g * g).sum()) / g.shape[0])
        return float(np.mean(values))
