"""Which parameters the engines cover, and how they are grouped into projection blocks.

:func:`plan_groups` walks a model once and sorts the selected parameters into
:class:`~lightning_tda.grads.projectors.ParamGroup` s:

- **Kronecker layers** (computed by the factored engine with hooks): every ``nn.Linear``,
  ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` -- or subclass that keeps their ``forward`` -- whose
  ``weight`` is selected. The bias, when selected too, is an extra all-ones input column.
- **Normalisation layers** (computed by the factored engine with hooks, projected densely):
  ``BatchNorm*`` using running statistics, ``LayerNorm`` and ``GroupNorm`` with affine
  parameters. Their per-example gradients are only ``2 * channels`` numbers, so these are formed.
- **Everything else** (embeddings, transposed or functional convolutions, a bias whose weight is
  not selected, parameters of ``nn.MultiheadAttention``, a parameter shared by several modules,
  free ``nn.Parameter`` s, ``BatchNorm`` without running statistics, modules with a custom
  ``forward``): dense groups, one per owning module. The factored engine computes these with the
  exact engine or leaves them out (``unsupported=``), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_tda.grads.projectors import ParamGroup

KRONECKER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class PlannedGroup:
    """A projection group plus how the factored engine computes it.

    ``how``: ``"linear"``/``"conv"`` (Kronecker, hooks), ``"norm"`` (dense, hooks) or
    ``"unsupported"`` (dense; exact engine or excluded). ``module`` is the owning module for the
    hook-computed kinds.
    """

    group: ParamGroup
    how: str
    module_name: str
    module: nn.Module | None


def select_parameters(model: nn.Module, params: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """The parameters to differentiate: ``params`` by name, or all with ``requires_grad``."""
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError("the model has no trainable parameters; pass params=[names] explicitly")
        return selected
    if isinstance(params, str):
        raise TypeError("params must be a list of parameter names, not a single string")
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(
            f"unknown parameter names {unknown[:5]}; the model has e.g. {list(named)[:5]} "
            "(names as in model.named_parameters())"
        )
    if not params:
        raise ValueError("params is empty; pass None for all trainable parameters")
    wanted = set(params)
    return {n: p for n, p in named.items() if n in wanted}


def _keeps_forward(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> bool:
    """True when ``module`` is one of ``bases`` and its class does not override ``forward``."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in bases)


def _norm_supported(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    return True


def plan_groups(model: nn.Module, selected: dict[str, nn.Parameter]) -> list[PlannedGroup]:
    """Group ``selected`` parameters (see the module docstring), in model parameter order."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    name_of = {id(p): n for n, p in selected.items()}
    in_mha = {
        id(sub)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        for sub in m.modules()
    }

    def own(module: nn.Module, attr: str) -> str | None:
        p = module._parameters.get(attr)
        if p is None or id(p) not in name_of or owners[id(p)] != 1:
            return None
        return name_of[id(p)]

    planned: dict[str, PlannedGroup] = {}  # keyed by first parameter name
    covered: set[str] = set()
    for module_name, module in model.named_modules():
        if id(module) in in_mha:
            continue
        if _keeps_forward(module, KRONECKER_TYPES):
            w = own(module, "weight")
            if w is None:
                continue
            b = own(module, "bias")
            group = ParamGroup.kronecker(
                module_name or "<root>",
                (w, selected[w].shape),
                (b, selected[b].shape) if b is not None else None,
            )
            how = "linear" if isinstance(module, nn.Linear) else "conv"
        elif _keeps_forward(module, NORM_TYPES) and _norm_supported(module):
            names = [n for n in (own(module, "weight"), own(module, "bias")) if n is not None]
            if not names:
                continue
            group = ParamGroup.dense(module_name or "<root>", [(n, selected[n].shape) for n in names])
            how = "norm"
        else:
            continue
        planned[group.param_names[0]] = PlannedGroup(group, how, module_name, module)
        covered.update(group.param_names)

    rest: dict[str, list[str]] = {}
    for n in selected:
        if n not in covered:
            owner = n.rsplit(".", 1)[0] if "." in n else "<root>"
            rest.setdefault(owner, []).append(n)
    taken = {pg.group.name for pg in planned.values()}
    for owner, names in rest.items():
        name = owner if owner not in taken else f"{owner}/unsupported"
        group = ParamGroup.dense(name, [(n, selected[n].shape) for n in names])
        planned[names[0]] = PlannedGroup(group, "unsupported", owner, None)

    order = {n: i for i, n in enumerate(selected)}
    return sorted(planned.values(), key=lambda pg: order[pg.group.param_names[0]])
