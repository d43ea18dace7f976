"""Counterfactual verification: does a feature transformation move A's predictions and not B's?

For each model ``m`` of an algorithm and each evaluated example ``x`` (by default the examples
whose label is not the target class), the effect of a transformation ``T`` on the target class
``c`` is

.. math::
    \\Delta_m = \\frac{1}{n} \\sum_x \\Pr\\nolimits_m(c \\mid T(x)) - \\Pr\\nolimits_m(c \\mid x),

and an algorithm's effect is the mean of :math:`\\Delta_m` over its models, with a percentile
bootstrap confidence interval over models (models resampled with replacement): the paper's
"distinguishing feature transformation" test (Definition 2) with the uncertainty coming from
training randomness. The difference A - B gets its own interval (both sides resampled). Every model
sees the same transformed inputs (the transformation runs once, under a seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_tda.images import to_uint8_image
from lightning_tda.results import AnalysisResult, ReporterLike
from lightning_tda.store import RunStore

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ModelLike = nn.Module | RunStore


@dataclass(frozen=True)
class VerificationResult(AnalysisResult):
    """Per algorithm: the effect of a transformation on ``Pr(target)`` per model, its mean and
    bootstrap confidence interval over models; the difference A - B with its interval.

    ``target_class`` is a class index, or -1 for "each example's own label". ``example_images``
    and ``transformed_images`` (uint8) show a few evaluated examples before and after.
    """

    names: tuple[str, str]
    transformation: str
    target_class: int
    effects_a: np.ndarray
    effects_b: np.ndarray
    mean_a: float
    ci_a: tuple[float, float]
    mean_b: float
    ci_b: tuple[float, float]
    difference: float
    ci_difference: tuple[float, float]
    n_examples: int
    confidence: float = 0.95
    n_bootstrap: int = 2000
    example_images: np.ndarray | None = None
    transformed_images: np.ndarray | None = None

    @property
    def target(self) -> str:
        return "own label" if self.target_class < 0 else f"class {self.target_class}"

    @property
    def excludes_zero_a(self) -> bool:
        """A responds: its confidence interval excludes 0."""
        return bool(self.ci_a[0] > 0 or self.ci_a[1] < 0)

    @property
    def excludes_zero_b(self) -> bool:
        return bool(self.ci_b[0] > 0 or self.ci_b[1] < 0)

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = []
        for name, effects, mean, ci, excludes in (
            (self.names[0], self.effects_a, self.mean_a, self.ci_a, self.excludes_zero_a),
            (self.names[1], self.effects_b, self.mean_b, self.ci_b, self.excludes_zero_b),
            (f"{self.names[0]} - {self.names[1]}", None, self.difference, self.ci_difference,
             bool(self.ci_difference[0] > 0 or self.ci_difference[1] < 0)),
        ):
            rows.append({
                "algorithm": name, "transformation": self.transformation, "target": self.target,
                "effect": float(mean), "ci_low": float(ci[0]), "ci_high": float(ci[1]),
                "ci_excludes_zero": bool(excludes), "models": None if effects is None else int(len(effects)),
                "examples": self.n_examples,
            })
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        return {
            "effect_a": self.mean_a, "effect_a_ci_low": self.ci_a[0], "effect_a_ci_high": self.ci_a[1],
            "effect_b": self.mean_b, "effect_b_ci_low": self.ci_b[0], "effect_b_ci_high": self.ci_b[1],
            "effect_difference": self.difference,
        }

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Both algorithms side by side: mean effect with its interval, and each model's effect."""
        from lightning_tda.modeldiff.plots import plot_verification

        return plot_verification(self, ax=ax)

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, table and figure; with example images, a table of examples before and after."""
        super().log(reporter, prefix)
        if self.example_images is not None and self.transformed_images is not None:
            import pandas as pd

            frame = pd.DataFrame({"example": np.arange(len(self.example_images))})
            images = {"original": list(self.example_images), "transformed": list(self.transformed_images)}
            reporter.log_frame(f"{prefix}_examples", frame, images=images)


def load_models(models: Sequence[ModelLike], model_fn: Callable[[], nn.Module] | None, checkpoint: str | None, name: str) -> list[nn.Module]:
    """Modules as given; RunStores as ``model_fn()`` with the store's checkpoint loaded (its last
    by default, or ``checkpoint``)."""
    out = []
    for model in models:
        if isinstance(model, RunStore):
            if model_fn is None:
                raise ValueError(f"{name} holds RunStores: pass model_fn (a function returning the untrained module) to load their checkpoints")
            tags = model.checkpoint_tags()
            if not tags:
                raise ValueError(f"the RunStore at {model.path} has no checkpoints; record them with a CheckpointRecorder")
            tensors, _ = model.load_checkpoint(checkpoint or tags[-1])
            module = model_fn()
            module.load_state_dict(tensors)
            out.append(module)
        elif isinstance(model, nn.Module):
            out.append(model)
        else:
            raise TypeError(f"{name} must hold torch modules or RunStores, got {type(model).__name__}")
    return out


def _inputs_and_labels(dataset: Dataset | Tensor) -> tuple[Tensor, Tensor | None]:
    if isinstance(dataset, Tensor):
        return dataset, None
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if isinstance(images, Tensor) and isinstance(targets, Tensor) and getattr(dataset, "transform", None) is None:
        return images, targets
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch["x"], batch["y"])
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def apply_transformation(transform: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 256, seed: int = 0) -> Tensor:
    """``transform`` over ``x`` in batches under ``torch.manual_seed(seed)`` (the global generator
    is restored afterwards); a transformation that changes a batch's shape is refused."""
    outs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for lo in range(0, len(x), batch_size):
            batch = x[lo : lo + batch_size]
            out = transform(batch.clone())
            if not isinstance(out, Tensor) or out.shape != batch.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"the transformation {transform!r} turned a batch of shape {tuple(batch.shape)} into {shape}: "
                    "a transformation must return inputs of the same shape as it was given"
                )
            outs.append(out)
    return torch.cat(outs)


@torch.no_grad()
def target_probabilities(model: nn.Module, x: Tensor, target: Tensor, batch_size: int = 256) -> Tensor:
    """``Pr(target_i | x_i)`` under ``model`` (softmax of its logits, eval mode), ``[n]``."""
    was_training = model.training
    model.eval()
    try:
        probs = [torch.softmax(model(x[lo : lo + batch_size]).float(), -1) for lo in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(probs).gather(1, target[:, None]).squeeze(1)


def bootstrap_interval(effects: np.ndarray, n_bootstrap: int, confidence: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``effects`` (resampled with replacement)."""
    draws = rng.integers(0, len(effects), size=(n_bootstrap, len(effects)))
    means = effects[draws].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def verify(
    models_a: Sequence[ModelLike],
    models_b: Sequence[ModelLike],
    dataset: Dataset | Tensor,
    transform: Callable[[Tensor], Tensor],
    target_class: int | Literal["label"],
    *,
    names: Sequence[str] = ("A", "B"),
    model_fn: Callable[[], nn.Module] | None = None,
    checkpoint: str | None = None,
    exclude_target: bool = True,
    batch_size: int = 256,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    num_images: int = 8,
    progress: bool = False,
) -> VerificationResult:
    """Effect of ``transform`` on ``Pr(target_class)`` for each algorithm's models (module docstring).

    Args:
        models_a, models_b: each algorithm's models: modules returning logits, or RunStores with
            checkpoints (then ``model_fn`` builds the module and ``checkpoint`` picks the tag,
            the last by default). At least 2 per algorithm (the interval is over models).
        dataset: the examples: a dataset of ``(x, y)`` or a tensor of inputs.
        transform: a callable on a batch of inputs returning a batch of the same shape.
        target_class: the class whose probability is measured, or ``"label"`` for each
            example's own label (e.g. how much a shift hurts the correct class).
        exclude_target: with a class index and labels, evaluate only examples of other classes.
        n_bootstrap, confidence, seed: the bootstrap interval (and the transformation's seed).
    """
    if target_class != "label" and (isinstance(target_class, bool) or not isinstance(target_class, (int, np.integer))):
        raise ValueError(f"target_class must be a class index or 'label', got {target_class!r}")
    if not callable(transform):
        raise TypeError(f"transform must be a callable on a batch of inputs, got {type(transform).__name__}")
    if not 0 < confidence < 1 or n_bootstrap < 1:
        raise ValueError(f"confidence must be in (0, 1) and n_bootstrap >= 1, got {confidence}, {n_bootstrap}")
    names = tuple(names)
    groups = []
    for name, models in (("models_a", models_a), ("models_b", models_b)):
        models = list(models) if not isinstance(models, (nn.Module, RunStore)) else [models]
        if len(models) < 2:
            raise ValueError(f"{name} has {len(models)} model(s): the confidence interval over models needs at least 2 per algorithm")
        groups.append(load_models(models, model_fn, checkpoint, name))
    x, labels = _inputs_and_labels(dataset)
    if target_class == "label":
        if labels is None:
            raise ValueError("target_class='label' needs a dataset with labels, not a tensor of inputs")
        target = labels.long()
    else:
        keep = (labels != int(target_class)) if (exclude_target and labels is not None) else torch.ones(len(x), dtype=torch.bool)
        x = x[keep]
        target = torch.full((len(x),), int(target_class), dtype=torch.long)
    if len(x) == 0:
        raise ValueError("no examples to evaluate (every example has the target label; pass exclude_target=False)")
    transformed = apply_transformation(transform, x, batch_size, seed)
    effects = []
    for models in groups:
        per_model = []
        for model in tqdm(models, desc="verify", disable=not progress):
            delta = target_probabilities(model, transformed, target, batch_size) - target_probabilities(model, x, target, batch_size)
            per_model.append(float(delta.double().mean()))
        effects.append(np.asarray(per_model))
    rng = np.random.default_rng(seed)
    ci_a = bootstrap_interval(effects[0], n_bootstrap, confidence, rng)
    ci_b = bootstrap_interval(effects[1], n_bootstrap, confidence, rng)
    draws_a = effects[0][rng.integers(0, len(effects[0]), size=(n_bootstrap, len(effects[0])))].mean(1)
    draws_b = effects[1][rng.integers(0, len(effects[1]), size=(n_bootstrap, len(effects[1])))].mean(1)
    tail = (1 - confidence) / 2
    ci_difference = (float(np.quantile(draws_a - draws_b, tail)), float(np.quantile(draws_a - draws_b, 1 - tail)))
    shown = min(num_images, len(x))
    return VerificationResult(
        names=names,  # type: ignore[arg-type]
        transformation=repr(transform),
        target_class=-1 if target_class == "label" else int(target_class),
        effects_a=effects[0], effects_b=effects[1],
        mean_a=float(effects[0].mean()), ci_a=ci_a, mean_b=float(effects[1].mean()), ci_b=ci_b,
        difference=float(effects[0].mean() - effects[1].mean()), ci_difference=ci_difference,
        n_examples=int(len(x)), confidence=confidence, n_bootstrap=n_bootstrap,
        example_images=np.stack([to_uint8_image(img) for img in x[:shown]]) if shown else None,
        transformed_images=np.stack([to_uint8_image(img) for img in transformed[:shown]]) if shown else None,
    )


__all__ = ["VerificationResult", "apply_transformation", "bootstrap_interval", "load_models", "target_probabilities", "verify"]
