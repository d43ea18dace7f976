"""The exact engine: ``torch.func`` per-example gradients (``functional_call`` + ``vmap(grad)``),
computed in chunks and projected by a seeded block projection."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_tda.grads.engine import GradientEngine, OutputSpec
from lightning_tda.grads.layout import plan_groups
from lightning_tda.grads.projectors import IdentityProjection, ParamGroup, Projection
from lightning_tda.outputs import check_output

PER_EXAMPLE_GRADIENT_BUDGET = 2**26
"""Default chunk size: about this many gradient numbers (256 MiB in float32) per chunk."""


class _OutputModule(nn.Module):
    """``forward(x, y) = output_fn(model, x, y)``, so ``functional_call`` can swap the model's
    parameters under any user output function."""

    def __init__(self, model: nn.Module, fn: Any) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        return self.fn(self.model, x, y)


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def per_example_gradients(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor | None,
    output: OutputSpec,
    randomness: str = "error",
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Per-example gradients ``{name: [b, *shape]}`` of the output function w.r.t. ``names``,
    plus the output values ``[b]`` and (built-in output functions) the logits.

    For the built-ins the model runs once batched to get the logits and ``v_i = d out_i /
    d logits_i``; then ``vmap`` over examples of ``grad(<model(x_i), v_i>)`` -- the chain rule,
    exact. A user ``output_fn`` is differentiated directly under ``vmap``; one that cannot run
    under ``vmap`` (data-dependent Python control flow, e.g. the label checks of the built-ins)
    falls back, with a warning, to a loop of ``torch.func.grad`` over examples.
    """
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    if output.from_logits is not None:
        with torch.no_grad():
            logits = model(x)
        leaf = logits.detach().requires_grad_(True)
        values = check_output(output.from_logits(leaf, y), x.shape[0])  # type: ignore[arg-type]
        (v,) = torch.autograd.grad(values.sum(), leaf)

        def contracted(p: dict[str, Tensor], xi: Tensor, vi: Tensor) -> Tensor:
            return (functional_call(model, p, (xi.unsqueeze(0),)) * vi.unsqueeze(0)).sum()

        with torch.no_grad():
            grads = vmap(grad(contracted), in_dims=(None, 0, 0), randomness=randomness)(params, x, v)
        return grads, values.detach(), logits

    wrapper = _OutputModule(model, output.fn)

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor | None) -> tuple[Tensor, Tensor]:
        args = (xi.unsqueeze(0), None if yi is None else yi.unsqueeze(0))
        out = check_output(functional_call(wrapper, p, args), 1, "output_fn")
        return out.sum(), out.detach()

    wrapped = {f"model.{n}": t for n, t in params.items()}
    single_grad = grad(single, has_aux=True)
    with torch.no_grad():
        try:
            grads, values = vmap(single_grad, in_dims=(None, 0, None if y is None else 0), randomness=randomness)(
                wrapped, x, y
            )
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            warnings.warn(
                f"output_fn cannot run under torch.func.vmap ({str(error).splitlines()[0][:120]}...); "
                "the exact engine falls back to a loop over examples, which is much slower. "
                "Write output_fn without data-dependent Python control flow (no .item(), int(t), "
                "if on tensor values) to get the vectorised path",
                RuntimeWarning,
                stacklevel=2,
            )
            rows = [single_grad(wrapped, x[i], None if y is None else y[i]) for i in range(x.shape[0])]
            grads = {n: torch.stack([r[0][n] for r in rows]) for n in wrapped}
            values = torch.stack([r[1] for r in rows])
    return {n.removeprefix("model."): g for n, g in grads.items()}, values.reshape(-1), None


class ExactEngine(GradientEngine):
    """Exact per-example gradients, projected.

    ``projection``: ``"dense"`` (default; one i.i.d. Johnson-Lindenstrauss block over all
    covered parameters), ``"identity"`` (no projection: the full per-example gradients, for
    small models), ``"kronecker"`` (the factored engine's block structure, same groups and
    matrices), or a :class:`Projection` object -- e.g. ``factored_engine.projection`` -- whose
    parameters, ``proj_dim``, seed, projector and dtype then replace the engine's own.

    Cost per example: one forward and backward of the model (under ``vmap``) plus ``p * k``
    multiply-adds for the projection; memory ``chunk_size * p`` gradient numbers (default chunk:
    about 2**26 numbers, at most 256 examples).
    """

    name = "exact"

    def __init__(self, model: nn.Module, *, projection: str | Projection = "dense", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if isinstance(projection, Projection):
            named = dict(model.named_parameters())
            unknown = [n for n in projection.param_names if n not in named]
            if unknown:
                raise ValueError(f"the projection covers parameters the model lacks: {unknown[:5]}")
            self.selected = {n: named[n] for n in projection.param_names}
            self.projection = projection
            self.seed, self.projector, self.dtype = projection.seed, projection.kind, projection.dtype
        elif projection == "dense":
            shapes = [(n, p.shape) for n, p in self.selected.items()]
            self.projection = self._new_projection([ParamGroup.dense("all", shapes)])
        elif projection == "kronecker":
            self.projection = self._new_projection([pg.group for pg in plan_groups(model, self.selected)])
        elif projection == "identity":
            shapes = [(n, p.shape) for n, p in self.selected.items()]
            self.projection = IdentityProjection([ParamGroup.dense("all", shapes)], self.dtype, self.device)
        else:
            raise ValueError(
                f"unknown projection {projection!r}; choose 'dense', 'kronecker', 'identity' or pass a Projection"
            )
        self.randomness = "different" if has_dropout(model) else "error"
        if self.chunk_size is None:
            per_chunk = PER_EXAMPLE_GRADIENT_BUDGET // max(1, self.projection.num_params)
            self.chunk_size = max(1, min(256, per_chunk))

    def _project_chunk(self, x: Tensor, y: Tensor | None, feats: Tensor, outs: Tensor) -> Tensor | None:
        grads, values, logits = per_example_gradients(
            self.model, self.param_names, x, y, self.output, self.randomness
        )
        self.projection.project(grads, out=feats)
        outs.copy_(values)
        return None if logits is None else logits.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "projection": self.projection_kind}

    @property
    def projection_kind(self) -> str:
        if isinstance(self.projection, IdentityProjection):
            return "identity"
        kinds = {g.kind for g in self.projection.groups}
        return "dense" if kinds == {"dense"} and len(self.projection.groups) == 1 else "kronecker"
