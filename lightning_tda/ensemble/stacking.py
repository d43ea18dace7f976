"""Stacking M copies of one architecture into one module whose tensors have a leading model axis.

The functional core of the ensemble engine, free of Lightning:

- :func:`build_copies` makes the M copies (``torch.manual_seed(seed); model_fn()`` per copy, or
  copies of a template) one at a time and streams them into stacked tensors, so at most one
  unstacked copy exists besides the stack;
- :class:`StackedModel` holds the result: a module of the same class whose parameters and
  buffers are the stacked ``[M, ...]`` tensors (so ``state_dict`` keys are the architecture's own
  names), a forward that runs ``vmap(functional_call)`` over a range of copies, and
  :meth:`StackedModel.member` to take copy ``m`` out as an ordinary module.

The stacked tensors equal ``torch.func.stack_module_state(copies)`` (tested); building them row
by row only saves the memory of holding M unstacked copies at once.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from lightning_tda.outputs import OutputFn, check_output

ModelFn = Callable[[], nn.Module]
Randomness = Literal["different", "same", "error"]


class StackingError(ValueError):
    """The copies of an architecture cannot be stacked and run under ``torch.func.vmap``."""


@contextmanager
def _forked_rng() -> Iterator[None]:
    """Leave the global RNG (CPU, and CUDA where initialised) as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _reset_parameters(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _describe(t: Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _tensors(model: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """``name -> ("param" | "buffer", tensor)`` over unique tensors, in registration order."""
    out: dict[str, tuple[str, Tensor]] = {n: ("param", p) for n, p in model.named_parameters()}
    out.update({n: ("buffer", b) for n, b in model.named_buffers()})
    return out


def _check_copy(model: Any, index: int, reference: dict[str, tuple[str, Tensor]] | None) -> None:
    """Raise :class:`StackingError` when copy ``index`` cannot be stacked with copy 0."""
    if not isinstance(model, nn.Module):
        raise StackingError(f"copy {index} is a {type(model).__name__}, not an nn.Module")
    tensors = _tensors(model)
    for name, (_, t) in tensors.items():
        if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
            raise StackingError(
                f"cannot stack: {name!r} is uninitialized (a torch.nn.Lazy* module); stacked copies "
                "need concrete shapes, so use the non-lazy layer or run one forward pass first"
            )
        if t.is_sparse:
            raise StackingError(f"cannot stack: {name!r} is a sparse tensor")
    if reference is None:
        if not any(kind == "param" for kind, _ in tensors.values()):
            raise StackingError(
                f"cannot stack: the model ({type(model).__name__}) has no parameters, so there is "
                "nothing to train"
            )
        return
    if list(tensors) != list(reference):
        only_here = sorted(set(tensors) - set(reference))
        only_ref = sorted(set(reference) - set(tensors))
        raise StackingError(
            f"cannot stack: copy {index} has different parameters/buffers from copy 0 (only in "
            f"copy {index}: {only_here[:5]}, only in copy 0: {only_ref[:5]}); the architecture "
            "must not depend on the seed or on anything that differs between copies"
        )
    for name, (kind, t) in tensors.items():
        ref_kind, ref = reference[name]
        if kind != ref_kind or t.shape != ref.shape or t.dtype != ref.dtype:
            raise StackingError(
                f"cannot stack: {kind} {name!r} is {_describe(t)} in copy {index} but "
                f"{_describe(ref)} in copy 0; every copy must have the same shapes and dtypes "
                "(the architecture must not depend on the seed)"
            )
        if kind == "param" and t.requires_grad != ref.requires_grad:
            raise StackingError(
                f"cannot stack: parameter {name!r} requires grad in one copy and not in another"
            )


def _set_tensor(module: nn.Module, name: str, value: Tensor, kind: str) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if kind == "param":
        owner._parameters[leaf] = value  # type: ignore[assignment]
    else:
        owner._buffers[leaf] = value


def _aliases(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every parameter/buffer name (tied duplicates included) -> (kind, its canonical name)."""
    canonical: dict[int, str] = {id(t): n for n, (_, t) in _tensors(model).items()}
    out: dict[str, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = ("param", canonical[id(p)])
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = ("buffer", canonical[id(b)])
    return out


def _install(module: nn.Module, aliases: dict[str, tuple[str, str]], tensors: dict[str, Tensor]) -> None:
    """Put ``tensors`` (by canonical name) into ``module`` under every alias, keeping ties."""
    for name, (kind, canon) in aliases.items():
        _set_tensor(module, name, tensors[canon], kind)


def build_copies(
    model: ModelFn | nn.Module | Sequence[nn.Module],
    num_models: int,
    seeds: Sequence[int],
    init: Literal["copy", "reset"] = "copy",
) -> tuple[nn.Module, dict[str, Tensor]]:
    """Make the M copies and stack them.

    Args:
        model: a callable ``model_fn() -> nn.Module`` (copy ``m`` is ``torch.manual_seed(seeds[m]);
            model_fn()``), a template module (copied as it is with ``init="copy"``; with
            ``init="reset"`` copy ``m`` is the template with ``reset_parameters()`` called on every
            submodule under ``torch.manual_seed(seeds[m])``), or a sequence of M modules, stacked
            as given.
        num_models: M.
        seeds: one init seed per copy (used by ``model_fn`` and ``init="reset"``).

    Returns:
        ``(copy_0, stacked)``: copy 0 (the architecture, for :class:`StackedModel`) and the
        stacked tensors by canonical name, each ``[M, *shape]``, parameters with
        ``requires_grad`` as in the copies. The global RNG is left as it was.
    """
    if isinstance(model, nn.Module):
        template = model

        def make(m: int) -> nn.Module:
            copy_m = copy.deepcopy(template)
            if init == "reset":
                torch.manual_seed(int(seeds[m]))
                _reset_parameters(copy_m)
            return copy_m

    elif isinstance(model, Sequence):
        if len(model) != num_models:
            raise ValueError(f"got {len(model)} modules for num_models={num_models}")
        models = list(model)

        def make(m: int) -> nn.Module:
            return models[m]

    elif callable(model):
        model_fn = model

        def make(m: int) -> nn.Module:
            torch.manual_seed(int(seeds[m]))
            return model_fn()

    else:
        raise TypeError(
            "model must be a callable model_fn() -> nn.Module, a template nn.Module or a sequence "
            f"of nn.Modules, got {type(model).__name__}"
        )

    stacked: dict[str, Tensor] = {}
    reference: dict[str, tuple[str, Tensor]] | None = None
    first: nn.Module | None = None
    previous: nn.Module | None = None  # kept alive so a reused module is seen by id
    with _forked_rng(), torch.no_grad():
        for m in range(num_models):
            copy_m = make(m)
            _check_copy(copy_m, m, reference)
            tensors = _tensors(copy_m)
            for other in (first, previous):
                shared = other is not None and {id(t) for _, t in tensors.values()} & {
                    id(t) for _, t in _tensors(other).values()
                }
                if shared:
                    raise StackingError(
                        f"copy {m} shares parameters/buffers with an earlier copy; the model "
                        "callable must build a new module on each call"
                    )
            if reference is None:
                reference, first = tensors, copy_m
                for name, (kind, t) in tensors.items():
                    stacked[name] = t.new_empty((num_models, *t.shape))
                    if kind == "param":
                        stacked[name].requires_grad_(t.requires_grad)
            for name, (_, t) in tensors.items():
                stacked[name][m].copy_(t)
            previous = copy_m
    assert first is not None
    return first, stacked


def run_vmapped(
    fn: Callable[..., Any], in_dims: tuple[int | None, ...], randomness: Randomness, *args: Any
) -> Any:
    """``vmap(fn, in_dims, randomness=randomness)(*args)``, turning vmap's failures into a
    :class:`StackingError` that says why the architecture cannot be stacked."""
    try:
        return vmap(fn, in_dims=in_dims, randomness=randomness)(*args)
    except RuntimeError as err:
        message = str(err)
        if "vmap" not in message and "Batching rule" not in message:
            raise
        raise StackingError(
            "the model cannot run under torch.func.vmap, so its copies cannot be trained "
            f"stacked: {message.splitlines()[0]} Common causes: Python control flow on tensor "
            "values (`if x.sum() > 0`, `.item()`), in-place writes into tensors that are not "
            "parameters/buffers, and ops without a batching rule."
        ) from err


class _OutputFnCall(nn.Module):
    """``forward(x, y) = output_fn(model, x, y)``, so ``functional_call`` can run an output
    function on one copy's tensors."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return check_output(self.output_fn(self.model, x, y), x.shape[0])


class StackedModel(nn.Module):
    """M copies of one architecture as one module with ``[M, ...]`` parameters and buffers.

    ``stacked`` is the architecture (copy 0's structure) whose parameters and buffers have been
    replaced by the stacked tensors, so ``state_dict()`` has the architecture's own keys with a
    leading model axis. It must not be called directly; :meth:`forward` runs copies ``start:stop``
    with ``vmap(functional_call)``. ``skeleton`` (on the meta device, not registered) is what
    :meth:`member` fills to hand out one copy.
    """

    def __init__(self, first: nn.Module, stacked: dict[str, Tensor], num_models: int) -> None:
        super().__init__()
        self.num_models = num_models
        aliases = _aliases(first)
        self.__dict__["_aliases"] = aliases
        self.__dict__["skeleton"] = copy.deepcopy(first).to("meta")
        module = copy.deepcopy(first)
        tensors: dict[str, Tensor] = {}
        for name, (kind, _) in _tensors(first).items():
            t = stacked[name]
            tensors[name] = nn.Parameter(t, requires_grad=t.requires_grad) if kind == "param" else t
        _install(module, aliases, tensors)
        self.stacked = module
        self.has_batch_norm = any(isinstance(mod, _BatchNorm) for mod in module.modules())

    def tensors(self, start: int = 0, stop: int | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Parameters and buffers of copies ``start:stop`` (views of the stacked tensors)."""
        stop = self.num_models if stop is None else stop
        whole = start == 0 and stop == self.num_models
        params = {n: p if whole else p[start:stop] for n, p in self.stacked.named_parameters()}
        buffers = {n: b if whole else b[start:stop] for n, b in self.stacked.named_buffers()}
        return params, buffers

    def forward(
        self,
        x: Tensor,
        start: int = 0,
        stop: int | None = None,
        per_copy_inputs: bool = False,
        randomness: Randomness = "different",
    ) -> Tensor:
        """Outputs of copies ``start:stop`` on ``x``: ``[stop - start, batch, ...]``.

        ``x`` is one batch shared by every copy, or with ``per_copy_inputs=True`` one batch per
        copy, ``[stop - start, batch, ...]``. Buffers are updated in place (BatchNorm running
        statistics, per copy) as the architecture's own forward would.
        """
        params, buffers = self.tensors(start, stop)
        return run_vmapped(
            lambda p, b, xx: functional_call(self.stacked, (p, b), (xx,)),
            (0, 0, 0 if per_copy_inputs else None),
            randomness,
            params, buffers, x,
        )

    def outputs(
        self,
        x: Tensor,
        y: Tensor,
        output_fn: OutputFn,
        start: int = 0,
        stop: int | None = None,
        randomness: Randomness = "different",
    ) -> Tensor:
        """``output_fn(copy_m, x, y)`` for copies ``start:stop``: ``[stop - start, batch]``."""
        call = _OutputFnCall(self.stacked, output_fn)
        params, buffers = self.tensors(start, stop)
        return run_vmapped(
            lambda p, b, xx, yy: functional_call(call, (p, b), (xx, yy)),
            (0, 0, None, None),
            randomness,
            {f"model.{k}": v for k, v in params.items()},
            {f"model.{k}": v for k, v in buffers.items()},
            x, y,
        )

    @torch.no_grad()
    def member(self, m: int) -> nn.Module:
        """Copy ``m`` as an ordinary module (its own tensors, detached, on the ensemble's device,
        in the ensemble's train/eval mode)."""
        if not 0 <= m < self.num_models:
            raise IndexError(f"copy {m} out of range for an ensemble of {self.num_models}")
        module = copy.deepcopy(self.__dict__["skeleton"])
        tensors: dict[str, Tensor] = {}
        for name, (kind, t) in _tensors(self.stacked).items():
            row = t[m].detach().clone()
            tensors[name] = nn.Parameter(row, requires_grad=t.requires_grad) if kind == "param" else row
        _install(module, self.__dict__["_aliases"], tensors)
        return module.train(self.stacked.training)
