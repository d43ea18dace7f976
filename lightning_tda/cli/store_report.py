"""One RunStore in a report: what it holds, accuracy and margins over training, the hardest
examples and, with gradients, the highest self-influence."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_tda.callbacks.margin_recorder import read_margins
from lightning_tda.cli.datasets import store_dataset
from lightning_tda import schema
from lightning_tda.store import RunStore


def _margin_splits(store: RunStore) -> list[str]:
    records = store.manifest[schema.RECORDS].get(schema.MARGIN_RECORDS, [])
    splits: list[str] = []
    for record in records:
        for split in record.get(schema.SPLITS, []):
            if split not in splits and store.has_array(schema.record_array(schema.MARGINS, split)):
                splits.append(split)
    return splits


def log_store(reporter: Any, store: RunStore, max_images: int = 16) -> dict[str, float]:
    """Log what ``store`` holds to ``reporter`` (its own section); returns the final metrics."""
    manifest = store.manifest
    name = manifest.get("run_name") or store.path.rstrip("/").rsplit("/", 1)[-1]
    reporter.section(f"Run {name}", store.summary())
    model = manifest.get("model") or {}
    info = [
        ["path", store.path], ["run id", manifest.get("run_id")], ["model", model.get("class")],
        ["parameters", model.get("num_parameters")], ["checkpoints", len(store.checkpoint_tags())],
        *[[f"{split} examples", fp.get("size")] for split, fp in sorted(manifest["fingerprints"].items())],
    ]
    reporter.log_table(f"{_key(name)}_run", ["field", "value"], [[k, "" if v is None else str(v)] for k, v in info])
    metrics: dict[str, float] = {}
    splits = _margin_splits(store)
    if splits:
        fig = Figure(figsize=(9, 3.2))
        acc_ax, margin_ax = fig.subplots(1, 2)
        for split in splits:
            values, records = read_margins(store, split)
            if not len(records):
                continue
            steps = [r["global_step"] for r in records]
            flat = values.reshape(len(records), values.shape[1], -1)  # ensembles: one column per copy
            accuracy = (flat > 0).mean(axis=(1, 2))  # the margin is positive exactly when the prediction is right
            acc_ax.plot(steps, accuracy, marker="o", label=split)
            margin_ax.plot(steps, np.median(flat, axis=(1, 2)), marker="o", label=split)
            metrics[f"{_key(name)}/{split}_accuracy"] = float(accuracy[-1])
            metrics[f"{_key(name)}/{split}_median_margin"] = float(np.median(flat[-1]))
            if split == splits[-1]:
                _log_hardest(reporter, store, name, split, flat[-1].mean(axis=1), max_images)
        acc_ax.set(xlabel="global step", ylabel="accuracy (margin > 0)", title="accuracy over training")
        margin_ax.set(xlabel="global step", ylabel="median margin", title="margins over training")
        acc_ax.legend()
        margin_ax.legend()
        fig.tight_layout()
        reporter.log_figure(f"{_key(name)}_training", fig)
    if metrics:
        reporter.log_metrics(metrics)
    if manifest[schema.RECORDS].get(schema.GRADIENT_RECORDS) and schema.TRAIN_SPLIT in manifest[schema.FINGERPRINTS]:
        _log_self_influence(reporter, store, name, max_images)
    return metrics


def _key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "run"


def _log_hardest(reporter: Any, store: RunStore, name: str, split: str, margins: np.ndarray, max_images: int) -> None:
    order = np.argsort(margins)[:max_images]
    dataset = store_dataset(store, split, required=False)
    images = getattr(dataset, "images", None)
    if images is not None:
        labels = dataset.targets.numpy()  # type: ignore[union-attr]
        reporter.note(f"The {split} examples with the lowest final margin (hardest or mislabelled):")
        reporter.log_image_grid(
            f"{_key(name)}_hardest_{split}", images[order].numpy(), [f"#{i} y={labels[i]} m={margins[i]:.1f}" for i in order]
        )
    else:
        reporter.log_table(f"{_key(name)}_hardest_{split}", ["index", "margin"], [[int(i), float(margins[i])] for i in order])


def _log_self_influence(reporter: Any, store: RunStore, name: str, max_images: int) -> None:
    from lightning_tda.attribution import self_influence

    try:
        values = self_influence(store, split="train")
    except (ValueError, KeyError) as err:  # e.g. gradients recorded without a train split
        reporter.note(f"self-influence not computed: {err}")
        return
    order = np.argsort(-values)[:max_images]
    dataset = store_dataset(store, "train", required=False)
    images = getattr(dataset, "images", None)
    reporter.note("Training examples with the highest TRAK self-influence (likely mislabelled or memorised):")
    if images is not None:
        labels = dataset.targets.numpy()  # type: ignore[union-attr]
        reporter.log_image_grid(f"{_key(name)}_self_influence", images[order].numpy(), [f"#{i} y={labels[i]}" for i in order])
    else:
        reporter.log_table(f"{_key(name)}_self_influence", ["index", "self_influence"], [[int(i), float(values[i])] for i in order])
