"""Gradient-based attribution on the final model, each in the gold standard's sign convention.

Every score here estimates ``tau(i, z)``: **positive when removing training instance i raises
the test loss of z** (i helped z). Scales are each method's own (the comparison uses cosine
similarity and Spearman correlation per test example, which ignore a positive factor per test
example). The conventions, with ``g = grad of the per-example loss`` at the final model,
``H`` the Hessian of the training objective ``(1/n) sum_j loss_j + weight_decay/2 ||theta||^2``:

================================  ==========================================================
method (key)                      score, and why it carries the gold standard's sign
================================  ==========================================================
``grad_dot``                      ``g_z . g_i``: one gradient step without ``i`` changes
                                  ``loss_z`` by ``+lr/(n-1) g_z . g_i`` to first order
``grad_cos``                      ``g_z . g_i / (|g_z| |g_i|)``
``influence_{exact,cg,lissa}:f``  ``(1/n) g_z^T (H + lambda I)^-1 g_i`` = minus
                                  :func:`~lightning_tda.attribution.influence_scores` with
                                  ``output="loss"`` (which is the change of ``loss_z`` when
                                  ``i`` is *up*-weighted by ``1/n``); removal is ``eps=-1/n``
``influence_projected:f``         ``q_z`` times :class:`~lightning_tda.attribution.ProjectedInfluence`
``trak``                          ``q_z`` times :class:`~lightning_tda.attribution.TRAK`
``datainf:f``                     :func:`~lightning_tda.further_training.datainf.datainf_scores`
``ekfac`` / ``ekfac:heuristic``   kronfluence's EK-FAC pairwise scores with the loss as
                                  measurement (positive: helpful), its default damping
                                  ``1e-8`` / its heuristic ``0.1 x mean eigenvalue``
================================  ==========================================================

The projected methods (TRAK, projected Gauss-Newton influence) work on margin gradients
``grad m = -g / q`` (``q = 1 - p_y``): the attribution scorers' scores are effects on the test
*margin* (positive raises it) and ``d loss_z = -q_z d m_z``, so the effect on the test loss of a
removal is ``+q_z`` times the margin score. Damping ``f`` is a multiple of the mean eigenvalue of
the (empirical) curvature: ``mean_i |g_i|^2 / p`` for the full-parameter solvers (the seed's
choice, after Grosse et al. 2023), ``trace(H_GN) / k`` for the projected one; DataInf's per-layer
damping is ``f`` times its mean squared gradient entry (DataInf's own default is ``f = 0.1``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_tda.attribution import TRAK, FeatureRecord, InfluenceProblem, ProjectedInfluence, influence_scores
from lightning_tda.schema import OUTPUT_MARGIN
from lightning_tda.data import BatchFn
from lightning_tda.further_training.datainf import datainf_scores
from lightning_tda.further_training.gold import dataset_tensors, load_final_model
from lightning_tda.further_training.settings import check_instances
from lightning_tda.grads import make_gradient_engine
from lightning_tda.outputs import out_to_loss_from_logits
from lightning_tda.store import RunStore

FAMILIES = (
    "grad_dot", "grad_cos", "influence_exact", "influence_cg", "influence_lissa", "influence_projected",
    "trak", "datainf", "ekfac",
)
DAMPED = ("influence_exact", "influence_cg", "influence_lissa", "influence_projected", "datainf")
LABELS = {
    "grad_dot": "Grad-Dot", "grad_cos": "Grad-Cos", "influence_exact": "IF exact", "influence_cg": "IF CG",
    "influence_lissa": "IF LiSSA", "influence_projected": "IF projected GN", "trak": "TRAK",
    "datainf": "DataInf", "ekfac": "EK-FAC",
}


def method_label(key: str) -> str:
    """A readable name for a method key (``influence_cg:0.1`` -> ``IF CG (damping 0.1x)``)."""
    family, _, option = key.partition(":")
    label = LABELS.get(family, family)
    if not option:
        return label
    return f"{label} ({option})" if option == "heuristic" else f"{label} (damping {option}x)"


def loss_gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[int]]:
    """Full per-example gradients of the cross-entropy loss ``[n, p]`` (float64) and the sizes
    of the parameter tensors they concatenate."""
    engine = make_gradient_engine("exact", model, output_fn="loss", projection="identity", dtype=torch.float64)
    named = dict(model.named_parameters())
    return engine.project(x, y), [named[n].numel() for n in engine.param_names]


def margin_features(model: nn.Module, x: Tensor, y: Tensor, proj_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Projected margin gradients ``[n, k]`` and out-to-loss terms ``q = 1 - p_y`` ``[n]`` (no
    projection when ``proj_dim`` is at least the number of parameters)."""
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    options = {"projection": "identity"} if proj_dim >= num_params else {}
    engine = make_gradient_engine(
        "exact", model, proj_dim=min(proj_dim, num_params), seed=seed, output_fn="margin", dtype=torch.float64, **options
    )
    phi = engine.project(x, y)
    assert engine.last_logits is not None
    return phi, out_to_loss_from_logits(engine.last_logits.double(), y)


class BlockwiseInfluenceProblem(InfluenceProblem):
    """:class:`~lightning_tda.attribution.InfluenceProblem` for small models that assembles the
    explicit Hessian once, from Hessian-vector products a block of columns at a time (the memory
    of ``block`` products instead of ``p`` at once in ``torch.func.hessian``), and then serves
    every Hessian-vector product of CG and LiSSA as a product with it: the same products (to
    rounding), at ``p^2`` operations a column instead of a pass over the training set."""

    block: int = 128

    def hessian(self) -> Tensor:
        cached = self.__dict__.get("_hessian")
        if cached is not None:  # one Hessian serves the whole damping sweep and every solver
            return cached.clone()
        p = self.theta.numel()
        eye = torch.eye(p, dtype=self.theta.dtype, device=self.theta.device)
        columns = [super(BlockwiseInfluenceProblem, self).hvp(eye[:, start : start + self.block])
                   for start in range(0, p, self.block)]
        h = torch.cat(columns, dim=1)
        self.__dict__["_hessian"] = 0.5 * (h + h.T)
        return self.__dict__["_hessian"].clone()

    def hvp(self, v: Tensor, indices: Tensor | None = None) -> Tensor:
        if indices is not None:  # a minibatch's (stochastic LiSSA): from autograd
            return super().hvp(v, indices)
        if self.__dict__.get("_hessian") is None:
            self.hessian()
        return self.__dict__["_hessian"] @ v


def _feature_record(phi: Tensor, q: Tensor, split: str) -> FeatureRecord:
    return FeatureRecord("final model", "final", split, 0, 1.0, phi, q, output=OUTPUT_MARGIN)


def _scorer_scores(scorer, phi_train: Tensor, q_train: Tensor, phi_test: Tensor, q_test: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """An attribution scorer on the final model's features (one checkpoint, one run)."""
    train, test = _feature_record(phi_train, q_train, "train"), _feature_record(phi_test, q_test, "test")
    return scorer.score_features(train, test)


def _parse_methods(methods: Sequence[str], damping_factors: Sequence[float]) -> list[tuple[str, str, float | None]]:
    """``(key, family, damping factor)`` per method to compute; a damped family without a factor
    expands to the sweep ``damping_factors``."""
    out: list[tuple[str, str, float | None]] = []
    for method in methods:
        family, _, option = method.partition(":")
        if family not in FAMILIES:
            raise ValueError(f"unknown method {method!r}; choose from {FAMILIES} (damped ones as 'family:factor')")
        if family in DAMPED:
            factors = [float(option)] if option else [float(f) for f in damping_factors]
            if any(not f > 0 for f in factors):
                raise ValueError(f"damping factors must be positive, got {factors}")
            out += [(f"{family}:{f:g}", family, f) for f in factors]
        elif family == "ekfac":
            if option not in ("", "heuristic"):
                raise ValueError(f"ekfac takes no option or ':heuristic', got {method!r}")
            out.append((method, family, None))
        else:
            if option:
                raise ValueError(f"{family} takes no damping, got {method!r}")
            out.append((family, family, None))
    return out


def final_model_scores(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    instances: Sequence[int] | Tensor,
    methods: Sequence[str] = ("grad_dot", "grad_cos", "influence_exact", "trak", "datainf"),
    *,
    weight_decay: float = 0.0,
    damping_factors: Sequence[float] = (0.1, 1.0, 10.0),
    proj_dim: int = 2048,
    projection_seed: int = 0,
    cg_iters: int | None = 500,
    lissa_iters: int = 1000,
    store: RunStore | str | None = None,
    checkpoint: str | Mapping[str, Tensor] | None = None,
    batch_fn: BatchFn | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Scores ``[n_test, len(instances)]`` of gradient methods on the final model, keyed by method,
    all in the gold standard's sign (module docstring). For cross-entropy classifiers.

    Args:
        methods: families from :data:`FAMILIES`; a damped family (``influence_*``, ``datainf``)
            runs the damping sweep ``damping_factors`` unless given one as ``"family:factor"``.
        weight_decay: the L2 term of the training objective, part of ``H`` (use the further
            training's).
        proj_dim, projection_seed: the projection of TRAK and the projected influence.
        cg_iters, lissa_iters: iteration caps of the CG and LiSSA solvers.
    """
    plan = _parse_methods(methods, damping_factors)
    final = load_final_model(model, store, checkpoint)
    x_train, y_train = dataset_tensors(train_dataset, "training", batch_fn)
    x_test, y_test = dataset_tensors(test_dataset, "test", batch_fn)
    columns = check_instances(instances, len(y_train))
    param = next(final.parameters())
    if x_train.dtype.is_floating_point:
        x_train, x_test = x_train.to(param.dtype), x_test.to(param.dtype)
    x_train, y_train, x_test, y_test = (t.to(param.device) for t in (x_train, y_train, x_test, y_test))
    was_training = final.training
    final.eval()
    families = {family for _, family, _ in plan}
    out: dict[str, np.ndarray] = {}
    cache: dict[str, object] = {}
    try:
        if families & {"grad_dot", "grad_cos", "datainf", "influence_exact", "influence_cg", "influence_lissa"}:
            g_train, sizes = loss_gradients(final, x_train, y_train)
            g_test, _ = loss_gradients(final, x_test, y_test)
            cache["fisher_scale"] = float((g_train * g_train).sum(1).mean()) / g_train.shape[1]
        if families & {"trak", "influence_projected"}:
            phi_train, q_train = margin_features(final, x_train, y_train, proj_dim, projection_seed)
            phi_test, q_test = margin_features(final, x_test, y_test, proj_dim, projection_seed)
        for key, family, factor in tqdm(plan, desc="final-model methods", disable=not progress):
            if family == "grad_dot":
                scores = g_test @ g_train[columns].T
            elif family == "grad_cos":
                unit = lambda g: g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)  # noqa: E731
                scores = unit(g_test) @ unit(g_train[columns]).T
            elif family == "datainf":
                scores = datainf_scores(g_train, g_test, sizes, columns, damping_factor=float(factor))  # type: ignore[arg-type]
            elif family.startswith("influence_") and family != "influence_projected":
                solver = family.removeprefix("influence_")
                problem = cache.get("problem")
                if problem is None:
                    problem = cache["problem"] = BlockwiseInfluenceProblem(
                        copy.deepcopy(final).double(), x_train.double() if x_train.is_floating_point() else x_train,
                        y_train, x_test.double() if x_test.is_floating_point() else x_test, y_test,
                        output="loss", weight_decay=weight_decay,
                    )
                damping = float(factor) * float(cache["fisher_scale"])  # type: ignore[arg-type]
                iters = cg_iters if solver == "cg" else lissa_iters if solver == "lissa" else None
                # LiSSA on the whole training set each step (deterministic, as these methods were
                # compared); influence_scores' default is the stochastic minibatch LiSSA
                full = dict(lissa_batch_size=len(y_train), lissa_repeats=1) if solver == "lissa" else {}
                scores = -influence_scores(problem, damping=damping, method=solver, iters=iters, **full).detach()[:, columns]  # type: ignore[arg-type]
            elif family == "influence_projected":
                weights = (q_train * (1 - q_train)).clamp_min(0)
                scale = float((weights * (phi_train * phi_train).sum(1)).mean()) / phi_train.shape[1]
                scorer = ProjectedInfluence(damping=float(factor) * scale, progress=False)
                scores = q_test[:, None] * _scorer_scores(scorer, phi_train, q_train, phi_test, q_test)[:, columns]
            elif family == "trak":
                scores = q_test[:, None] * _scorer_scores(TRAK(progress=False), phi_train, q_train, phi_test, q_test)[:, columns]
            else:  # ekfac
                from lightning_tda.further_training.ekfac import ekfac_scores

                scores = torch.as_tensor(ekfac_scores(
                    final, x_train, y_train, x_test, y_test, columns, heuristic_damping=key.endswith(":heuristic"),
                ))
            values = scores.double().cpu().numpy()
            if not np.isfinite(values).all():
                warnings.warn(f"{key}: non-finite scores (the solver diverged, e.g. LiSSA or CG on an "
                              "indefinite Hessian with too little damping); left out", RuntimeWarning, stacklevel=2)
                continue
            out[key] = values
    finally:
        final.train(was_training)
    return out
