"""ModelDiff for the ``lightning-tda demo``: two algorithms' digits runs in, the report out.

:func:`digits_model_diff` takes the stores the demo records (one per model, with a
GradientRecorder and a CheckpointRecorder; ``ImageClassifier(DigitsCNN())`` models on
:class:`~lightning_tda.data.DigitsDataModule` splits), rebuilds the recorded digits datasets for
the images (checked against the stores' fingerprints), and runs
:func:`~lightning_tda.modeldiff.pipeline.compare_algorithms` in its fast setting with a digits
transformation verified on both algorithms' final checkpoints (a one-pixel shift by default: the
demo's B trains on shifted digits, A does not).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from lightning_tda.data import TensorImageDataset, dataset_fingerprint
from lightning_tda import schema
from lightning_tda.modeldiff.comparison import check_same_datasets
from lightning_tda.modeldiff.digits import digits_splits
from lightning_tda.modeldiff.pipeline import ModelDiffReport, compare_algorithms
from lightning_tda.modeldiff.transformations import Shift
from lightning_tda.store import RunStore, fingerprint_of


def digits_classifier() -> nn.Module:
    """The demo's untrained model, ``ImageClassifier(DigitsCNN())``, to load checkpoints into."""
    from lightning_tda.models import DigitsCNN, ImageClassifier

    return ImageClassifier(DigitsCNN())


def recorded_digits(stores: Sequence[RunStore], train_split: str = schema.TRAIN_SPLIT, test_split: str = "val",
                    split_seed: int = 0) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The digits train and test datasets the stores were recorded on: the
    :class:`~lightning_tda.data.DigitsDataModule` split (``split_seed``) cut to the recorded
    training size, checked against the stores' fingerprints (a clear error on a mismatch)."""
    check_same_datasets(stores, (train_split, test_split))
    wanted = {split: fingerprint_of(stores[0], split) for split in (train_split, test_split)}
    train, test = digits_splits(n_train=wanted[train_split][schema.FINGERPRINT_SIZE], split_seed=split_seed)
    for split, dataset in ((train_split, train), (test_split, test)):
        if dataset_fingerprint(dataset) != dict(wanted[split]):
            raise ValueError(
                f"the {split!r} dataset recorded in {stores[0].path} is not the digits split (split_seed={split_seed}, "
                f"n_train={wanted[train_split][schema.FINGERPRINT_SIZE]}); pass train_dataset and test_dataset to "
                "compare_algorithms instead"
            )
    return train, test


def digits_model_diff(
    stores_a: Sequence[RunStore],
    stores_b: Sequence[RunStore],
    *,
    names: Sequence[str] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    target_class: int | str = "label",
    model_fn: Callable[[], nn.Module] = digits_classifier,
    split_seed: int = 0,
    seed: int = 0,
) -> ModelDiffReport:
    """ModelDiff of two algorithms' digits runs with the counterfactual check, fast (the demo's).

    Args:
        stores_a, stores_b: one RunStore per model of each algorithm (at least 2 each), recorded
            with a GradientRecorder (splits ``train`` and ``val``) and a CheckpointRecorder on
            ``DigitsDataModule(split_seed=split_seed, n_train=...)``.
        names: the algorithms' names (default: the stores' ``algorithm`` labels).
        transform, target_class: the transformation verified on both algorithms' final
            checkpoints and the class whose probability it moves (default: ``Shift(0, 1)`` and
            each image's own label).
        model_fn: builds the untrained module each checkpoint is loaded into.

    Returns the :class:`~lightning_tda.modeldiff.pipeline.ModelDiffReport`: 3 directions per
    algorithm with 6 top images each, the noise floor, and the verification.
    """
    stores_a, stores_b = list(stores_a), list(stores_b)
    if not stores_a or not stores_b:
        raise ValueError("stores_a and stores_b must each hold at least 2 RunStores (one per model)")
    train, test = recorded_digits(stores_a + stores_b, split_seed=split_seed)
    return compare_algorithms(
        stores_a, stores_b, train, test, names=names, transform=transform if transform is not None else Shift(0, 1),
        target_class=target_class, model_fn=model_fn, fast=True, seed=seed,
    )


__all__ = ["digits_classifier", "digits_model_diff", "recorded_digits"]
