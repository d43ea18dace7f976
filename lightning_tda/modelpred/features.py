"""Features for ModelPred from a RunStore: the embeddings a MarginRecorder recorded.

A network's penultimate features (the paper used a CNN's on MNIST) make the convex target a
"last layer" of that network: record them during training with
``MarginRecorder(store, embeddings="model.fc1")`` and read them back here.
"""

from __future__ import annotations

import os

import numpy as np

from lightning_tda import schema
from lightning_tda.callbacks.margin_recorder import read_margins
from lightning_tda.store import RunStore


def embeddings_from_store(store: RunStore | str | os.PathLike[str], split: str = schema.TRAIN_SPLIT, record: int = -1) -> np.ndarray:
    """The embeddings ``[n_examples, dim]`` of ``split`` from one complete record (default: the
    last), as recorded by ``MarginRecorder(..., embeddings=...)``."""
    run = store if isinstance(store, RunStore) else RunStore(store)
    records: list = []
    if run.has_array(schema.record_array(schema.EMBEDDINGS, split)):
        values, records = read_margins(run, split, prefix=schema.EMBEDDINGS)
    if not records:
        raise ValueError(
            f"{run.path} has no complete embeddings record of split {split!r}; record them with "
            "MarginRecorder(store, splits=(...), embeddings='model.fc1') (a layer name of your model)"
        )
    if not -len(records) <= record < len(records):
        raise ValueError(f"record {record} is out of range: {run.path} has {len(records)} complete embeddings records of {split!r}")
    return np.asarray(values[record]).reshape(values.shape[1], -1)


__all__ = ["embeddings_from_store"]
