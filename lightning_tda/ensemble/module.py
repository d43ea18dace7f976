"""``EnsembleModule``: M copies of one architecture trained at once by one Lightning fit.

What copy ``m`` is (the definition the tests hold the engine to): a single model, initialised by
``torch.manual_seed(seeds[m]); model_fn()``, trained on **the same stream of batches** the
ensemble receives, whose loss on a batch ``B`` is

.. math::

    L_m(B) = \\frac{\\sum_{i \\in B} \\text{mask}_{m,i}\\, w_{m,i}\\, \\ell(f_m(x_i), y_i)}{Z_m(B)}

with ``mask`` the example masks (subset training; all ones when none), ``w`` the example
weights (further training; ones when none) and the normaliser ``Z_m(B)`` chosen by
``normalization``:

- ``"mask_count"`` (default): the number of the batch's examples in copy ``m``'s subset (at
  least 1), so ``L_m`` is the mean loss over the in-subset examples, and weights multiply it;
- ``"batch_size"``: ``|B|``, as if out-of-subset examples had loss 0;
- ``"weight_sum"``: ``sum_i mask_{m,i} w_{m,i}`` (a weighted mean; 1 where that sum is 0).

Each copy has its own optimizer (:mod:`lightning_tda.ensemble.optim`: the stock ``torch.optim``
on the stacked tensors is exactly M optimizers), and steps on every batch, also one with none of
its examples (its loss is then 0, but momentum and weight decay still act, as in the reference).
With masks, copy ``m`` is thus SGD on its subset in a uniformly shuffled order with batches of
about ``alpha * batch_size`` examples.

Per-copy streams: a batch whose index is 2-d, ``(x [M, b, ...], y [M, b, ...], index [M, b])``
(:func:`~lightning_tda.ensemble.per_copy.per_copy_loader`), gives each copy its own batch: copy
``m`` is trained on row ``m`` with the same loss ``L_m`` (``B`` = its own ``b`` examples). With
the per-copy loader, copy ``m`` is thus a separate training on its subset in batches of exactly
``b`` from its own seeded shuffle (defined in :mod:`lightning_tda.ensemble.per_copy`), with no
masked-out examples to compute on; BatchNorm statistics are then over the copy's own batch.

BatchNorm: supported, with running statistics tracked per copy (each copy's buffers are updated
in place under vmap, exactly as in a separate training). Note that batch statistics in training
mode are computed over the whole shared batch, out-of-subset examples included, so with masks a
copy with BatchNorm is not independent of the examples outside its subset (a warning says so):
for subset sweeps prefer GroupNorm/LayerNorm or no normalisation.

Dropout and other randomness inside the model use ``vmap(randomness="different")``: copies draw
independent masks from the global RNG, so such copies are not equal to separate runs and depend
on ``chunk_size``. Everything else does not depend on ``chunk_size`` (tested).

Memory: ``chunk_size`` runs the copies in chunks (forward and backward per chunk, gradients
accumulated), so activation memory scales with ``chunk_size`` instead of M.

Speed: with masks, most copies train on a fraction of each batch; ``compact_batches`` gathers
each copy's own examples (padded with zero-weight ones to the largest count in the batch), so
with ``alpha = 0.5`` about a third of the work is skipped. It changes no loss, only the order of
floating-point sums; it is off for models with BatchNorm, whose batch statistics would change.

Multi-process: one ensemble under DDP is not tested (gradients would be averaged over ranks, each
rank normalising its own part of the batch). To spread many models over processes or machines,
shard the models instead: separate fits, each on its own rows of the masks and seeds.

Recorders: :meth:`EnsembleModule.forward` returns ``[M, batch, classes]``;
:meth:`EnsembleModule.batch_outputs` gives an output function per copy ``[M, batch]`` and
:meth:`EnsembleModule.outputs` ``[M, n]`` over a dataset (one row per copy).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.data import BatchFn, BatchParser
from lightning_tda.ensemble.augment import Augment, augment_per_copy
from lightning_tda.ensemble.batching import (
    NORMALIZATIONS,
    Normalization,
    check_index,
    compaction_indices,
    example_coefficients,
    take_examples,
)
from lightning_tda.ensemble.data import (
    IndexedBatchFn,
    check_example_weights,
    check_masks,
    parse_indexed_batch,
)
from lightning_tda.ensemble.optim import (
    OPTIMIZERS,
    OptimizerName,
    PerCopyLearningRate,
    build_optimizer,
    clip_grad_norm_per_copy,
)
from lightning_tda.ensemble.stacking import (
    ModelFn,
    Randomness,
    StackedModel,
    build_copies,
    run_vmapped,
)
from lightning_tda.outputs import OutputFn, resolve_output_fn

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs [batch, ...], y [batch, ...]) -> Tensor[batch]`` for one copy."""


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def _infer_num_models(num_models: int | None, *given: Any) -> int:
    """``num_models`` when given, else the length of the first sequence among seeds, masks,
    example weights, per-copy learning rates and a sequence of modules; shapes are checked later."""
    if num_models is None:
        for value in given:
            if isinstance(value, Tensor) and value.ndim > 0 or (
                isinstance(value, Sequence) and not isinstance(value, str)
            ):
                num_models = len(value)
                break
        else:
            raise ValueError("num_models is required (or pass seeds, masks or example_weights)")
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        raise ValueError(f"num_models must be a positive integer, got {num_models!r}")
    return num_models


class EnsembleModule(L.LightningModule):
    """Train M copies of one architecture at once (``vmap(functional_call)`` over stacked
    parameters); the copy-by-copy definition is in the module docstring.

    Args:
        model: ``model_fn() -> nn.Module`` (copy ``m`` = ``torch.manual_seed(seeds[m]);
            model_fn()``); or a template module, copied as it is (``init="copy"``, e.g. replicas
            of a trained model for further training) or re-initialised per seed
            (``init="reset"``: ``reset_parameters()`` of every submodule); or a sequence of M
            modules stacked as given.
        num_models: M (inferred from ``seeds``/``masks``/``example_weights`` when omitted).
        seeds: init seeds, one per copy; an int ``s`` means ``s, s+1, ...``; default ``0..M-1``.
        masks: ``BoolTensor[M, n_train]``: copy ``m`` trains on examples with ``masks[m, i]``.
        example_weights: ``Tensor[M, n_train]``: per-example loss weights of each copy.
        lr: learning rate, or one per copy.
        optimizer: ``"sgd"`` (``momentum``, ``weight_decay``, ``nesterov``), ``"adam"`` or
            ``"adamw"`` (``betas``, ``eps``, ``weight_decay``).
        normalization: the loss normaliser ``Z_m``: ``"mask_count"``, ``"batch_size"`` or
            ``"weight_sum"``.
        loss_fn: per-example loss of one copy, ``(outputs, y) -> [batch]``; cross-entropy by default.
        augment: ``augment(x, generator) -> x`` applied per copy with
            ``augmentation_generator(augmentation_seeds[m], global_step)``.
        augmentation_seeds: one per copy; default ``seeds``.
        chunk_size: copies per vmap call (forward and backward), ``None`` for all at once.
        compact_batches: run each copy only on the batch's examples it trains on (gathered per
            copy, padded to the largest count) when that skips at least 20% of the batch; the
            losses are the same. Ignored (off) for models with BatchNorm, whose batch statistics
            depend on the whole batch; turn it off for other layers that mix examples.
        gradient_clip_norm: clip each copy's gradient norm separately (Trainer's
            ``gradient_clip_val`` is not available in manual optimization, and would mix copies).
        lr_scheduler: ``scheduler_fn(optimizer) -> LRScheduler``, stepped every
            ``lr_scheduler_interval`` ("epoch" or "step").
        randomness: vmap's randomness for dropout and the like ("different", "same", "error").
        batch_fn: ``batch_fn(batch) -> (x, y, index)`` for other batch layouts.
        example_input: a batch of inputs to run once at construction, so an architecture that
            cannot run under vmap fails here with a :class:`StackingError`.

    Checkpoints hold the stacked parameters and buffers, the optimizer (and scheduler) state, the
    masks, example weights and seeds, and the scalar settings; callables (``model``,
    ``loss_fn``, ``augment``, ``lr_scheduler``, ``batch_fn``) are not saved, so pass them again
    to ``load_from_checkpoint`` or to the module you resume with ``Trainer.fit(ckpt_path=...)``.
    The training batch stream is resumable when its sampler has ``set_epoch``
    (:class:`~lightning_tda.ensemble.data.SeededShuffleSampler`, used by ``indexed_loader``).
    """

    def __init__(
        self,
        model: ModelFn | nn.Module | Sequence[nn.Module],
        num_models: int | None = None,
        seeds: Sequence[int] | int | None = None,
        masks: Tensor | None = None,
        example_weights: Tensor | None = None,
        lr: float | Sequence[float] | Tensor = 0.05,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        normalization: Normalization = "mask_count",
        loss_fn: LossFn | None = None,
        augment: Augment | None = None,
        augmentation_seeds: Sequence[int] | None = None,
        chunk_size: int | None = None,
        compact_batches: bool = True,
        gradient_clip_norm: float | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "epoch",
        init: Literal["copy", "reset"] = "copy",
        randomness: Randomness = "different",
        batch_fn: IndexedBatchFn | None = None,
        example_input: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        M = _infer_num_models(num_models, seeds, masks, example_weights, lr, model)
        _choice("optimizer", optimizer, OPTIMIZERS)
        _choice("normalization", normalization, NORMALIZATIONS)
        _choice("lr_scheduler_interval", lr_scheduler_interval, ("step", "epoch"))
        _choice("init", init, ("copy", "reset"))
        _choice("randomness", randomness, ("different", "same", "error"))
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if gradient_clip_norm is not None and not gradient_clip_norm > 0:
            raise ValueError(f"gradient_clip_norm must be > 0, got {gradient_clip_norm}")
        if seeds is None:
            seeds = range(M)
        elif isinstance(seeds, int):
            seeds = range(seeds, seeds + M)
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != M:
            raise ValueError(f"seeds must have num_models={M} entries, got {len(seed_list)}")
        aug_list = seed_list if augmentation_seeds is None else [int(s) for s in augmentation_seeds]
        if len(aug_list) != M:
            raise ValueError(f"augmentation_seeds must have {M} entries, got {len(aug_list)}")

        self.num_models = M
        self.register_buffer("masks", None if masks is None else check_masks(masks, M))
        n_train = None if masks is None else self.masks.shape[1]
        self.register_buffer(
            "example_weights",
            None if example_weights is None else check_example_weights(example_weights, M, n_train),
        )
        self.register_buffer("seeds", torch.tensor(seed_list, dtype=torch.int64))
        self.register_buffer("augmentation_seeds", torch.tensor(aug_list, dtype=torch.int64))

        lrs = torch.as_tensor(lr, dtype=torch.float64).flatten()
        if lrs.numel() not in (1, M):
            raise ValueError(f"lr must be one float or one per copy ({M}), got {lrs.numel()} values")
        rates = PerCopyLearningRate(lrs)  # validates; base_lr is the largest rate
        self.per_copy_lr = rates if bool((lrs != lrs[0]).any()) else None
        base_lr = rates.base_lr

        first, stacked = build_copies(model, M, seed_list, init)
        self.stacked_model = StackedModel(first, stacked, M)
        self.compact = compact_batches and not self.stacked_model.has_batch_norm
        self.loss_fn = loss_fn or _cross_entropy
        self.augment = augment
        self.batch_fn = batch_fn
        self.lr_scheduler_fn = lr_scheduler
        self.save_hyperparameters(
            {
                "num_models": M, "architecture": type(first).__name__, "optimizer": optimizer,
                "lr": base_lr if self.per_copy_lr is None else lrs.tolist(), "base_lr": base_lr,
                "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
                "betas": tuple(betas), "eps": eps, "normalization": normalization,
                "chunk_size": chunk_size, "compact_batches": compact_batches,
                "gradient_clip_norm": gradient_clip_norm,
                "lr_scheduler_interval": lr_scheduler_interval, "init": init,
                "randomness": randomness, "subset_training": masks is not None,
                "weighted": example_weights is not None, "augmented": augment is not None,
            }
        )
        if self.stacked_model.has_batch_norm and masks is not None and not bool(self.masks.all()):
            rank_zero_warn(
                "EnsembleModule: the model has BatchNorm and masks are given; batch statistics "
                "are computed over the whole shared batch, out-of-subset examples included, so a "
                "copy is not independent of the examples outside its subset with a shared batch "
                "stream (use per_copy_loader, whose batches are each copy's own, or GroupNorm or "
                "LayerNorm for subset training)"
            )
        if example_input is not None:
            with torch.no_grad():
                was_training = self.training
                self.eval()
                self.stacked_model(example_input, 0, min(M, 2), randomness=randomness)
                self.train(was_training)

    # ------------------------------------------------------------------------------ copies

    @property
    def n_train(self) -> int | None:
        """Columns of the masks/example weights (the training set's size), when given."""
        for t in (self.masks, self.example_weights):
            if t is not None:
                return int(t.shape[1])
        return None

    def member(self, m: int) -> nn.Module:
        """Copy ``m`` as an ordinary module (detached tensors)."""
        return self.stacked_model.member(m)

    def members(self) -> list[nn.Module]:
        """All copies as ordinary modules."""
        return [self.member(m) for m in range(self.num_models)]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` ranges of copies, ``chunk_size`` at a time."""
        size = self.hparams.chunk_size or self.num_models
        for start in range(0, self.num_models, size):
            yield start, min(start + size, self.num_models)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of every copy on the shared batch ``x``: ``[M, batch, ...]``."""
        randomness = self.hparams.randomness
        return torch.cat([self.stacked_model(x, s, e, randomness=randomness) for s, e in self.chunks()])

    # ------------------------------------------------------------------------------ training

    def example_coefficients(self, index: Tensor | None, batch_size: int) -> Tensor:
        """``[M, batch]`` factors with ``L_m = sum_i coef[m, i] * loss_m(i)``:
        ``mask * weight / Z_m`` (module docstring)."""
        ref = next(self.stacked_model.parameters())
        return example_coefficients(
            index, batch_size, self.num_models, self.masks, self.example_weights,
            self.hparams.normalization, ref.dtype, ref.device,
        )

    def per_example_loss(self, outputs: Tensor, y: Tensor, per_copy_targets: bool = False) -> Tensor:
        """``[m, batch]`` losses of ``m`` copies' outputs ``[m, batch, ...]`` against shared
        targets ``y`` (or one batch of targets per copy)."""
        in_dims = (0, 0 if per_copy_targets else None)
        return run_vmapped(lambda out, yy: self.loss_fn(out, yy), in_dims, "error", outputs, y)

    def compaction(self, coef: Tensor) -> Tensor | None:
        """Each copy's batch positions (:func:`compaction_indices`), or ``None`` when
        ``compact_batches`` is off (or BatchNorm) or there is too little to skip."""
        return compaction_indices(coef) if self.compact else None

    def _chunk_batch(
        self,
        x: Tensor,
        y: Tensor,
        coef: Tensor,
        select: Tensor | None,
        start: int,
        stop: int,
        per_copy_batch: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``(inputs, targets, coef, per_copy_inputs)`` of copies ``start:stop``: the shared
        batch, or one batch per copy when the batch is per copy, augmented and/or compacted."""
        coef = coef[start:stop]
        if per_copy_batch:
            x, y = x[start:stop], y[start:stop]
        per_copy = self.augment is not None or per_copy_batch
        if self.augment is not None:
            seeds = self.augmentation_seeds[start:stop].tolist()
            x = augment_per_copy(self.augment, x, seeds, self.global_step, per_copy_batch)
        if select is None:
            return x, y, coef, per_copy
        select = select[start:stop]
        return take_examples(x, select, per_copy), y[select], coef.gather(1, select), True

    def _check_per_copy_batch(self, x: Tensor, y: Tensor, index: Tensor) -> None:
        """A per-copy batch must hold one row per copy: ``x [M, b, ...]``, ``y [M, b, ...]``."""
        M, b = self.num_models, index.shape[1]
        shapes = {"index": tuple(index.shape), "x": tuple(x.shape[:2]), "y": tuple(y.shape[:2])}
        if any(shape != (M, b) for shape in shapes.values()):
            raise ValueError(
                f"a per-copy batch (2-d index) needs index [M={M}, b], x [M, b, ...] and y "
                f"[M, b, ...], got leading shapes {shapes}; build it with per_copy_loader(dataset, "
                "batch_size, masks) with this module's masks (or num_models)"
            )

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.stacked_model.parameters() if p.requires_grad]

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        needs_index = self.masks is not None or self.example_weights is not None
        x, y, index = parse_indexed_batch(batch, self.batch_fn, require_index=needs_index)
        per_copy_batch = index is not None and index.ndim == 2
        if per_copy_batch:
            self._check_per_copy_batch(x, y, index)
        if batch_idx == 0:
            check_index(index, self.n_train)
        coef = self.example_coefficients(index, index.shape[1] if per_copy_batch else len(y))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        select = None if per_copy_batch else self.compaction(coef)
        losses = []
        for start, stop in self.chunks():
            inputs, targets, chunk_coef, per_copy = self._chunk_batch(
                x, y, coef, select, start, stop, per_copy_batch
            )
            outputs = self.stacked_model(inputs, start, stop, per_copy, self.hparams.randomness)
            per_copy_targets = select is not None or per_copy_batch
            per_example = self.per_example_loss(outputs, targets, per_copy_targets=per_copy_targets)
            loss = (per_example * chunk_coef).sum(1)
            self.manual_backward(loss.sum())
            losses.append(loss.detach())
        params = self._trainable()
        if self.hparams.gradient_clip_norm is not None:
            clip_grad_norm_per_copy(params, self.hparams.gradient_clip_norm, self.num_models)
        before = self.per_copy_lr.snapshot(params) if self.per_copy_lr is not None else None
        optimizer.step()
        if before is not None:
            self.per_copy_lr.apply(params, before)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_scheduler_interval == "step":
            scheduler.step()
        per_copy_loss = torch.cat(losses)
        self.log("train/loss", per_copy_loss.mean(), prog_bar=True)
        return {"loss": per_copy_loss.mean(), "per_copy_loss": per_copy_loss}

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.lr_scheduler_interval == "epoch":
            scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the masks/example weights from the checkpoint when none were given (so
        ``load_from_checkpoint(path, model=model_fn)`` restores them); refuse different ones."""
        state = checkpoint.get("state_dict", {})
        for name in ("masks", "example_weights"):
            saved, mine = state.get(name), getattr(self, name)
            if saved is None:
                if mine is not None:
                    raise ValueError(f"the checkpoint was trained without {name}, this module has them")
            elif mine is None:
                setattr(self, name, saved.clone().to(self.device))
            elif saved.shape != mine.shape or not torch.equal(saved.to(mine.device), mine):
                raise ValueError(
                    f"the checkpoint's {name} differ from this module's: resuming a fit needs the "
                    "same masks/example weights (the same rows of a sweep)"
                )

    def on_train_start(self) -> None:
        n = self.n_train
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if n is not None and dataset is not None and hasattr(dataset, "__len__") and len(dataset) != n:
            raise ValueError(
                f"masks/example_weights have {n} columns but the training dataset has "
                f"{len(dataset)} examples; they need one column per training example"
            )

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = build_optimizer(
            self._trainable(), hp.optimizer, hp.base_lr, hp.momentum, hp.weight_decay,
            hp.nesterov, tuple(hp.betas), hp.eps,
        )
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_fn(optimizer)}

    # ------------------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y, _ = parse_indexed_batch(batch, self.batch_fn, require_index=False)
        logits = self(x)
        loss = self.per_example_loss(logits, y).mean(1)
        acc = (logits.argmax(-1) == y).float().mean(1)
        ensemble_acc = (logits.softmax(-1).mean(0).argmax(-1) == y).float().mean()
        self.log(f"{stage}/loss", loss.mean())
        self.log(f"{stage}/acc", acc.mean(), prog_bar=True)
        self.log(f"{stage}/ensemble_acc", ensemble_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _, _ = parse_indexed_batch(batch, self.batch_fn, require_index=False)
        return self(x)

    @torch.no_grad()
    def batch_outputs(self, x: Tensor, y: Tensor, output_fn: OutputFn | str | None = "margin") -> Tensor:
        """``output_fn(copy_m, x, y)`` for every copy: ``[M, batch]``, in the current train/eval
        mode. ``output_fn`` must be vmappable (a function of ``module(x)`` and torch ops)."""
        fn, randomness = resolve_output_fn(output_fn), self.hparams.randomness
        return torch.cat(
            [self.stacked_model.outputs(x, y, fn, s, e, randomness) for s, e in self.chunks()]
        )

    @torch.no_grad()
    def outputs(
        self,
        dataset: Dataset,
        output_fn: OutputFn | str | None = "margin",
        batch_size: int = 256,
        batch_fn: BatchFn | None = None,
    ) -> Tensor:
        """Per-example outputs of every copy over ``dataset`` in order, in eval mode:
        ``Tensor[M, len(dataset)]`` (float32, CPU); row ``m`` is copy ``m``."""
        parser = BatchParser(batch_fn=batch_fn)
        was_training = self.training
        self.eval()
        try:
            columns = []
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                x, y = parser(batch)
                out = self.batch_outputs(x.to(self.device), y.to(self.device), output_fn)
                columns.append(out.float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(columns, dim=1)
