"""Attribution scores from recorded projected gradients (GradDot, GradCos, TracIn, TRAK,
projected influence) and full-parameter influence functions for small models."""

from lightning_tda.attribution.features import FeatureRecord, load_features, select_tags
from lightning_tda.attribution.influence import InfluenceProblem, conjugate_gradient, influence_scores, lissa
from lightning_tda.attribution.inspect import TopExamples, example_grid, self_influence, top_k
from lightning_tda.attribution.scorers import TRAK, GradCos, GradDot, ProjectedInfluence, Scorer, TracIn, write_scores

InfluenceFunction = ProjectedInfluence
"""The influence function on recorded projected gradients (Gauss-Newton Hessian); see
:func:`influence_scores` for exact/CG/LiSSA influence on full parameters of small models."""

__all__ = [
    "TRAK", "FeatureRecord", "GradCos", "GradDot", "InfluenceFunction", "InfluenceProblem", "ProjectedInfluence",
    "Scorer", "TopExamples", "TracIn", "conjugate_gradient", "example_grid", "influence_scores", "lissa",
    "load_features", "select_tags", "self_influence", "top_k", "write_scores",
]
