"""Reference implementation: a plain loop of ``torch.autograd.grad`` over examples.

Slow and obviously right; the tests hold both engines to it and the benchmark times it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_tda.grads.projectors import Projection
from lightning_tda.outputs import OutputFn, check_output, resolve_output_fn


def naive_per_example_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    names: Sequence[str],
    output_fn: OutputFn | str | None = None,
) -> dict[str, Tensor]:
    """``{name: [b, *shape]}``: one forward and one ``torch.autograd.grad`` per example, with
    the model in eval mode (its modes are restored)."""
    fn = resolve_output_fn(output_fn)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows: list[tuple[Tensor, ...]] = []
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in range(x.shape[0]):
                out = check_output(fn(model, x[i : i + 1], None if y is None else y[i : i + 1]), 1)
                rows.append(torch.autograd.grad(out.sum(), params, allow_unused=True, materialize_grads=True))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def naive_projected_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    projection: Projection,
    output_fn: OutputFn | str | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """``[b, k]``: :func:`naive_per_example_gradients` in chunks, projected by ``projection``."""
    out = []
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        grads = naive_per_example_gradients(
            model, x[sl], None if y is None else y[sl], projection.param_names, output_fn
        )
        out.append(projection.project(grads))
    return torch.cat(out)
