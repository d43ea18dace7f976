r"""Distance correlation as a training objective: a wrapper that adds it to an existing
LightningModule without editing the module.

:class:`~lightning_tda.dcor.loss.DistanceCorrelationLoss` (importable from here too) is the plain
``nn.Module`` term for any other training loop.

:class:`DistanceCorrelationPenalty` is a ``LightningModule`` that wraps yours. A Lightning
``Callback`` cannot change the loss a training step returns, so the wrapper is the module the
``Trainer`` fits: it delegates ``forward``, ``training_step`` and every hook your module overrides
(its steps, epoch hooks, ``configure_optimizers``, dataloaders, checkpoint hooks) to your module,
takes the features of a named layer with a forward hook while your ``training_step`` runs, and
returns your loss plus ``weight * penalty``. Your module's code, attributes and parameters are
untouched: unwrapped, it trains exactly as before, and ``self.log`` inside it keeps working.

The penalty compares the features of ``layer`` (in your module) with those of a reference:

- ``reference=None``: another layer of your module (``reference_layer``), trained jointly in
  the same forward pass (e.g. two branches to disentangle);
- ``reference=model`` or a list of models: frozen by default (eval mode, no gradient) and run on
  the same inputs as your module; the penalty is the mean over the references. With
  ``freeze_reference=False`` the references are trained jointly: their parameters are added to
  your first optimizer and the penalty's gradient reaches them.

``target="decorrelate"`` minimises the statistic (dCor by default squared, as in the seed's
code), ``"correlate"`` minimises ``1 - statistic``. ``normalize=True`` L2-normalises each
sample's features first (the seed's training setup). With a ``signal`` (one-hot labels, or any
function of the batch) the statistic is partial: the features and the signal, given each
reference's features. Logged each step, under ``log_prefix``: ``dcor`` (the mean statistic;
``pdcor`` for a partial one; and ``dcor_<i>`` / ``pdcor_<i>`` per reference when there are
several), ``weight`` and ``penalty``.

Two recipes of Zhen et al. (ECCV 2022) are one call each:

- :meth:`DistanceCorrelationPenalty.diverse_from`: diverse models, each new model penalised by
  its mean squared dCor to the frozen earlier ones with weight 0.05 on L2-normalised features;
- :meth:`DistanceCorrelationPenalty.conditioned_on`: conditioning, a model trained to maximise
  the partial dCor of its features with the labels given a frozen model's features (what it
  learns beyond that model), weight 0.1 as in the seed's code.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_tda.data import BatchFn, BatchParser
from lightning_tda.dcor._hooks import InputCapture, OutputCapture, find_layer
from lightning_tda.dcor.functional import DEFAULT_BLOCK_SIZE, PARTIAL_STATISTICS, Method
from lightning_tda.dcor.loss import DistanceCorrelationLoss, Signal, Target, linear_warmup

__all__ = ["DistanceCorrelationLoss", "DistanceCorrelationPenalty", "linear_warmup"]

# ---------------------------------------------------------------------------------- delegation


def _accepted_args(fn: Callable, args: tuple) -> tuple:
    """The leading ``args`` that ``fn`` accepts positionally (all of them if it takes ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return args
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return args
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return args[:n]


def _delegate(wrapper: "DistanceCorrelationPenalty", name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the wrapped module's ``name`` hook as the Trainer would have called it."""
    fn = getattr(wrapper.module, name)
    with wrapper._as_current_hook():
        return fn(*_accepted_args(fn, args), **kwargs)


# Hooks the Trainer calls on the module it fits. The wrapper forwards each that the wrapped module
# overrides (and only those, so the Trainer sees the same overrides it would have seen).
_DELEGATED_HOOKS = (
    "validation_step", "test_step", "predict_step",
    "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader",
    "prepare_data", "setup", "teardown", "configure_model", "configure_callbacks",
    "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
    "on_validation_start", "on_validation_end", "on_test_start", "on_test_end",
    "on_predict_start", "on_predict_end",
    "on_train_batch_start", "on_train_batch_end", "on_validation_batch_start",
    "on_validation_batch_end", "on_test_batch_start", "on_test_batch_end",
    "on_predict_batch_start", "on_predict_batch_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_epoch_start",
    "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end",
    "on_predict_epoch_start", "on_predict_epoch_end",
    "on_validation_model_eval", "on_validation_model_train", "on_test_model_eval",
    "on_test_model_train", "on_predict_model_eval",
    "on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_save_checkpoint", "on_load_checkpoint",
    "on_before_batch_transfer", "on_after_batch_transfer", "transfer_batch_to_device",
    "configure_gradient_clipping", "lr_scheduler_step", "optimizer_step", "optimizer_zero_grad",
)


class DistanceCorrelationPenalty(L.LightningModule):
    r"""Wrap a LightningModule so that its training loss gets a distance-correlation term.

    .. math::

        \mathcal{L} = \mathcal{L}_{\text{module}} + w(\text{step}) \cdot
            \frac{1}{m} \sum_{k=1}^{m} \mathcal{R}^2_n\big(f(x), g_k(x)\big)

    for ``target="decorrelate"`` (``1 - mean`` for ``"correlate"``), with :math:`f` the
    features of ``layer`` in the wrapped module and :math:`g_k` those of ``reference_layer`` in
    the references, on the same batch. With a ``signal`` :math:`s` the term is partial:
    :math:`\frac{1}{m} \sum_k \mathcal{R}^{*}\big(f(x), s; g_k(x)\big)`, what the module's
    features say about the signal beyond each reference.

    Args:
        module: the LightningModule to train (automatic optimisation). Not modified: the wrapper
            registers forward hooks on it and calls its methods.
        layer: name of the layer of ``module`` whose output is penalised (a name from
            ``module.named_modules()``; ``""`` is the module's own output).
        reference: ``None`` (compare with another layer of ``module``), a model, or a list of
            models (compared with each; the penalty is the mean).
        reference_layer: the layer of the references (default: ``layer``, as for references of
            the same architecture); required when ``reference`` is ``None``.
        target: ``"decorrelate"`` or ``"correlate"``.
        weight: the weight ``w``: a number, or a function of ``trainer.global_step`` (e.g.
            :func:`linear_warmup`).
        statistic: a name from :data:`lightning_tda.dcor.STATISTICS` (default
            ``"distance_correlation_sqr"``, the seed's choice), or with a ``signal`` one from
            :data:`~lightning_tda.dcor.PARTIAL_STATISTICS` (default
            ``"semi_partial_distance_correlation"``, what the seed's code maximises).
        signal: ``None`` (a two-sample penalty), ``"labels"`` (the batch's labels, one-hot,
            through ``batch_fn``) or a function ``batch -> [batch, ...]``: the penalty becomes
            the partial statistic of the features and the signal given the references'.
        normalize: L2-normalise each sample's features first (the seed's setup).
        freeze_reference: references run in eval mode without gradient (default); ``False``
            trains them jointly: they stay in train mode and their parameters join the first
            optimizer that ``module.configure_optimizers`` returns.
        reference_input: what the references are run on: ``"auto"`` (default) the arguments of
            the wrapped module's last forward call in the step if it was called as
            ``module(...)``, else the ``x`` of the batch; ``"forward"``; ``"batch"``; or a
            function ``batch -> input``.
        batch_fn: how to split a batch into ``(x, y)`` for ``"batch"`` (default parser:
            tuples and ``{"x", "y"}`` mappings).
        method, block_size: the functional path (:mod:`lightning_tda.dcor.functional`).
        log_prefix: prefix of the logged names.

    Example:
        >>> from lightning_tda.models import ImageClassifier
        >>> model_a = ImageClassifier()  # trained before, frozen here
        >>> model_b = DistanceCorrelationPenalty(ImageClassifier(), "model.fc1", reference=model_a)
        >>> # Trainer(...).fit(model_b, datamodule)
    """

    def __init__(
        self,
        module: L.LightningModule,
        layer: str,
        reference: nn.Module | Sequence[nn.Module] | None = None,
        reference_layer: str | None = None,
        *,
        target: Target = "decorrelate",
        weight: float | Callable[[int], float] = 0.05,
        statistic: str | None = None,
        normalize: bool = False,
        freeze_reference: bool = True,
        reference_input: Literal["auto", "forward", "batch"] | Callable[[Any], Any] = "auto",
        batch_fn: BatchFn | None = None,
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        log_prefix: str = "dcor_penalty",
        signal: Signal | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, L.LightningModule):
            raise TypeError(
                f"module must be a LightningModule, got {type(module).__name__}; for a plain "
                "nn.Module add DistanceCorrelationLoss to your loss instead"
            )
        if not module.automatic_optimization:
            raise ValueError(
                "the wrapped module uses manual optimization (automatic_optimization=False): its "
                "training_step runs backward itself, so a penalty added to the returned loss would "
                "never be optimised; add DistanceCorrelationLoss inside its training_step instead"
            )
        if not (callable(weight) or isinstance(weight, (int, float))):
            raise TypeError(f"weight must be a number or a function of the global step, got {weight!r}")
        if reference_input not in ("auto", "forward", "batch") and not callable(reference_input):
            raise ValueError(
                "reference_input must be 'auto', 'forward', 'batch' or a function batch -> input, "
                f"got {reference_input!r}"
            )
        self.module = module
        self.layer = layer
        refs = [] if reference is None else [reference] if isinstance(reference, nn.Module) else list(reference)
        if reference is not None and not refs:
            raise ValueError("reference is an empty sequence; pass None to compare two layers of module")
        for r in refs:
            if not isinstance(r, nn.Module):
                raise TypeError(f"references must be nn.Modules, got {type(r).__name__}")
        if reference is None and reference_layer is None:
            raise ValueError(
                "with reference=None the penalty compares two layers of module: pass reference_layer"
            )
        if reference is None and reference_layer == layer:
            raise ValueError(f"layer and reference_layer are both {layer!r}: a layer is always "
                             "fully correlated with itself")
        self.reference_layer = layer if reference_layer is None else reference_layer
        self.references = nn.ModuleList(refs)
        self.freeze_reference = freeze_reference
        if freeze_reference:
            for r in refs:
                r.requires_grad_(False)
                r.eval()
        self.weight = weight
        self.reference_input = reference_input
        self.parser = BatchParser(batch_fn=batch_fn)
        statistic = _check_signal(signal, statistic)
        self.signal = signal
        self.loss_fn = DistanceCorrelationLoss(
            statistic=statistic, target=target, normalize=normalize, method=method, block_size=block_size
        )
        self.log_prefix = log_prefix

        self._capture = OutputCapture(f"layer {layer!r} of the wrapped module")
        self._handles = [find_layer(module, layer, "the wrapped module").register_forward_hook(self._capture)]
        if refs:
            self._ref_captures = [OutputCapture(f"layer {self.reference_layer!r} of reference {i}")
                                  for i in range(len(refs))]
            for i, (r, cap) in enumerate(zip(refs, self._ref_captures)):
                target_layer = find_layer(r, self.reference_layer, f"reference {i} ({type(r).__name__})")
                self._handles.append(target_layer.register_forward_hook(cap))
        else:
            self._ref_captures = [OutputCapture(f"layer {self.reference_layer!r} of the wrapped module")]
            target_layer = find_layer(module, self.reference_layer, "the wrapped module")
            self._handles.append(target_layer.register_forward_hook(self._ref_captures[0]))
        self._inputs = InputCapture()
        self._handles.append(module.register_forward_pre_hook(self._inputs, with_kwargs=True))

        for name in _DELEGATED_HOOKS:
            if is_overridden(name, module, L.LightningModule):
                setattr(self, name, partial(_delegate, self, name))
        self.example_input_array = module.example_input_array
        self.save_hyperparameters(
            {
                "dcor_penalty": {
                    "layer": layer, "reference_layer": self.reference_layer, "references": len(refs),
                    "target": target, "weight": weight if not callable(weight) else repr(weight),
                    "statistic": statistic, "normalize": normalize, "freeze_reference": freeze_reference,
                    "signal": signal if signal is None or isinstance(signal, str) else repr(signal),
                },
                **dict(module.hparams),
            }
        )

    @classmethod
    def diverse_from(
        cls,
        module: L.LightningModule,
        earlier: nn.Module | Sequence[nn.Module],
        layer: str,
        reference_layer: str | None = None,
        **kwargs: Any,
    ) -> "DistanceCorrelationPenalty":
        """The diverse-models recipe of Zhen et al. (2022): ``module`` is penalised by its mean
        biased squared dCor to the frozen ``earlier`` models, weight 0.05, on L2-normalised
        features of ``layer``. ``kwargs`` override any of these settings."""
        settings: dict[str, Any] = dict(
            target="decorrelate", weight=0.05, statistic="distance_correlation_sqr", normalize=True,
            freeze_reference=True,
        )
        settings.update(kwargs)
        return cls(module, layer, earlier, reference_layer, **settings)

    @classmethod
    def conditioned_on(
        cls,
        module: L.LightningModule,
        given: nn.Module | Sequence[nn.Module],
        layer: str,
        reference_layer: str | None = None,
        signal: Signal = "labels",
        **kwargs: Any,
    ) -> "DistanceCorrelationPenalty":
        r"""The conditioning recipe of Zhen et al. (2022) (their ViT given a ResNet): train
        ``module`` to maximise what its features of ``layer`` say about ``signal`` beyond the
        frozen ``given`` model's features, the semi-partial dCor
        :math:`\mathcal{R}^{*}\big((f \mid g), s\big)`, added as ``weight * (1 - value)``
        with weight 0.1 (the seed's code subtracts ``0.1 * value`` from the cross-entropy: the
        same gradient). Features are not normalised (as there). ``kwargs`` override any
        setting."""
        settings: dict[str, Any] = dict(
            target="correlate", weight=0.1, statistic="semi_partial_distance_correlation",
            normalize=False, freeze_reference=True, signal=signal, log_prefix="dcor_conditioning",
        )
        settings.update(kwargs)
        return cls(module, layer, given, reference_layer, **settings)

    # ------------------------------------------------------------------ delegation

    @contextmanager
    def _as_current_hook(self) -> Iterator[None]:
        """Let the wrapped module ``self.log`` inside the hook the Trainer is running."""
        inner = self.module
        previous = inner._current_fx_name
        inner._current_fx_name = self._current_fx_name
        try:
            yield
        finally:
            inner._current_fx_name = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        with self._as_current_hook():
            config = self.module.configure_optimizers()
        if not self.freeze_reference and len(self.references):
            optimizer = _first_optimizer(config)
            if optimizer is None:
                raise ValueError(
                    "freeze_reference=False needs an optimizer to train the references with, but the "
                    f"wrapped module's configure_optimizers returned {type(config).__name__}"
                )
            optimizer.add_param_group({"params": [p for r in self.references for p in r.parameters()]})
        return config

    # ------------------------------------------------------------------ the penalty

    def current_weight(self) -> float:
        """The penalty weight at the current global step."""
        if callable(self.weight):
            return float(self.weight(self.global_step if self._trainer is not None else 0))
        return float(self.weight)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        captures = [self._capture, self._inputs, *self._ref_captures]
        for cap in captures:
            cap.enabled, cap.value = True, None
        try:
            fn = self.module.training_step
            with self._as_current_hook():
                out = fn(*_accepted_args(fn, args), **kwargs)
            if out is None:  # the module skipped this batch
                return None
            features = self._capture.take()
            if len(self.references):
                reference_features = self._reference_features(args[0] if args else kwargs["batch"])
            else:
                reference_features = [self._ref_captures[0].take()]
        finally:
            for cap in captures:
                cap.enabled, cap.value = False, None

        weight = self.current_weight()
        if self.signal is None:
            values = self.loss_fn.values(features, reference_features)
        else:
            signal = self._signal(args[0] if args else kwargs["batch"], features)
            values = self.loss_fn.values(features, signal, given=reference_features)
        penalty = self.loss_fn.loss_from_values(values)
        prefix = self.log_prefix
        name = "pdcor" if self.signal is not None else "dcor"
        batch_size = features.shape[0]
        self.log(f"{prefix}/{name}", values.mean().detach(), prog_bar=True, batch_size=batch_size)
        if len(values) > 1:
            for i, v in enumerate(values.detach()):
                self.log(f"{prefix}/{name}_{i}", v, batch_size=batch_size)
        self.log(f"{prefix}/weight", weight, batch_size=batch_size)
        self.log(f"{prefix}/penalty", penalty.detach(), batch_size=batch_size)
        if isinstance(out, Tensor):
            return out + weight * penalty
        if isinstance(out, dict) and "loss" in out:
            return {**out, "loss": out["loss"] + weight * penalty}
        raise TypeError(
            "the wrapped training_step must return a loss tensor, a dict with 'loss', or None; "
            f"got {type(out).__name__}"
        )

    def _signal(self, batch: Any, features: Tensor) -> Tensor:
        """The signal of a partial penalty for ``batch``: one-hot labels, or the user's function."""
        if callable(self.signal):
            signal = self.signal(batch)
            if not isinstance(signal, Tensor):
                raise TypeError(f"signal(batch) must return a tensor [batch, ...], got {type(signal).__name__}")
            return signal.to(features.device)
        labels = self.parser(batch)[1]
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
            shown = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(
                f"signal='labels' needs integer class labels of shape [batch], got {shown}; pass "
                "signal=lambda batch: tensor for another signal"
            )
        # one-hot rows are at distance sqrt(2) or 0 whatever the width, so the number of classes
        # in this batch is enough
        return nn.functional.one_hot(labels.long()).to(device=features.device, dtype=torch.float32)

    def _reference_inputs(self, batch: Any) -> tuple[tuple, dict]:
        mode = self.reference_input
        if callable(mode):
            return (mode(batch),), {}
        captured = self._inputs.value
        if mode == "forward" or (mode == "auto" and captured is not None):
            if captured is None:
                raise RuntimeError(
                    "reference_input='forward' but the wrapped module was not called as module(...) "
                    "during its training_step; use reference_input='batch' or a function batch -> input"
                )
            return captured
        return (self.parser(batch)[0],), {}

    def _reference_features(self, batch: Any) -> list[Tensor]:
        args, kwargs = self._reference_inputs(batch)
        features = []
        for ref, cap in zip(self.references, self._ref_captures):
            if self.freeze_reference:
                ref.eval()  # the Trainer sets the whole tree to train mode each epoch
                with torch.no_grad():
                    ref(*args, **kwargs)
            else:
                ref(*args, **kwargs)
            features.append(cap.take())
        return features

    def remove_hooks(self) -> None:
        """Detach the wrapper's hooks from the wrapped module and the references."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_signal(signal: Any, statistic: str | None) -> str:
    """The statistic to use with ``signal``, or a clear error for a pair that does not fit."""
    if not (signal is None or signal == "labels" or callable(signal)):
        raise ValueError(f"signal must be None, 'labels' or a function batch -> tensor, got {signal!r}")
    if statistic is None:
        return "distance_correlation_sqr" if signal is None else "semi_partial_distance_correlation"
    if signal is not None and statistic not in PARTIAL_STATISTICS:
        raise ValueError(
            f"a signal makes the penalty partial: statistic must be one of {sorted(PARTIAL_STATISTICS)}, "
            f"got {statistic!r}"
        )
    if signal is None and statistic in PARTIAL_STATISTICS:
        raise ValueError(
            f"statistic {statistic!r} is partial: pass signal='labels' (or a function batch -> tensor) "
            "to say what the features should correlate with beyond the references"
        )
    return statistic


def _first_optimizer(config: Any) -> torch.optim.Optimizer | None:
    """The first optimizer in anything ``configure_optimizers`` may return."""
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, dict):
        return _first_optimizer(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        for item in config:
            found = _first_optimizer(item)
            if found is not None:
                return found
    return None
