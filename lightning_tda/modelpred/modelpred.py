"""``ModelPred.fit(x, y)``: the one-call entry point, and the fitted predictor it returns.

``fit`` samples training pairs (permutation prefixes and random-size subsets, solved exactly and
batched), holds out fresh subsets for validation, trains :class:`ModelPredModule` with a
Lightning ``Trainer`` (progress bar, early stopping on the validation MSE, best weights kept) and
returns a :class:`ModelPred`:

- ``predict_params(masks [m, n]) -> [m, P]``: every subset's predicted parameters in one call;
- ``solve(masks)``: the exact solutions (the target's batched solver);
- ``logits(theta, x)``: any parameters' class scores on any inputs.

``save(path)`` / ``ModelPred.load(path)`` write and read it without pickle (safetensors + JSON).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.modelpred.module import ModelPredModule
from lightning_tda.modelpred.network import POOLINGS
from lightning_tda.modelpred.pairs import TrainingPairs, make_pairs, sample_masks
from lightning_tda.modelpred.targets import TARGETS, Array, Target, as_features, as_labels, data_fingerprint, make_target

_STATE_FILE = "modelpred.safetensors"
_META_FILE = "modelpred.json"


@dataclasses.dataclass(frozen=True)
class ModelPredSettings:
    """Settings of :meth:`ModelPred.fit`; the defaults work on digits and breast-cancer.

    Attributes:
        target: "logistic" (multinomial/binary logistic regression) or "svm" (squared hinge).
        C: the target's inverse regularisation strength.
        num_permutations, prefixes_per_permutation: permutation-prefix training subsets.
        num_random_subsets: random-size training subsets.
        num_validation_subsets: held-out subsets (half prefixes, half random) for early stopping.
        min_size: smallest training subset.
        hidden, set_features: set network widths.
        pooling: "sum+mean" (rho sees the scaled sum of the embeddings, their mean and the log set
            size) or "sum" (the sum alone); :class:`~lightning_tda.modelpred.network.SetNetwork`.
            "sum+mean" is the default: on two tuning splits of digits no fit stopped on the early
            plateau (relative error 0.23 / 0.24 against 0.39 / 0.39 with "sum"), for 3% more on
            breast-cancer (``benchmarks/RESULTS.md``).
        lambda_global, lambda_local: regulariser weights (see :mod:`~lightning_tda.modelpred.module`).
        learning_rate, weight_decay, batch_size, max_epochs, patience: training.
        seed: seeds the subsets and the network initialisation.
    """

    target: str = "logistic"
    C: float = 1.0
    num_classes: int | None = None
    num_permutations: int = 64
    prefixes_per_permutation: int = 16
    num_random_subsets: int = 1024
    num_validation_subsets: int = 256
    min_size: int = 1
    hidden: int = 128
    set_features: int = 128
    pooling: str = "sum+mean"
    lambda_global: float = 1.0
    lambda_local: float = 1.0
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 300
    patience: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {self.target!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        positive = ("num_validation_subsets", "hidden", "set_features", "batch_size", "max_epochs", "patience", "min_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_permutations", "prefixes_per_permutation", "num_random_subsets"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_permutations * self.prefixes_per_permutation + self.num_random_subsets < 1:
            raise ValueError("no training subsets: raise num_random_subsets or num_permutations * prefixes_per_permutation")


class _KeepBest(L.Callback):
    """Keeps the weights of the epoch with the lowest validation MSE and the per-epoch history."""

    def __init__(self, monitor: str = "val/mse") -> None:
        self.monitor = monitor
        self.best = float("inf")
        self.state: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        self.history.append({"epoch": trainer.current_epoch, **metrics})
        value = metrics.get(self.monitor, float("inf"))
        if value < self.best:
            self.best = value
            self.state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


class ModelPred:
    """A fitted ModelPred: predicts the target model trained on any subset of the pool.

    Build one with :meth:`fit` (or :meth:`load`). ``module`` is the trained
    :class:`ModelPredModule`; ``validation`` the held-out pairs; ``history`` one dict of metrics
    per epoch.
    """

    def __init__(self, module: ModelPredModule, settings: ModelPredSettings, validation: TrainingPairs | None = None, history: list[dict[str, float]] | None = None) -> None:
        self.module = module.eval()
        self.settings = settings
        self.validation = validation
        self.history = history or []
        self._embedded: tuple[tuple[int, ...], Tensor] | None = None

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        x: Array,
        y: Array,
        target: str = "logistic",
        seed: int = 0,
        progress: bool = True,
        trainer_kwargs: dict[str, Any] | None = None,
        pairs: TrainingPairs | None = None,
        **settings: Any,
    ) -> "ModelPred":
        """Fit ModelPred on the pool ``(x [n, d], y [n])`` (see the module docstring).

        Args:
            x, y: the training pool: features (raw inputs or recorded embeddings) and labels.
            target: "logistic" or "svm".
            seed: seeds subsets and network initialisation.
            progress: show progress bars (exact solves, training).
            trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. ``accelerator``).
            pairs: training pairs solved already (skips sampling and solving; e.g. an ablation
                that trains several networks on the same pairs).
            **settings: any field of :class:`ModelPredSettings`.
        """
        unknown = set(settings) - {f.name for f in dataclasses.fields(ModelPredSettings)}
        if unknown:
            raise TypeError(f"unknown ModelPred settings {sorted(unknown)}; see ModelPredSettings")
        config = ModelPredSettings(target=target, seed=seed, **settings)
        tgt = make_target(config.target, x, y, num_classes=config.num_classes, C=config.C)
        if pairs is None:
            masks = sample_masks(tgt.n, config.num_permutations, config.prefixes_per_permutation, config.num_random_subsets, config.seed, config.min_size)
            pairs = make_pairs(tgt, masks, progress=progress)
        elif pairs.thetas.shape[1] != tgt.num_params or pairs.masks.shape[1] != tgt.n:
            raise ValueError(f"pairs are for {pairs.masks.shape[1]} examples and {pairs.thetas.shape[1]} parameters; this target has {tgt.n} and {tgt.num_params}")
        half = config.num_validation_subsets // 2
        val_masks = sample_masks(tgt.n, max(1, half // 8), 8, config.num_validation_subsets - 8 * max(1, half // 8), config.seed + 1_000_003, config.min_size)
        validation = make_pairs(tgt, val_masks, progress=progress)
        return cls.train(tgt, pairs, validation, config, progress=progress, trainer_kwargs=trainer_kwargs)

    @classmethod
    def train(
        cls,
        target: Target,
        pairs: TrainingPairs,
        validation: TrainingPairs,
        settings: ModelPredSettings,
        progress: bool = True,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> "ModelPred":
        """Train the set network on given pairs (what :meth:`fit` does after solving them)."""
        L.seed_everything(settings.seed, verbose=False)
        thetas = pairs.thetas.to(torch.float32)
        module = ModelPredModule(
            target, thetas.mean(0), thetas.std(0) if len(thetas) > 1 else torch.ones(target.num_params),
            hidden=settings.hidden, set_features=settings.set_features, pooling=settings.pooling, lambda_global=settings.lambda_global,
            lambda_local=settings.lambda_local, learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        )
        generator = torch.Generator().manual_seed(settings.seed)
        train_loader = DataLoader(TensorDataset(pairs.masks.to(torch.float32), thetas), batch_size=settings.batch_size, shuffle=True, generator=generator)
        val_loader = DataLoader(TensorDataset(validation.masks.to(torch.float32), validation.thetas.to(torch.float32)), batch_size=max(settings.batch_size, 256))
        keep = _KeepBest()
        kwargs: dict[str, Any] = {
            "max_epochs": settings.max_epochs,
            "callbacks": [keep, L.pytorch.callbacks.EarlyStopping(monitor="val/mse", patience=settings.patience)],
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": progress,
            "num_sanity_val_steps": 0,
            "accelerator": "cpu",
            "devices": 1,
        }
        kwargs.update(trainer_kwargs or {})
        trainer = L.Trainer(**kwargs)
        trainer.fit(module, train_loader, val_loader)
        return cls(module.cpu(), settings, validation, keep.history)

    # ------------------------------------------------------------------ predicting
    @property
    def target(self) -> Target:
        return self.module.target

    def check_masks(self, masks: Any) -> Tensor:
        """Masks ``[m, n]`` (bool or non-negative weights) as float32, refusing empty subsets."""
        return self.target.check_weights(masks).to(torch.float32)

    def embedded_pool(self) -> Tensor:
        """``phi`` of every pool example ``[n, set_features]``: the same for every subset, so
        computed once and kept until the set network's weights change (an optimiser step or
        ``load_state_dict`` bumps their version)."""
        net = self.module.network
        key = tuple(p._version for p in net.phi.parameters()) + tuple(p.data_ptr() for p in net.phi.parameters())
        if self._embedded is None or self._embedded[0] != key:
            with torch.no_grad():
                self._embedded = (key, net.embed(self.module.elements))
        return self._embedded[1]

    @torch.no_grad()
    def predict_params(self, masks: Any, chunk_size: int = 4096) -> Tensor:
        """Predicted parameters ``[m, P]`` (float32) of the model trained on each subset
        ``masks [m, n]``: ``phi`` of the pool (cached, :meth:`embedded_pool`), then one product
        and one pass of ``rho`` per chunk of subsets."""
        weights = self.check_masks(masks)
        net, module = self.module.network, self.module
        embedded = self.embedded_pool()
        out = [net.rho(net.pool(w, embedded)) * module.theta_std + module.theta_mean for w in weights.split(chunk_size)]
        return torch.cat(out)

    def solve(self, masks: Any, **kwargs: Any) -> Tensor:
        """Exact solutions ``[m, P]`` (float64) of the subsets (the target's batched solver)."""
        return self.target.solve(masks, **kwargs)

    def logits(self, theta: Array, x: Array) -> Tensor:
        """Class scores ``[..., n, K]`` of parameters ``theta [..., P]`` on inputs ``x [n, d]``."""
        return self.target.logits(theta, x)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the predictor to directory ``path`` (safetensors + JSON, never pickle)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"module.{k}": v.contiguous() for k, v in self.module.state_dict().items()}
        tensors["pool.x"], tensors["pool.y"] = self.target.x.contiguous(), self.target.y.contiguous()
        save_file(tensors, str(out / _STATE_FILE))
        meta = {"settings": dataclasses.asdict(self.settings), "target": self.target.describe(), "history": self.history}
        tmp = out / f".{_META_FILE}.partial"
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(tmp, out / _META_FILE)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], target: str | None = None, x: Array | None = None, y: Array | None = None) -> "ModelPred":
        """Read a predictor written by :meth:`save`.

        ``target``, ``x`` and ``y``, when given, are checked against what was saved: a different
        target, features of another width, or another pool (its SHA-256) raise ValueError.
        """
        src = Path(path)
        if not (src / _META_FILE).exists():
            raise FileNotFoundError(f"no saved ModelPred at {src} ({_META_FILE} missing); save one with ModelPred.save(path)")
        meta = json.loads((src / _META_FILE).read_text(encoding="utf-8"))
        saved = meta["target"]
        if target is not None and target != saved["target"]:
            raise ValueError(f"{src} holds a ModelPred for target {saved['target']!r}, not {target!r}; load it with target={saved['target']!r} or fit a new one")
        tensors = load_file(str(src / _STATE_FILE))
        settings = ModelPredSettings(**{"pooling": "sum", **meta["settings"]})  # saved before pooling was a setting: sum
        tgt = make_target(saved["target"], tensors["pool.x"], tensors["pool.y"], num_classes=saved["num_classes"], C=saved["C"])
        if data_fingerprint(tgt.x, tgt.y) != saved["data_sha256"]:
            raise ValueError(f"{src} is damaged: its pool does not match its recorded SHA-256; save it again")
        if x is not None:
            xt = as_features(x)
            if xt.shape[1] != tgt.num_features:
                raise ValueError(
                    f"the features given have {xt.shape[1]} columns but {src} was fitted on {tgt.num_features} "
                    f"(target {saved['target']!r}); pass the features it was fitted on"
                )
            yt = as_labels(y if y is not None else tgt.y[: len(xt)] if len(xt) == tgt.n else np.zeros(len(xt), dtype=np.int64), len(xt))
            given = data_fingerprint(xt, yt)
            if given != saved["data_sha256"]:
                raise ValueError(
                    f"the pool given (sha256 {given[:12]}) is not the one {src} was fitted on (sha256 {saved['data_sha256'][:12]}); "
                    "pass the same features and labels in the same order"
                )
        state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        module = ModelPredModule(
            tgt, state["theta_mean"], state["theta_std"], hidden=settings.hidden, set_features=settings.set_features, pooling=settings.pooling,
            lambda_global=settings.lambda_global, lambda_local=settings.lambda_local,
            learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        )
        module.load_state_dict(state)
        return cls(module, settings, None, meta.get("history", []))


__all__ = ["ModelPred", "ModelPredSettings"]
