"""Every name of a RunStore's layout: manifest keys, record kinds, record fields and array names.

Recorders, the store, scorers, sweeps, datamodels and benchmarks import these names; none of them
spells one itself, so a layout change is made here once. The layout (see :mod:`lightning_tda.store`)::

    manifest.json
        schema_version, library_version, run_id, run_name, algorithm, seed,
        fingerprints {split: {size, labels_sha256}}, model, projection,
        records {margins: [record...], grads: [record...]},   a record: tag, index, epoch,
                                                              global_step, splits, output, ...
        checkpoints {tag: {epoch, global_step, learning_rates}},
        sweep {settings}, scores {<scorer>/<test split>: {settings, sources, fingerprints}}
    arrays/
        margins/<split> | outputs/<split>, losses/<split>, preds/<split>, embeddings/<split>,
        logits/<split>                        [n_records, n_examples, ...]   (MarginRecorder)
        grads/<split>/<tag>                   [n_examples, k]                (GradientRecorder)
        out_to_loss/<split>/<tag>             [n_examples]
        sweep/masks, sweep/<split>            [n_models, n_examples]         (SubsetSweep)
        scores/<scorer>/<test split>          [n_test, n_train] in tiles     (attribution scorers)
        scoring/<scorer>/<test split>/...     a scoring's work arrays (kept until it is complete)

Names that become paths (splits, tags, run names) are validated by :func:`validate_name`.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- manifest keys
SCHEMA_VERSION = "schema_version"
LIBRARY_VERSION = "library_version"
RUN_ID = "run_id"
RUN_NAME = "run_name"
ALGORITHM = "algorithm"
SEED = "seed"
FINGERPRINTS = "fingerprints"
MODEL = "model"
PROJECTION = "projection"
RECORDS = "records"
CHECKPOINTS = "checkpoints"
SWEEP = "sweep"
SCORES = "scores"

# ---------------------------------------------------------------- record kinds (keys of manifest[RECORDS])
MARGIN_RECORDS = "margins"
GRADIENT_RECORDS = "grads"

# ---------------------------------------------------------------- fields of a dataset fingerprint
FINGERPRINT_SIZE = "size"
FINGERPRINT_LABELS = "labels_sha256"

# ---------------------------------------------------------------- fields of a record / checkpoint entry
TAG = "tag"
INDEX = "index"
EPOCH = "epoch"
GLOBAL_STEP = "global_step"
SPLITS = "splits"
OUTPUT = "output"
LEARNING_RATES = "learning_rates"
LEARNING_RATE_COLUMNS = "learning_rate_columns"
"""``[[start, stop, lr], ...]``: the learning rate of each range of projected-feature columns
(``lr`` is None where one range mixes parameters trained at different rates)."""

# ---------------------------------------------------------------- fields of a scoring (manifest[SCORES][key])
SCORER = "scorer"
SETTINGS = "settings"
TRAIN_SPLIT_FIELD = "train_split"
TEST_SPLIT_FIELD = "test_split"
SOURCES = "sources"
"""``[[store path, record tag, global step], ...]``: the checkpoints a scoring used."""
SHAPE = "shape"
COMPLETE = "complete"
TRAIN_ROLE, TEST_ROLE = "train", "test"
"""Keys of a scoring's ``fingerprints``: the training and the test dataset."""

# ---------------------------------------------------------------- array prefixes
MARGINS = "margins"
OUTPUTS = "outputs"
LOSSES = "losses"
PREDS = "preds"
EMBEDDINGS = "embeddings"
LOGITS = "logits"
GRADS = "grads"
OUT_TO_LOSS = "out_to_loss"
SWEEP_MASKS_NAME = "masks"
SCORING_WORK = "scoring"

# ---------------------------------------------------------------- split names
TRAIN_SPLIT = "train"
"""The training set's split name (a sweep's masks index it; scorers' default train split)."""

# ---------------------------------------------------------------- output names
OUTPUT_MARGIN = "margin"
OUTPUT_LOSS = "loss"
OUTPUT_PROBABILITY = "correct_class_probability"
OUTPUT_CUSTOM = "custom"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


def validate_name(name: str, what: str = "name") -> str:
    """Check a name that becomes part of a path (split, run name, checkpoint tag)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and '_', '.', '=', '+', '-' only, "
            "starting with a letter or digit (no path separators, no '..')"
        )
    return name


def join_name(*parts: str) -> str:
    """Join validated parts into an array name such as ``margins/train``."""
    return "/".join(validate_name(p, "array name part") for p in parts)


def gradients_array(split: str, tag: str) -> str:
    """``grads/<split>/<tag>``: projected per-example gradients of one record."""
    return join_name(GRADS, split, tag)


def out_to_loss_array(split: str, tag: str) -> str:
    """``out_to_loss/<split>/<tag>``: the out-to-loss terms of one gradient record."""
    return join_name(OUT_TO_LOSS, split, tag)


def record_array(prefix: str, split: str) -> str:
    """``<prefix>/<split>`` for the MarginRecorder's arrays (margins, outputs, losses, preds, embeddings)."""
    return join_name(prefix, split)


def sweep_masks_array() -> str:
    """``sweep/masks``: which training examples each subset model was trained on."""
    return join_name(SWEEP, SWEEP_MASKS_NAME)


def sweep_outputs_array(split: str) -> str:
    """``sweep/<split>``: every subset model's output on every example of ``split``."""
    if split == SWEEP_MASKS_NAME:
        raise ValueError(f"{SWEEP_MASKS_NAME!r} cannot be a sweep's split name (it names the masks array)")
    return join_name(SWEEP, split)


def scores_key(scorer: str, test_split: str) -> str:
    """``<scorer>/<test split>``: the key of a scoring in ``manifest[SCORES]``."""
    return join_name(scorer, test_split)


def scores_array(scorer: str, test_split: str) -> str:
    """``scores/<scorer>/<test split>``: a scorer's scores ``[n_test, n_train]``."""
    return join_name(SCORES, scorer, test_split)


def scoring_work_array(scorer: str, test_split: str, *parts: str) -> str:
    """``scoring/<scorer>/<test split>/...``: a scoring's work arrays (per-checkpoint kernels, ...)."""
    return join_name(SCORING_WORK, scorer, test_split, *parts)
