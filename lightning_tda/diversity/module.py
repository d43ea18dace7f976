"""``EnsembleDiversity``: run a list of trained models over a dataset and compare them.

A LightningModule, so the models run where Lightning puts them (devices, precision, DDP). Its
``test`` takes one or two dataloaders: the first is the evaluation split, the second (optional)
the held-out split the temperatures are fitted on; without a second one, ``held_out_fraction`` of
the evaluation examples is set aside. After ``trainer.test`` the result is in ``.result`` (the
temperature-scaled logits behind it in ``.outputs``);
:meth:`EnsembleDiversity.evaluate` does all of that in one call, and
:meth:`EnsembleDiversity.from_stores` reads recorded logits instead of running models.

Under DDP each rank runs its share of the examples; the logits are gathered in dataset order
before the analysis (every rank computes the same result), which needs Lightning's default
distributed sampler for test dataloaders (``use_distributed_sampler=True``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_tda.data import BatchFn, BatchParser
from lightning_tda.diversity.analysis import (
    CalibratedOutputs,
    DiversitySettings,
    HeldOut,
    calibrate,
    diversity_of,
    split_held_out,
)
from lightning_tda.diversity.categories import check_descriptions
from lightning_tda.diversity.result import DiversityResult
from lightning_tda.diversity.stores import StoreLike, read_store_outputs

__all__ = ["EnsembleDiversity"]


def _models(models: Sequence[nn.Module] | Mapping[str, nn.Module], names: Sequence[str] | None) -> tuple[list[nn.Module], list[str]]:
    if isinstance(models, nn.Module):
        raise TypeError("models must be a sequence (or a name -> module mapping) of at least 2 modules, got one module")
    if isinstance(models, Mapping):
        if names is not None:
            raise ValueError("pass names either as the keys of a mapping of models or as names=, not both")
        names, models = [str(k) for k in models], list(models.values())
    models = list(models)
    bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"every model must be a torch.nn.Module, got {bad}")
    if len(models) < 2:
        raise ValueError(f"diversity compares models pairwise: pass at least 2 models, got {len(models)}")
    names = [f"model_{m}" for m in range(len(models))] if names is None else [str(n) for n in names]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"need one unique name per model ({len(models)}), got {names}")
    return models, names


class EnsembleDiversity(L.LightningModule):
    """Compare trained classifiers: pairwise metrics, temperature-scaled pair ensembles, pairs
    grouped by what differs (module docstring for the splits).

    Args:
        models: M >= 2 trained classifiers returning logits ``[batch, C]`` (a sequence, or a
            mapping name -> module).
        names: one per model (default ``model_0``, ... or the mapping's keys).
        descriptions: per model, its factors (``{"seed": 0, "architecture": "cnn"}``; keys from
            ``settings.category_order``); a pair's category is its most divergent difference.
        settings: :class:`~lightning_tda.diversity.analysis.DiversitySettings`.
        held_out_fraction: share of the evaluation examples set aside for temperature scaling
            when ``test`` gets no second (held-out) dataloader.
        batch_fn: ``batch_fn(batch) -> (x, y)`` for other batch layouts.
    """

    def __init__(
        self,
        models: Sequence[nn.Module] | Mapping[str, nn.Module],
        names: Sequence[str] | None = None,
        descriptions: Sequence[Mapping[str, Any]] | None = None,
        settings: DiversitySettings = DiversitySettings(),
        held_out_fraction: float | None = None,
        batch_fn: BatchFn | None = None,
    ) -> None:
        super().__init__()
        members, self.names = _models(models, names)
        self.members = nn.ModuleList(members)
        if not isinstance(settings, DiversitySettings):
            raise TypeError(f"settings must be a DiversitySettings, got {type(settings).__name__}")
        given = descriptions if descriptions is not None else [{} for _ in members]
        self.descriptions = check_descriptions(given, len(members), settings.category_order)
        missing = sorted(set(settings.anchors) - set(self.names))
        if missing:
            raise ValueError(f"anchors {missing} are not model names ({self.names})")
        self.settings = settings
        self.held_out_fraction = held_out_fraction
        self.parser = BatchParser(batch_fn=batch_fn)
        self.result: DiversityResult | None = None
        self.outputs: CalibratedOutputs | None = None  # the calibrated logits behind the result
        self._collected: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self._fraction: float | None = None  # evaluate(held_out=<fraction>) for one call

    def forward(self, x: Tensor) -> Tensor:
        """Every model's logits on ``x``: ``[M, batch, C]``."""
        outputs = [model(x) for model in self.members]
        for name, out in zip(self.names, outputs):
            if not isinstance(out, Tensor) or out.ndim != 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"model {name!r} returned {shape}; each model must return logits [batch, num_classes]")
        classes = [out.shape[1] for out in outputs]
        if len(set(classes)) > 1:
            shown = ", ".join(f"{n} has {c}" for n, c in zip(self.names, classes))
            raise ValueError(
                f"models with different class counts ({shown} outputs); diversity compares models "
                "of one classification task"
            )
        return torch.stack(outputs)

    # ------------------------------------------------------------------ test / predict
    def on_test_epoch_start(self) -> None:
        self._collected = {}
        self.result = None
        self.outputs = None

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self.parser(batch)
        logits, targets = self._collected.setdefault(dataloader_idx, ([], []))
        logits.append(self(x).detach().float())
        targets.append(y.detach().long())

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Every model's logits on the batch, ``[M, batch, C]``."""
        x, _ = self.parser(batch)
        return self(x)

    def _gathered(self, index: int) -> tuple[Tensor, Tensor]:
        """The logits ``[M, n, C]`` and labels ``[n]`` of test dataloader ``index`` in dataset
        order, gathered from every rank."""
        if index not in self._collected:
            raise ValueError(f"test dataloader {index} gave no batches")
        logits = torch.cat(self._collected[index][0], dim=1)
        target = torch.cat(self._collected[index][1])
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            loader = self.trainer.test_dataloaders[index] if isinstance(self.trainer.test_dataloaders, Sequence) else self.trainer.test_dataloaders
            sampler = getattr(loader, "sampler", None)
            if not isinstance(sampler, DistributedSampler) or getattr(sampler, "shuffle", True):
                raise ValueError(
                    "EnsembleDiversity under DDP needs Lightning's distributed sampler on its test "
                    "dataloaders (Trainer(use_distributed_sampler=True), unshuffled loaders)"
                )
            n = len(loader.dataset)
            # rank r holds examples r, r + W, r + 2W, ... of the padded order
            all_logits = self.all_gather(logits)  # [W, M, L, C]
            all_target = self.all_gather(target)  # [W, L]
            M, C = logits.shape[0], logits.shape[2]
            logits = all_logits.permute(1, 2, 0, 3).reshape(M, -1, C)[:, :n]
            target = all_target.T.reshape(-1)[:n]
        return logits.cpu(), target.cpu()

    def on_test_epoch_end(self) -> None:
        logits, target = self._gathered(0)
        if 1 in self._collected:
            held_out: HeldOut = self._gathered(1)
        else:
            held_out = self._fraction if self._fraction is not None else self.held_out_fraction
        self.outputs = calibrate(logits, target, held_out, self.settings)
        self.result = diversity_of(self.outputs, names=self.names, descriptions=self.descriptions, settings=self.settings)
        self._collected = {}

    # ------------------------------------------------------------------ one-call entry points
    def evaluate(
        self,
        dataset: Dataset,
        held_out: Dataset | float | None = None,
        *,
        batch_size: int = 256,
        trainer: L.Trainer | None = None,
    ) -> DiversityResult:
        """Run the models over ``dataset`` (and the held-out ``held_out``: a dataset, or a
        fraction of ``dataset``'s examples) with ``trainer`` (default: a quiet one-device CPU
        trainer) and return the :class:`DiversityResult`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loaders = [DataLoader(dataset, batch_size=batch_size, shuffle=False)]
        if isinstance(held_out, Dataset):
            loaders.append(DataLoader(held_out, batch_size=batch_size, shuffle=False))
        elif held_out is not None:
            split_held_out(len(dataset), held_out)  # checks the fraction before any model runs
        elif self.settings.temperature_scaling and self.held_out_fraction is None:
            raise ValueError(
                "temperature scaling needs a held-out split, and none was given: pass held_out= "
                "(a dataset no model trained on, or a fraction of the evaluation examples), or "
                "DiversitySettings(temperature_scaling=False)"
            )
        if trainer is None:
            trainer = L.Trainer(
                accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
            )
        self._fraction = None if isinstance(held_out, Dataset) else held_out
        try:
            trainer.test(self, dataloaders=loaders, verbose=False)
        finally:
            self._fraction = None
        if self.result is None:
            raise RuntimeError(
                "the test ran in other processes (ddp_spawn), whose result does not come back; "
                "run trainer.test(module, dataloaders=[evaluation, held_out]) under strategy='ddp' "
                "(each rank then holds .result), or evaluate in one process"
            )
        return self.result

    @classmethod
    def from_stores(
        cls,
        stores: Sequence[StoreLike],
        labels: Tensor | np.ndarray | Dataset,
        *,
        split: str = "val",
        held_out: float | str | None = None,
        held_out_labels: Tensor | np.ndarray | Dataset | None = None,
        record: int = -1,
        names: Sequence[str] | None = None,
        descriptions: Sequence[Mapping[str, Any]] | None = None,
        settings: DiversitySettings = DiversitySettings(),
    ) -> DiversityResult:
        """The :class:`DiversityResult` of recorded runs, without running any model.

        Reads each store's logits of ``split`` (``MarginRecorder(..., logits=True)``; an
        ensemble store gives one model per copy). Stores of different datasets are refused (both
        paths named), and ``labels`` (the split's dataset or labels, in order) must match their
        fingerprint. ``held_out``: a fraction of ``split``'s examples, or another recorded split
        (with ``held_out_labels``), for temperature scaling.
        """
        outputs = read_store_outputs(stores, split, labels, record=record, names=names, descriptions=descriptions)
        held: HeldOut
        if isinstance(held_out, str):
            other = read_store_outputs(stores, held_out, held_out_labels, record=record)
            held = (other.logits, other.target)
        else:
            held = held_out
        calibrated = calibrate(outputs.logits, outputs.target, held, settings)
        return diversity_of(calibrated, names=outputs.names, descriptions=outputs.descriptions, settings=settings)
