r"""Distance correlation as a training objective: a loss term, and a wrapper that adds it to an
existing LightningModule without editing the module.

:class:`DistanceCorrelationLoss` is a plain ``nn.Module``: add ``weight * loss(features, others)``
to any loss.

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
sample's features first (the seed's training setup). Logged each step, under ``log_prefix``:
``dcor`` (the mean statistic, and ``dcor_<i>`` per reference when there are several),
``weight`` and ``penalty``.

The recipe of Zhen et al. (ECCV 2022) for diverse models, each new model penalised by its mean
squared dCor to the frozen earlier ones with weight 0.05 on L2-normalised features, is
:meth:`DistanceCorrelationPenalty.diverse_from`.
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
from lightning_tda.dcor.functional import DEFAULT_BLOCK_SIZE, Method, check_method, resolve_statistic

__all__ = ["DistanceCorrelationLoss", "DistanceCorrelationPenalty", "linear_warmup"]

Target = Literal["decorrelate", "correlate"]
_TARGETS = ("decorrelate", "correlate")


class DistanceCorrelationLoss(nn.Module):
    r"""A distance-correlation loss term between a batch of features and one or more others.

    ``loss(x, y)`` is ``statistic(x, y)`` for ``target="decorrelate"`` and
    ``1 - statistic(x, y)`` for ``"correlate"``; with a list ``y = [y_1, ..., y_m]`` the
    statistic is averaged over them first. Features are ``[batch, ...]`` (flattened), of any
    widths.

    Args:
        statistic: a name from :data:`lightning_tda.dcor.STATISTICS`; the default
            ``"distance_correlation_sqr"`` (biased squared dCor, in ``[0, 1]``, smooth at 0) is
            what the seed's code penalises. ``"distance_correlation"`` has an unbounded gradient
            near 0; ``"u_distance_correlation_sqr"`` is bias-corrected (may be negative).
        target: ``"decorrelate"`` or ``"correlate"``.
        normalize: L2-normalise each sample's flattened features first.
        method, block_size: the functional path (:mod:`lightning_tda.dcor.functional`).
        check_finite: raise a clear error on NaN/inf features (one device sync per call).

    Example:
        >>> loss_fn = DistanceCorrelationLoss()
        >>> x = torch.randn(32, 8, requires_grad=True)
        >>> loss = loss_fn(x, torch.randn(32, 3))
        >>> loss.backward()
    """

    def __init__(
        self,
        statistic: str = "distance_correlation_sqr",
        target: Target = "decorrelate",
        normalize: bool = False,
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        check_method(method, block_size)
        self.statistic = statistic
        self._fn = resolve_statistic(statistic)
        self.target = target
        self.normalize = normalize
        self.method = method
        self.block_size = block_size
        self.check_finite = check_finite

    def values(self, x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
        """The statistic between ``x`` and each of ``y``: shape ``[len(y)]`` (``[1]`` for one)."""
        ys = [y] if isinstance(y, Tensor) else list(y)
        if not ys:
            raise ValueError("need at least one tensor to compare x with, got an empty sequence")
        x = self._features(x)
        return torch.stack(
            [
                self._fn(
                    x, self._features(other), method=self.method, block_size=self.block_size,
                    check_finite=self.check_finite,
                )
                for other in ys
            ]
        )

    def loss_from_values(self, values: Tensor) -> Tensor:
        """The loss for statistics ``values`` (from :meth:`values`)."""
        mean = values.mean()
        return mean if self.target == "decorrelate" else 1.0 - mean

    def forward(self, x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
        return self.loss_from_values(self.values(x, y))

    def _features(self, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"features must be tensors of shape [batch, ...], got {type(t).__name__}")
        t = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
        if self.normalize:
            t = nn.functional.normalize(t, dim=1)
        return t

    def extra_repr(self) -> str:
        return f"statistic={self.statistic!r}, target={self.target!r}, normalize={self.normalize}"


def linear_warmup(weight: float, steps: int) -> Callable[[int], float]:
    """A weight schedule for :class:`DistanceCorrelationPenalty`: ``weight * min(1, step / steps)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return partial(_linear_warmup, float(weight), int(steps))


def _linear_warmup(weight: float, steps: int, step: int) -> float:
    return weight * min(1.0, step / steps)


# ---------------------------------------------------------------------------------- hooks


class _OutputCapture:
    """Forward hook: keeps the output of the last call while enabled (the first tensor of a
    tuple output)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.enabled = False
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return
        if isinstance(output, (tuple, list)):
            output = next((o for o in output if isinstance(o, Tensor)), None)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{self.where} returned {type(output).__name__}, not a tensor; hook a layer whose "
                "output is a tensor (or a tuple holding one)"
            )
        self.value = output

    def take(self) -> Tensor:
        if self.value is None:
            raise RuntimeError(
                f"{self.where} was not called during the training step, so there are no features "
                "to penalise; choose a layer the forward pass uses"
            )
        value, self.value = self.value, None
        return value


class _InputCapture:
    """Forward pre-hook on the wrapped module: the positional and keyword arguments of its last
    call while enabled (the reference models are run on them)."""

    def __init__(self) -> None:
        self.enabled = False
        self.value: tuple[tuple, dict] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.enabled:
            self.value = (args, kwargs)


def _find_layer(root: nn.Module, name: str, what: str) -> nn.Module:
    names = [n for n, _ in root.named_modules()]
    if not isinstance(name, str) or name not in names:
        shown = ", ".join(repr(n) for n in names[:80])
        more = f" and {len(names) - 80} more" if len(names) > 80 else ""
        raise ValueError(
            f"{what} has no layer {name!r}; the layers it has are: {shown}{more} "
            "('' is the whole module's output)"
        )
    return root.get_submodule(name)


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
    the references, on the same batch.

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
        statistic: a name from :data:`lightning_tda.dcor.STATISTICS`
            (default ``"distance_correlation_sqr"``, the seed's choice).
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
        statistic: str = "distance_correlation_sqr",
        normalize: bool = False,
        freeze_reference: bool = True,
        reference_input: Literal["auto", "forward", "batch"] | Callable[[Any], Any] = "auto",
        batch_fn: BatchFn | None = None,
        method: Method = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        log_prefix: str = "dcor_penalty",
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
        self.loss_fn = DistanceCorrelationLoss(
            statistic=statistic, target=target, normalize=normalize, method=method, block_size=block_size
        )
        self.log_prefix = log_prefix

        self._capture = _OutputCapture(f"layer {layer!r} of the wrapped module")
        self._handles = [_find_layer(module, layer, "the wrapped module").register_forward_hook(self._capture)]
        if refs:
            self._ref_captures = [_OutputCapture(f"layer {self.reference_layer!r} of reference {i}")
                                  for i in range(len(refs))]
            for i, (r, cap) in enumerate(zip(refs, self._ref_captures)):
                target_layer = _find_layer(r, self.reference_layer, f"reference {i} ({type(r).__name__})")
                self._handles.append(target_layer.register_forward_hook(cap))
        else:
            self._ref_captures = [_OutputCapture(f"layer {self.reference_layer!r} of the wrapped module")]
            target_layer = _find_layer(module, self.reference_layer, "the wrapped module")
            self._handles.append(target_layer.register_forward_hook(self._ref_captures[0]))
        self._inputs = _InputCapture()
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
        values = self.loss_fn.values(features, reference_features)
        penalty = self.loss_fn.loss_from_values(values)
        prefix = self.log_prefix
        batch_size = features.shape[0]
        self.log(f"{prefix}/dcor", values.mean().detach(), prog_bar=True, batch_size=batch_size)
        if len(values) > 1:
            for i, v in enumerate(values.detach()):
                self.log(f"{prefix}/dcor_{i}", v, batch_size=batch_size)
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
