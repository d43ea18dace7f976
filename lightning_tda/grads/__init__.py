"""Projected per-example gradients: the engine under every attribution method.

Interface
---------
::

    from lightning_tda.grads import make_gradient_engine

    engine = make_gradient_engine(
        "factored",             # or "exact"
        model,                  # any nn.Module; its train/eval modes, requires_grad flags and
                                # .grad are left as they were, hooks removed after every call
        proj_dim=2048,          # k: output dimension
        seed=0,                 # projection seed: same seed -> same matrix in every process
        projector="rademacher", # or "gaussian"
        output_fn="margin",     # "margin" | "loss" | "correct_class_probability" | None (margin)
                                # | callable output_fn(module, x, y) -> Tensor[batch]
        params=None,            # None: all parameters with requires_grad; or a list of names
        dtype=torch.float32,    # dtype of the projection and of the features
        chunk_size=None,        # examples per inner step (exact: sized from the model; factored: all)
    )
    feats = engine.project(x, y)    # Tensor [batch, k]: projected gradients of output_fn, per example,
                                    # model in eval mode; raises NonFiniteGradientError (.indices)
    engine.last_outputs             # Tensor [batch]: output_fn values of that call (e.g. margins)
    engine.last_logits              # Tensor [batch, classes] for the built-in outputs, else None
    engine.proj_dim, engine.param_names, engine.excluded_param_names   # what is covered
    engine.projection               # the Projection (its .matrix() is the dense equivalent)
    engine.describe()               # JSON-able dict for the run manifest

Feature ``i`` of example ``n`` is ``sum_j P[j, i] * d output_fn(x_n, y_n) / d theta_j`` for the
covered parameters ``theta`` (in ``param_names`` order), where ``P = engine.projection.matrix()``
-- the same contract for both engines. ``P`` is scaled so that inner products are preserved in
expectation: ``E[feats_n . feats_m] = grad_n . grad_m``.

Engines
-------
- ``"exact"`` (:class:`ExactEngine`): ``torch.func.functional_call`` + ``vmap(grad)`` over
  examples, in chunks; every parameter is covered. ``projection="dense"`` (default) is one i.i.d.
  Johnson-Lindenstrauss matrix over all parameters, generated and applied in blocks;
  ``projection="kronecker"`` or ``projection=factored.projection`` gives the factored engine's
  block structure (used to test the two engines against each other).
- ``"factored"`` (:class:`FactoredEngine`): forward hooks on ``nn.Linear``/``nn.Conv1d``/
  ``nn.Conv2d``/``nn.Conv3d`` (and any module built from them), projecting output gradients and
  input activations separately, ``(P_out G)(P_in A)^T``: no per-example weight gradient is ever
  formed. Biases are covered (an all-ones input column). Affine parameters of BatchNorm (with
  running statistics), LayerNorm and GroupNorm are computed from the same hooks. Any other
  parameter goes through the exact engine (``unsupported="exact"``, default) or is left out
  (``unsupported="exclude"``, listed in ``excluded_param_names``) -- ``describe()`` says which
  group is computed how. About 1-2x the time of a plain forward+backward pass
  (``benchmarks/gradients.py``).

Projections (:mod:`lightning_tda.grads.projectors`) are generated block by block on the CPU from
``(seed, group, block)`` streams, so they are identical across processes, devices and machines;
see that module for the partition of ``k`` among layers and for the cache.

A plain per-example loop of ``torch.autograd.grad`` (:mod:`lightning_tda.grads.reference`) is the
reference both engines are tested against.
"""

from lightning_tda.grads.engine import GradientEngine, NonFiniteGradientError, make_gradient_engine
from lightning_tda.grads.exact import ExactEngine
from lightning_tda.grads.factored import FactoredEngine
from lightning_tda.grads.projectors import ParamGroup, Projection, random_matrix

__all__ = [
    "ExactEngine",
    "FactoredEngine",
    "GradientEngine",
    "NonFiniteGradientError",
    "ParamGroup",
    "Projection",
    "make_gradient_engine",
    "random_matrix",
]
