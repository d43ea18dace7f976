"""``lightning-tda sweep``: a subset sweep (datamodels / LDS ground truth) scaled out with
Lightning's own launchers.

``--trainer.devices D --trainer.num_nodes N`` start ``D x N`` processes the way Lightning does
(Fabric: its own launcher on one machine, or the ranks ``torchrun``, SLURM or MPI started). Each
rank trains the sweep's blocks ``b`` with ``b % world_size == rank`` on its own device and writes
them as disjoint rows of one store, on a shared filesystem or any fsspec URL. Every block depends
only on ``(seed, block)``, so the store equals one process's, and a killed sweep resumes by
training only its unfinished blocks. No scheduler of our own: rank, world size and rendezvous are
Lightning's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L


@dataclass
class TrainerOptions:
    """Where the sweep runs (the Lightning Trainer's names)."""

    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "cpu"
    devices: int = 1
    num_nodes: int = 1


def sweep(
    store: str,
    num_models: int = 64,
    alpha: float = 0.5,
    seed: int = 0,
    models_per_block: int = 16,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    model: Literal["cnn", "mlp"] = "cnn",
    n_train: int | None = None,
    trainer: TrainerOptions = TrainerOptions(),  # noqa: B008 (jsonargparse reads the default)
) -> Path:
    """Train models on random alpha-subsets of digits and record their margins (a SubsetSweep).

    The ground truth of the linear datamodeling score (``lightning-tda lds``) and of datamodels.
    Run it on several devices or machines with ``--trainer.devices`` / ``--trainer.num_nodes``
    (under torchrun or SLURM on a cluster); each rank trains its own blocks of models into the
    one store.

    Args:
        store: the sweep's RunStore (created; a rerun with the same settings resumes it).
        num_models: subset models to train.
        alpha: fraction of the training set each model sees.
        seed: the sweep's seed (masks, initialisations, batch orders).
        models_per_block: models trained at once on one device (one row block of the store).
        epochs: training epochs per model.
        batch_size: examples per step.
        lr: SGD learning rate (momentum 0.9).
        model: the digits CNN or an MLP.
        n_train: use only the first n_train training digits (all by default).
        trainer: --trainer.accelerator, --trainer.devices, --trainer.num_nodes.
    """
    from lightning_tda.data import DigitsDataModule
    from lightning_tda.models import MLP, DigitsCNN
    from lightning_tda.sweep import SubsetSweep, sweep_progress

    for name, value in (("num_models", num_models), ("models_per_block", models_per_block), ("epochs", epochs),
                        ("batch_size", batch_size), ("trainer.devices", trainer.devices), ("trainer.num_nodes", trainer.num_nodes)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not 0 < alpha <= 1:
        raise ValueError(f"--alpha must be in (0, 1], got {alpha}")
    if n_train is not None and n_train < 2:
        raise ValueError(f"--n_train must be >= 2, got {n_train}")
    world = trainer.devices * trainer.num_nodes
    fabric = L.Fabric(
        accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
        strategy="ddp" if world > 1 else "auto",
    )
    fabric.launch()
    dm = DigitsDataModule(n_train=n_train)
    model_fn = DigitsCNN if model == "cnn" else (lambda: MLP(64, 64, 10))
    on_gpu = fabric.device.type == "cuda"
    shard = SubsetSweep(
        store, model_fn=model_fn, train_dataset=dm.recording_dataset("train"),
        eval_datasets={"val": dm.recording_dataset("val")}, num_models=num_models, alpha=alpha, seed=seed,
        models_per_block=models_per_block, epochs=epochs, batch_size=batch_size, lr=lr,
        shard_index=fabric.global_rank, num_shards=fabric.world_size, progress=fabric.global_rank == 0,
        trainer_kwargs={"accelerator": "gpu" if on_gpu else "cpu", "devices": [fabric.device.index] if on_gpu else 1},
    )
    if fabric.global_rank == 0:  # one process writes the manifest (any fsspec store)
        shard.prepare()
    fabric.barrier()
    shard.run()
    fabric.barrier()
    if fabric.global_rank == 0:
        done, total = sweep_progress(shard.store)  # type: ignore[arg-type]
        print(f"sweep: {done}/{total} models complete in {shard.store.path} ({fabric.world_size} rank(s))")  # type: ignore[union-attr]
    return Path(store)
