"""Stores laid out as GradientRecorder writes them, with known random features (test helper)."""

from __future__ import annotations

import numpy as np

from lightning_tda import schema
from lightning_tda.store import RunStore

FINGERPRINTS = {"train": {"size": 12, "labels_sha256": "a" * 64}, "val": {"size": 5, "labels_sha256": "b" * 64}}


def fake_gradient_store(
    path, records, n_train=12, n_test=5, k=7, seed=0, output="margin", lr_columns=None, fingerprints=None,
    dtype="float32", block_rows=4,
):
    """``records``: ``[(tag, lr, step), ...]``; ``lr`` a float (one rate) or None (no rate recorded).
    ``lr_columns``: the record's ``[[start, stop, lr], ...]`` (default: none, as older records).
    Returns the store and, per record, ``{split: (phi, q)}`` as the scorers read them (float64)."""
    g = np.random.default_rng(seed)
    store = RunStore.create(path)
    prints = dict(fingerprints or FINGERPRINTS)
    prints["train"] = {**prints["train"], "size": n_train}
    prints["val"] = {**prints["val"], "size": n_test}
    for split, fp in prints.items():
        store.set_fingerprint(split, fp)
    entries, truth = [], []
    for i, (tag, lr, step) in enumerate(records):
        feats = {"train": g.normal(size=(n_train, k)), "val": g.normal(size=(n_test, k))}
        qs = {"train": g.uniform(0.05, 0.95, n_train), "val": g.uniform(0.05, 0.95, n_test)}
        for split in ("train", "val"):
            n = len(feats[split])
            q_name, name = schema.out_to_loss_array(split, tag), schema.gradients_array(split, tag)
            store.ensure_array(q_name, (n,), "float32", block_rows=block_rows)
            store.ensure_array(name, (n, k), dtype, block_rows=block_rows)
            for start in range(0, n, block_rows):
                store.write_block(q_name, start, qs[split][start:start + block_rows])
                store.write_block(name, start, feats[split][start:start + block_rows])
        entry = {"tag": tag, "index": i, "epoch": i, "global_step": step, "splits": ["train", "val"], "output": output}
        if lr is not None:
            entry["learning_rates"] = [[lr]]
        if lr_columns is not None:
            entry["learning_rate_columns"] = lr_columns
        entries.append(entry)
        truth.append({
            s: (feats[s].astype(dtype).astype(np.float64), qs[s].astype(np.float32).astype(np.float64)) for s in feats
        })
    store.update_manifest(lambda m: m["records"].__setitem__("grads", entries))
    return store, truth


def trak_closed_form(truth_by_run, lam_reg):
    """TRAK by its formula: mean over checkpoints of phi_t (Phi^T Phi + lam_reg(phi) I)^-1 Phi^T, times mean q."""
    kernels, qs = [], []
    for truth in truth_by_run:
        for rec in truth:
            (phi, q), (phi_t, _) = rec["train"], rec["val"]
            k = phi.shape[1]
            kernels.append(phi_t @ np.linalg.inv(phi.T @ phi + lam_reg(phi) * np.eye(k)) @ phi.T)
            qs.append(q)
    return np.mean(kernels, 0) * np.mean(qs, 0)[None, :]


def fake_sweep_store(path, n_models=8, n_train=12, n_test=5, fingerprints=None, seed=0):
    """A store laid out as SubsetSweep writes it (masks and val margins), with random values."""
    g = np.random.default_rng(seed)
    store = RunStore.create(path)
    prints = dict(fingerprints or FINGERPRINTS)
    for split, fp in prints.items():
        store.set_fingerprint(split, fp)
    masks, margins = g.random((n_models, n_train)) < 0.5, g.normal(size=(n_models, n_test)).astype(np.float32)
    store.ensure_array(schema.sweep_masks_array(), masks.shape, "bool", block_rows=n_models)
    store.ensure_array(schema.sweep_outputs_array("val"), margins.shape, "float32", block_rows=n_models)
    store.write_block(schema.sweep_outputs_array("val"), 0, margins)
    store.write_block(schema.sweep_masks_array(), 0, masks)
    return store, masks, margins
