"""The factored engine: projected per-example gradients from forward activations and output
gradients of each layer, without forming any per-example weight gradient.

For a ``nn.Linear``/``nn.Conv*`` layer with input patches ``a_t`` (``im2col`` columns for a
convolution, plus a constant 1 for the bias) and output gradients ``g_t`` at positions ``t``, the
per-example gradient of ``[W | b]`` is ``G = sum_t g_t a_t^T`` and its Kronecker projection is

    P_out G P_in^T = sum_t (P_out g_t) (P_in a_t)^T,

so the engine projects both sides first and contracts over positions: ``k_out x k_in`` numbers
per example and layer. For convolutions ``P_in a_t`` for all ``t`` is the layer's own convolution
with the ``k_in`` rows of ``P_in`` as filters (the projected ``im2col``, never built), grouped
convolutions included. One forward pass records each hooked layer's input and puts a tensor
hook on its output; one backward pass, asked only for the output gradients of the first hooked
layers (no weight gradient is computed, ``.grad`` is untouched), runs the hooks, and each hook
adds its layer's projected gradient to the features at once and drops its activation -- so the
pass costs about one plain forward + backward (often less) in time and in peak memory.

Normalisation layers (BatchNorm with running statistics, LayerNorm, GroupNorm) are computed from
the same hooks: their per-example gradients are ``sum g * x_hat`` and ``sum g`` (``2 * C``
numbers) and are projected with a dense block. Parameters of other layers go through the exact
engine (``unsupported="exact"``, default: one extra ``vmap`` pass over the model, restricted to
those parameters) or are left out (``unsupported="exclude"``, listed in
``excluded_param_names``).

Assumptions, checked where possible: every hooked layer sees the batch as dimension 0 (an error
otherwise), a hooked layer is called by the forward pass at least once (an error otherwise: a
layer whose weights are used functionally, e.g. ``F.linear(x, self.fc.weight)``, cannot be seen by
hooks -- use the exact engine), the model is deterministic in eval mode and examples do not
interact (as with any per-example gradient), and the model does not use activation
checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tda.grads.engine import GradientEngine
from lightning_tda.grads.exact import has_dropout, per_example_gradients
from lightning_tda.grads.layout import KRONECKER_TYPES, NORM_TYPES, PlannedGroup, plan_groups
from lightning_tda.grads.projectors import Block

Unsupported = Literal["exact", "exclude"]


@dataclass(eq=False)
class _Call:
    """One call of a hooked layer during the forward pass. ``inputs`` is dropped once the
    call's contribution is computed; ``output`` is kept only where the backward may start from
    it (so layer outputs autograd does not need are freed as in a plain forward)."""

    planned: PlannedGroup
    block: Block
    inputs: Tensor | None
    output: Tensor | None
    input_version: int
    output_version: int
    shape: torch.Size
    requires_grad: bool
    starts_graph: bool
    done: bool = False


class FactoredEngine(GradientEngine):
    """Hook-based projected per-example gradients (see the module docstring).

    ``unsupported``: what to do with selected parameters outside supported layers --
    ``"exact"`` (compute them with the exact engine; costs one more per-example pass) or
    ``"exclude"`` (drop them; they are listed in ``excluded_param_names`` and ``describe()``).

    Cost per example on top of one forward and an input-only backward: per layer, a convolution
    with ``k_in`` filters (Linear: a ``d_in x k_in`` product), ``d_out x k_out`` per position for
    the output side, and ``k_out x k_in`` per position for the contraction.
    """

    name = "factored"

    def __init__(self, model: nn.Module, *, unsupported: Unsupported = "exact", **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if unsupported not in ("exact", "exclude"):
            raise ValueError(f"unsupported must be 'exact' or 'exclude', got {unsupported!r}")
        planned = plan_groups(model, self.selected)
        hooked = [pg for pg in planned if pg.how != "unsupported"]
        if not hooked:
            kinds = ", ".join(t.__name__ for t in KRONECKER_TYPES + NORM_TYPES)
            raise ValueError(
                f"the factored engine supports none of the selected parameters of "
                f"{type(model).__name__}: it needs layers of type {kinds} (with running "
                "statistics for BatchNorm) holding them; use engine='exact' for this model"
            )
        rest = [pg for pg in planned if pg.how == "unsupported"]
        if unsupported == "exclude":
            self.excluded_param_names = [n for pg in rest for n in pg.group.param_names]
            planned, rest = hooked, []
        self.unsupported = unsupported
        self.projection = self._new_projection([pg.group for pg in planned])
        blocks = {b.group.name: b for b in self.projection.blocks}
        self._hooked = [(pg, blocks[pg.group.name]) for pg in hooked]
        self._fallback = [n for pg in rest for n in pg.group.param_names]
        self._randomness = "different" if has_dropout(model) else "error"
        self._direct = False  # set once a model needs every layer's output as a backward root

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        how = {pg.group.name: pg.how for pg, _ in self._hooked}
        for group in info["groups"]:
            group["computed_by"] = "hooks" if group["name"] in how else "exact"
        return {**info, "projection": "kronecker", "unsupported": self.unsupported}

    # ------------------------------------------------------------------ one chunk

    def _project_chunk(self, x: Tensor, y: Tensor | None, feats: Tensor, outs: Tensor) -> Tensor | None:
        values, logits, calls = self._forward(x, y, feats)
        if not self._backward(values, calls, direct=self._direct):
            # Some layer is not downstream of the graph's starting points (its input depends only
            # on unhooked parameters, e.g. a trainable embedding): redo this model directly.
            self._direct = True
            feats.zero_()
            values, logits, calls = self._forward(x, y, feats)
            self._backward(values, calls, direct=True)
        if self._fallback:
            grads, _, _ = per_example_gradients(
                self.model, self._fallback, x, y, self.output, self._randomness
            )
            self.projection.project(grads, out=feats)
        outs.copy_(values.detach())
        return None if logits is None else logits.detach()

    def _forward(
        self, x: Tensor, y: Tensor | None, feats: Tensor
    ) -> tuple[Tensor, Tensor | None, list[_Call]]:
        """Run the output function with hooks: record every hooked call and register a tensor
        hook that adds the call's projected contribution to ``feats`` as soon as autograd
        computes its output gradient (so no output gradient outlives its use)."""
        batch = x.shape[0]
        calls: list[_Call] = []
        leaves: list[Tensor] = []
        capturing = [True]

        def start_graph(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            """Make a layer input that nothing upstream differentiates a leaf requiring grad, so
            the layer's output gradient is reachable (the model input itself, inputs behind
            frozen layers)."""
            inputs = args[0] if args else next(iter(kwargs.values()))
            if not capturing[0] or inputs.requires_grad or not inputs.is_floating_point():
                return None
            leaf = inputs.detach().requires_grad_(True)
            leaves.append(leaf)
            if args:
                return (leaf, *args[1:]), kwargs
            return args, {**kwargs, next(iter(kwargs)): leaf}

        def on_grad(call: _Call, grad: Tensor) -> None:
            with torch.no_grad():
                feats[:, call.block.columns] += self._contribution(call, grad.reshape(call.shape), batch)
            call.done, call.inputs, call.output = True, None, None

        def hook_for(planned: PlannedGroup, block: Block) -> Any:
            def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                if not capturing[0]:
                    return
                if not isinstance(output, Tensor):
                    raise TypeError(f"layer {planned.module_name!r} returned {type(output).__name__}")
                inputs = args[0] if args else next(iter(kwargs.values()))
                starts = any(inputs is leaf for leaf in leaves)
                call = _Call(
                    planned, block, inputs, output if starts or self._direct else None,
                    inputs._version, output._version, output.shape, output.requires_grad, starts,
                )
                # Hook the tensor autograd still reaches if a later in-place op (ReLU(inplace=True))
                # rewrites the output: the output itself, or for a reshaped view (Linear on
                # [b, T, d]) its base. Hooks registered before an in-place op see the gradient
                # of the value before it.
                base = output._base
                if base is not None and not (
                    output.is_contiguous() and output.storage_offset() == 0 and base.numel() == output.numel()
                ):
                    base = None
                target = output if base is None else base
                if target.requires_grad:
                    target.register_hook(lambda g, call=call: on_grad(call, g))
                calls.append(call)

            return record

        handles = []
        try:
            for pg, block in self._hooked:
                module: nn.Module = pg.module  # type: ignore[assignment]
                handles.append(module.register_forward_pre_hook(start_graph, with_kwargs=True))
                handles.append(module.register_forward_hook(hook_for(pg, block), with_kwargs=True))
            values, logits = self._outputs(self.model, x, y)
        finally:
            capturing[0] = False
            for handle in handles:
                handle.remove()
        called = {id(c.planned) for c in calls}
        missed = [pg.module_name for pg, _ in self._hooked if id(pg) not in called]
        if missed:
            raise RuntimeError(
                f"layers {missed} were not called by the forward pass, so hooks cannot see their "
                "gradients; if their weights are used functionally (e.g. F.linear(x, "
                "self.fc.weight)) use engine='exact', if they are unused pass params= without them"
            )
        return values, logits, calls

    @staticmethod
    def _backward(values: Tensor, calls: list[_Call], direct: bool) -> bool:
        """One backward pass that computes no weight gradient; the tensor hooks do the rest.

        Default: the backward runs from the output down to the outputs of the layers whose
        input is one of the ``leaves`` made by the pre-hooks (the first layers), so it passes
        through every layer downstream of them and returns only those few gradients. Returns
        False when some layer was not reached (the caller then redoes the chunk ``direct``ly).

        ``direct``: ask for every layer's output gradient (or, for an output modified in place,
        its input's, so the backward passes through the layer and runs its hook).
        """
        if not values.requires_grad:
            return True
        live = [c for c in calls if c.requires_grad]  # not, e.g., a layer run under no_grad
        roots: dict[int, Tensor] = {}
        for call in live:
            if not (direct or call.starts_graph):
                continue
            assert call.output is not None and call.inputs is not None
            if call.output._version == call.output_version:
                roots[id(call.output)] = call.output
            elif call.inputs._version == call.input_version and call.inputs.requires_grad:
                roots[id(call.inputs)] = call.inputs
            else:
                raise RuntimeError(
                    f"both the input and the output of layer {call.planned.module_name!r} were "
                    "modified in place, so its gradient cannot be recovered; use engine='exact'"
                )
        if roots:
            torch.autograd.grad(values.sum(), list(roots.values()), allow_unused=True)
        missing = [c.planned.module_name for c in live if not c.done]
        if missing and direct:
            raise RuntimeError(
                f"the output gradient of layers {missing} was lost: their outputs were modified in "
                "place in a way hooks cannot follow (or are not used by the output); use "
                "engine='exact' for this model, or params= without these layers"
            )
        return not missing

    def _contribution(self, call: _Call, g: Tensor, batch: int) -> Tensor:
        """The call's projected gradient ``[batch, k_block]`` from its input and output gradient."""
        module, block = call.planned.module, call.block
        assert module is not None and call.inputs is not None
        a = call.inputs.detach()
        if a.shape[0] != batch or g.shape[0] != batch:
            raise RuntimeError(
                f"layer {call.planned.module_name!r} saw a tensor of shape {tuple(a.shape)} for a "
                f"batch of {batch}: the factored engine needs the batch as dimension 0 at every "
                "hooked layer; use engine='exact' for this model"
            )
        how = call.planned.how
        if how == "norm":
            return self._norm(module, block, a, g)
        p_out, p_in = self.projection.factors(block)
        dtype, has_bias = self.projection.dtype, block.group.has_bias
        a, g = a.to(dtype), g.to(dtype)
        d_w = block.group.d_in - has_bias
        if how == "linear":
            a = a.reshape(batch, -1, a.shape[-1])  # [b, T, d_w]
            pa = a @ p_in[:, :d_w].T  # [b, T, k_in]
            if has_bias:
                pa = pa + p_in[:, d_w]
            pg = g.reshape(batch, -1, g.shape[-1]) @ p_out.T  # [b, T, k_out]
            if pg.shape[1] == 1:  # one position: an outer product
                projected = pg.transpose(1, 2) * pa
            else:
                projected = pg.transpose(1, 2) @ pa
        else:
            groups = module.groups  # type: ignore[union-attr]
            filters = p_in[:, :d_w].reshape(block.k_in, *module.weight.shape[1:])  # type: ignore[union-attr]
            if groups > 1:
                filters = filters.repeat(groups, *([1] * (filters.ndim - 1)))
            if a.ndim == 4 and a.device.type == "cpu" and a.shape[1] // groups <= 16:
                # measured: oneDNN runs few-channel inputs ~3x faster in NHWC (slower above 16)
                a = a.contiguous(memory_format=torch.channels_last)
            pa = module._conv_forward(a, filters, None)  # type: ignore[operator]  # [b, G*k_in, *S]
            pa = pa.reshape(batch, groups, block.k_in, -1)
            if has_bias:
                pa = pa + p_in[:, d_w].view(1, 1, -1, 1)
            g = g.reshape(batch, groups, g.shape[1] // groups, -1)  # [b, G, C_out/G, T]
            if groups == 1:
                projected = (p_out @ g[:, 0]) @ pa[:, 0].transpose(1, 2)
            else:
                pg = torch.einsum("kgo,bgot->bgkt", p_out.reshape(block.k_out, groups, -1), g)
                projected = torch.einsum("bgkt,bgjt->bkj", pg, pa)
        return projected.reshape(batch, -1)[:, : block.k]

    def _norm(self, module: nn.Module, block: Block, a: Tensor, g: Tensor) -> Tensor:
        """Per-example gradients of a normalisation layer's affine parameters, projected:
        ``d weight = sum g * x_hat`` and ``d bias = sum g`` over all but the channel dims."""
        dtype, batch = self.projection.dtype, a.shape[0]
        a, g = a.to(dtype), g.to(dtype)
        if isinstance(module, _BatchNorm):
            # x_hat = (a - mean) * r, so sum g * x_hat = r * (sum g * a - mean * sum g): no x_hat
            channels = a.shape[1]
            a3, g3 = a.reshape(batch, channels, -1), g.reshape(batch, channels, -1)
            grad_bias = g3.sum(2)
            r = torch.rsqrt(module.running_var.to(dtype) + module.eps)  # type: ignore[union-attr]
            dot = (g3 * a3).sum(2)  # 4x faster than einsum's batched dot products on CPU
            grad_weight = r * (dot - module.running_mean.to(dtype) * grad_bias)  # type: ignore[union-attr]
        else:
            if isinstance(module, nn.LayerNorm):
                x_hat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
                dims = tuple(range(1, a.ndim - len(module.normalized_shape)))
            else:
                assert isinstance(module, nn.GroupNorm)
                x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
                dims = tuple(range(2, a.ndim))
            grad_weight = (g * x_hat).sum(dims) if dims else g * x_hat
            grad_bias = g.sum(dims) if dims else g
        parts = {"weight": grad_weight, "bias": grad_bias}
        flat = torch.cat([parts[n.rsplit(".", 1)[-1]].reshape(batch, -1) for n in block.group.param_names], 1)
        return self.projection.project_dense(block, flat)
