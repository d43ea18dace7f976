"""The common interface of the gradient engines, and :func:`make_gradient_engine`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from lightning_tda.grads.layout import select_parameters
from lightning_tda.grads.projectors import DEFAULT_CACHE_BYTES, PROJECTOR_KINDS, Projection, check_proj_dim
from lightning_tda.outputs import FROM_LOGITS, OUTPUT_FNS, OutputFn, check_output, resolve_output_fn

EngineName = Literal["exact", "factored"]


class NonFiniteGradientError(FloatingPointError):
    """Some examples have a NaN/inf output or projected gradient. ``indices`` are their positions
    in the batch given to :meth:`GradientEngine.project`."""

    def __init__(self, indices: list[int], batch_size: int) -> None:
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (", ..." if len(indices) > 20 else "")
        super().__init__(
            f"non-finite (NaN/inf) per-example output or gradient for {len(indices)} of "
            f"{batch_size} examples, at batch positions [{shown}]; the output function or the "
            "model overflows on these inputs -- inspect or drop them"
        )


@dataclass(frozen=True)
class OutputSpec:
    """A resolved output function: ``from_logits`` is set for the built-ins, so engines can run
    the model once and reuse its logits."""

    name: str
    fn: OutputFn
    from_logits: Callable[[Tensor, Tensor], Tensor] | None

    @staticmethod
    def resolve(output_fn: OutputFn | str | None) -> "OutputSpec":
        fn = resolve_output_fn(output_fn)
        for name, builtin in OUTPUT_FNS.items():
            if fn is builtin:
                return OutputSpec(name, fn, FROM_LOGITS[name])
        return OutputSpec(getattr(fn, "__qualname__", repr(fn)), fn, None)


class GradientEngine:
    """Projected per-example gradients of a per-example output function.

    Subclasses implement :meth:`_project_chunk`; this class handles inputs, chunking, modes,
    the NaN check and the description. See :mod:`lightning_tda.grads` for the contract.
    """

    name: str = "base"

    def __init__(
        self,
        model: nn.Module,
        proj_dim: int = 2048,
        seed: int = 0,
        projector: str = "rademacher",
        output_fn: OutputFn | str | None = None,
        params: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_proj_dim(proj_dim)
        if projector not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector {projector!r}; choose one of {list(PROJECTOR_KINDS)}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model = model
        self.requested_proj_dim = proj_dim
        self.output = OutputSpec.resolve(output_fn)
        self.selected = select_parameters(model, params)
        self.device = next(iter(self.selected.values())).device
        self.seed = int(seed)
        self.projector = projector
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.cache_bytes = cache_bytes
        self.projection: Projection  # set by subclasses
        self.excluded_param_names: list[str] = []
        self.last_outputs: Tensor | None = None
        self.last_logits: Tensor | None = None

    # ------------------------------------------------------------------ public interface

    @property
    def proj_dim(self) -> int:
        return self.projection.proj_dim

    @property
    def param_names(self) -> list[str]:
        """Covered parameters, in the order of the projection's rows."""
        return self.projection.param_names

    def project(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Projected per-example gradients ``[batch, proj_dim]`` (dtype ``self.dtype``, on the
        model's device) of the output function at ``(x, y)``, with the model in eval mode.

        Also sets :attr:`last_outputs` (``[batch]``, the output function's values) and
        :attr:`last_logits` (``model(x)`` for the built-in output functions, else None).
        Raises :class:`NonFiniteGradientError` listing examples with NaN/inf results.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a batched Tensor, got {type(x).__name__}")
        if x.ndim == 0:
            raise ValueError("x must have a batch dimension")
        if y is not None and (not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]):
            raise ValueError(
                f"y must be a Tensor with one entry per example ({x.shape[0]}), got "
                f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
            )
        if y is None and self.output.from_logits is not None:
            raise ValueError(f"the {self.output.name!r} output function needs labels y")
        batch = x.shape[0]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = x.to(self.device)
                x = x.clone() if x.is_inference() else x
                if y is not None:
                    y = y.to(self.device)
                    y = y.clone() if y.is_inference() else y
                self.model.eval()
                feats = torch.zeros(batch, self.proj_dim, dtype=self.dtype, device=self.device)
                outs = torch.zeros(batch, dtype=self.dtype, device=self.device)
                logits: list[Tensor] = []
                step = self.chunk_size or batch
                for start in range(0, batch, step):
                    sl = slice(start, min(batch, start + step))
                    chunk_logits = self._project_chunk(
                        x[sl], None if y is None else y[sl], feats[sl], outs[sl]
                    )
                    if chunk_logits is not None:
                        logits.append(chunk_logits)
        finally:
            for module, training in modes:
                module.training = training
        # cheap test first (a row sum is non-finite if any entry is), exact test only then
        if not bool(torch.isfinite(feats.sum(1) + outs).all()):
            bad = ~(torch.isfinite(feats).all(1) & torch.isfinite(outs))
            if bool(bad.any()):
                raise NonFiniteGradientError(torch.nonzero(bad).flatten().tolist(), batch)
        self.last_outputs = outs
        self.last_logits = torch.cat(logits) if logits else None
        return feats

    def describe(self) -> dict[str, Any]:
        """JSON-able description for a run manifest: engine, projector, seed, proj_dim, dtype,
        output function, covered and excluded parameters, and the per-group dimensions."""
        return {
            "engine": self.name,
            "output_fn": self.output.name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chunk_size": self.chunk_size,
            "excluded_params": list(self.excluded_param_names),
            **self.projection.describe(),
        }

    # ------------------------------------------------------------------ for subclasses

    def _project_chunk(self, x: Tensor, y: Tensor | None, feats: Tensor, outs: Tensor) -> Tensor | None:
        """Add the chunk's projected gradients into ``feats`` (a view), write its output values
        into ``outs``; return its logits (built-in output functions) or None."""
        raise NotImplementedError

    def _outputs(self, module: nn.Module, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(values [b], logits or None)`` of the output function, with autograd on."""
        if self.output.from_logits is not None:
            logits = module(x)
            return check_output(self.output.from_logits(logits, y), x.shape[0]), logits
        return check_output(self.output.fn(module, x, y), x.shape[0], "output_fn"), None

    def _new_projection(self, groups: list) -> Projection:
        return Projection(
            groups, self.requested_proj_dim, self.seed, self.projector, self.dtype, self.device, self.cache_bytes
        )


def make_gradient_engine(
    engine: EngineName,
    model: nn.Module,
    proj_dim: int = 2048,
    seed: int = 0,
    projector: str = "rademacher",
    output_fn: OutputFn | str | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    **options: Any,
) -> GradientEngine:
    """Build a gradient engine (see :mod:`lightning_tda.grads`).

    ``options``: ``projection=`` (exact engine: ``"dense"``, ``"kronecker"`` or a
    :class:`Projection`), ``unsupported=`` (factored engine: ``"exact"`` or ``"exclude"``),
    ``cache_bytes=`` (both).
    """
    from lightning_tda.grads.exact import ExactEngine
    from lightning_tda.grads.factored import FactoredEngine

    engines: dict[str, type[GradientEngine]] = {"exact": ExactEngine, "factored": FactoredEngine}
    if engine not in engines:
        raise ValueError(f"unknown gradient engine {engine!r}; choose 'exact' or 'factored'")
    return engines[engine](
        model,
        proj_dim=proj_dim,
        seed=seed,
        projector=projector,
        output_fn=output_fn,
        params=params,
        dtype=dtype,
        chunk_size=chunk_size,
        **options,
    )
