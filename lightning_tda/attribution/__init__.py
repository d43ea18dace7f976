"""Attribution scores from recorded projected gradients (GradDot, GradCos, TracIn, TRAK, projected
influence), computed tile by tile in bounded memory, and full-parameter influence functions for
small models."""

from lightning_tda.attribution.features import FeatureRecord, FeatureSource, load_features, select_tags
from lightning_tda.attribution.influence import (
    InfluenceProblem, SolveResult, conjugate_gradient, influence_scores, lissa, power_iteration,
)
from lightning_tda.attribution.inspect import TopExamples, example_grid, self_influence, top_k
from lightning_tda.attribution.scorers import (
    DEFAULT_TRAK_RELATIVE_DAMPING, TRAK, GradCos, GradDot, ProjectedInfluence, Scorer, TracIn, write_scores,
)
from lightning_tda.attribution.streaming import StoredScores, plan_tiles

InfluenceFunction = ProjectedInfluence
"""The influence function on recorded projected gradients (Gauss-Newton Hessian); see
:func:`influence_scores` for exact/CG/LiSSA influence on full parameters of small models."""

__all__ = [
    "DEFAULT_TRAK_RELATIVE_DAMPING", "TRAK", "FeatureRecord", "FeatureSource", "GradCos", "GradDot",
    "InfluenceFunction", "InfluenceProblem", "ProjectedInfluence", "Scorer", "SolveResult", "StoredScores",
    "TopExamples", "TracIn", "conjugate_gradient", "example_grid", "influence_scores", "lissa", "load_features",
    "plan_tiles", "power_iteration", "select_tags", "self_influence", "top_k", "write_scores",
]
