"""``ModelDiff``: compare two learning algorithms by how their predictions use the training data.

Given attribution matrices of algorithms A and B over the same test and training examples (each
averaged over several models of its algorithm), :meth:`ModelDiff.directions` finds the
distinguishing training directions of one against the other with
:func:`~lightning_tda.modeldiff.functional.residual_pca` (normalise, residual, PCA, explained
variance; the steps are documented there).

**Noise floor.** Attribution scores estimated from a few models are noisy, and a residual PCA
always finds *some* direction. So each direction's *variance gap* (its variance fraction under
its own algorithm minus under the other) is compared with the gap that noise alone produces:
the same statistic between two independent halves of one algorithm's models,

.. math::
    \\text{floor} = \\max_{X \\in \\{A, B\\}}\\; \\max\\big(\\text{gap}(X_1 \\text{ vs } X_2),\\; \\text{gap}(X_2 \\text{ vs } X_1)\\big),

the largest gap among the top ``num`` directions of those null comparisons. Each half has half
the models, so its scores are noisier than the full comparison's and the floor errs on the high
side. A direction is *distinguishing* when its gap exceeds ``noise_margin * floor`` (1.5 by
default: clearly above, not at, the largest gap seen between halves of one algorithm). The floor
needs at least two models per algorithm.

**Reading the gap.** The residual of B against A subtracts B's projection on A's attribution
vector, so a feature only A uses can show up among B's top residual directions too, with a minus
sign: its variance is then larger under A and its gap negative, and it is not called
distinguishing for B. Variance fractions are shares of each algorithm's total, so a strong
feature of A lowers A's share along every other direction a little (B's directions gain gap);
the margin of 1.5 covers that in our synthetic checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch

from lightning_tda.modeldiff.directions import DistinguishingDirections
from lightning_tda.modeldiff.functional import (
    ArrayLike,
    Method,
    RankError,
    ResidualOf,
    check_pair,
    max_rank,
    residual_pca,
)
from lightning_tda import schema
from lightning_tda.store import RunStore, check_stores_share_datasets

if TYPE_CHECKING:
    from lightning_tda.attribution import Scorer


def algorithm_of(store: RunStore) -> str | None:
    """The algorithm label ``store`` was created with, or None."""
    return store.manifest.get(schema.ALGORITHM)


def check_same_datasets(stores: Sequence[RunStore], splits: Sequence[str]) -> None:
    """Raise unless every store was recorded on the same ``splits`` datasets (equal fingerprints);
    the error names both stores (:func:`lightning_tda.store.check_stores_share_datasets`)."""
    check_stores_share_datasets(stores, splits, "ModelDiff compares algorithms on the same training and test examples")


def _as_store_list(stores: Any, name: str) -> list[RunStore]:
    stores = [stores] if isinstance(stores, RunStore) else list(stores)
    if not stores:
        raise ValueError(f"{name} is empty: pass one RunStore per trained model of that algorithm")
    bad = [type(s).__name__ for s in stores if not isinstance(s, RunStore)]
    if bad:
        raise TypeError(f"{name} must hold RunStores (open them with RunStore(path)), got {bad}")
    return stores


def _check_names(names: Sequence[str]) -> tuple[str, str]:
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names) or names[0] == names[1]:
        raise ValueError(f"names must be two different non-empty strings, got {names!r}")
    return names  # type: ignore[return-value]


class ModelDiff:
    """Compare two algorithms' attribution matrices ``[n_test, n_train]`` (numpy or torch).

    Args:
        scores_a, scores_b: attribution scores of algorithm A and B over the same test and
            training examples, in the same order.
        names: the algorithms' names, for tables and figures.
        halves_a, halves_b: optional pairs of attribution matrices, each from one of two
            disjoint halves of that algorithm's models: they give the noise floor (module
            docstring). Without them no direction is called distinguishing.
        residual_of: ``"normalized"`` (the paper: normalise, then the residual) or ``"raw"``
            (MadryLab's PyPI package: the residual of the raw scores).
        method, oversample, power_iterations, seed, store_residual: the PCA (see
            :func:`~lightning_tda.modeldiff.functional.principal_components`).
        noise_margin: a direction is distinguishing when its variance gap exceeds this many
            times the noise floor.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(50, 200)), rng.normal(size=(50, 200))
        >>> d = ModelDiff(a, b).directions(of="a", num=3)
        >>> d.train_weights.shape, d.variance_a.shape
        ((3, 200), (3,))
    """

    def __init__(
        self,
        scores_a: ArrayLike,
        scores_b: ArrayLike,
        names: Sequence[str] = ("A", "B"),
        *,
        halves_a: Sequence[ArrayLike] | None = None,
        halves_b: Sequence[ArrayLike] | None = None,
        residual_of: ResidualOf = "normalized",
        method: Method = "auto",
        oversample: int = 10,
        power_iterations: int = 7,
        seed: int = 0,
        noise_margin: float = 1.5,
        store_residual: bool = True,
    ) -> None:
        self.scores_a, self.scores_b = check_pair(scores_a, scores_b)
        self.names = _check_names(names)
        if residual_of not in ("normalized", "raw"):
            raise ValueError(f"residual_of must be 'normalized' (the paper) or 'raw' (the PyPI package), got {residual_of!r}")
        if not noise_margin > 0:
            raise ValueError(f"noise_margin must be > 0, got {noise_margin}")
        self.halves = {"a": self._check_halves(halves_a, "halves_a"), "b": self._check_halves(halves_b, "halves_b")}
        self.settings: dict[str, Any] = dict(
            residual_of=residual_of, method=method, oversample=oversample, power_iterations=power_iterations, seed=seed,
            store_residual=store_residual,
        )
        self.noise_margin = float(noise_margin)
        self._floors: dict[int, float] = {}

    def _check_halves(self, halves: Sequence[ArrayLike] | None, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if halves is None:
            return None
        halves = list(halves)
        if len(halves) != 2:
            raise ValueError(f"{name} must be a pair of attribution matrices (one per half of the models), got {len(halves)}")
        first, second = check_pair(halves[0], halves[1], (f"{name}[0]", f"{name}[1]"))
        if first.shape != self.scores_a.shape:
            raise ValueError(f"{name} have shape {tuple(first.shape)}, the scores {tuple(self.scores_a.shape)}: they must match")
        return first, second

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model_scores(
        cls, models_a: Sequence[ArrayLike], models_b: Sequence[ArrayLike], names: Sequence[str] = ("A", "B"), **kwargs: Any
    ) -> "ModelDiff":
        """From one attribution matrix per model: each algorithm's scores are the mean over its
        models, and the two halves of its models (first and second half) give the noise floor.
        Needs at least 2 models per algorithm."""
        means, halves = [], []
        for name, models in (("models_a", models_a), ("models_b", models_b)):
            models = [torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m) for m in models]
            if len(models) < 2:
                raise ValueError(
                    f"{name} has {len(models)} model(s): the noise floor needs at least 2 models per "
                    "algorithm (two independent halves); train more models, or build ModelDiff(scores_a, scores_b) without a floor"
                )
            half = len(models) // 2
            means.append(torch.stack(models).double().mean(0))
            halves.append((torch.stack(models[:half]).double().mean(0), torch.stack(models[half:]).double().mean(0)))
        return cls(means[0], means[1], names, halves_a=halves[0], halves_b=halves[1], **kwargs)

    @classmethod
    def from_stores(
        cls,
        stores_a: RunStore | Sequence[RunStore],
        stores_b: RunStore | Sequence[RunStore],
        scorer: "Scorer | None" = None,
        train_split: str = schema.TRAIN_SPLIT,
        test_split: str = "val",
        names: Sequence[str] | None = None,
        noise_floor: bool = True,
        **kwargs: Any,
    ) -> "ModelDiff":
        """Score recorded runs (one RunStore per model, each with a GradientRecorder's records):
        each algorithm's scores come from ``scorer`` (TRAK by default) over all its stores, and,
        with ``noise_floor``, from each half of its stores separately (at least 2 stores per
        algorithm). Every store must hold the same datasets (fingerprints checked).

        ``names`` defaults to the stores' recorded algorithm labels, else ``("A", "B")``.
        """
        from lightning_tda.attribution import TRAK

        stores_a, stores_b = _as_store_list(stores_a, "stores_a"), _as_store_list(stores_b, "stores_b")
        check_same_datasets(stores_a + stores_b, (train_split, test_split))
        if noise_floor:
            for name, stores in (("stores_a", stores_a), ("stores_b", stores_b)):
                if len(stores) < 2:
                    raise ValueError(
                        f"{name} has {len(stores)} store(s): the noise floor needs at least 2 models per "
                        "algorithm (two independent halves); record more runs, or pass noise_floor=False"
                    )
        scorer = scorer if scorer is not None else TRAK(progress=False)
        if names is None:
            labels = (algorithm_of(stores_a[0]), algorithm_of(stores_b[0]))
            names = labels if all(labels) and labels[0] != labels[1] else ("A", "B")

        def score(stores: list[RunStore]) -> np.ndarray:
            return scorer.score(stores, train_split=train_split, test_split=test_split)

        halves: dict[str, Any] = {}
        if noise_floor:
            for key, stores in (("halves_a", stores_a), ("halves_b", stores_b)):
                half = len(stores) // 2
                halves[key] = (score(stores[:half]), score(stores[half:]))
        return cls(score(stores_a), score(stores_b), names, **halves, **kwargs)

    # ------------------------------------------------------------------ analysis
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores_a.shape)  # type: ignore[return-value]

    def noise_floor(self, num: int = 5) -> float:
        """The largest variance gap among the top ``num`` directions of the half-vs-half
        comparisons (module docstring); NaN without halves."""
        if num in self._floors:
            return self._floors[num]
        gaps = []
        for halves in self.halves.values():
            if halves is None:
                continue
            for first, second in (halves, halves[::-1]):
                gaps.append(self._largest_gap(first, second, num))
        floor = max(gaps) if gaps else float("nan")
        self._floors[num] = floor
        return floor

    def _largest_gap(self, first: torch.Tensor, second: torch.Tensor, num: int) -> float:
        for n in (num, 1):
            try:
                result = residual_pca(first, second, n, **self.settings)
            except RankError:
                continue
            return float((result.variance_a - result.variance_b).max())
        return 0.0  # the halves agree up to scale on every test example: no noise to speak of

    def directions(self, of: Literal["a", "b"] = "a", num: int = 5) -> DistinguishingDirections:
        """The ``num`` directions that algorithm ``of`` uses and the other does not."""
        if of not in ("a", "b"):
            raise ValueError(f"of must be 'a' (A's directions, not used by B) or 'b', got {of!r}")
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        if num > max_rank(self.shape):
            raise ValueError(
                f"num={num} is larger than the rank of the residual, at most min(n_test - 1, n_train) = "
                f"{max_rank(self.shape)} for scores of shape {self.shape}; ask for fewer directions"
            )
        first, second = (self.scores_a, self.scores_b) if of == "a" else (self.scores_b, self.scores_a)
        result = residual_pca(first, second, num, **self.settings)
        own, other = result.variance_a.numpy(), result.variance_b.numpy()
        variance_a, variance_b = (own, other) if of == "a" else (other, own)
        total_own, total_other = result.total_variance_a, result.total_variance_b
        return DistinguishingDirections(
            names=self.names,
            of=of,
            train_weights=result.directions.float().numpy(),
            test_loadings=result.loadings.float().numpy(),
            variance_a=variance_a.astype(np.float64),
            variance_b=variance_b.astype(np.float64),
            total_variance_a=total_own if of == "a" else total_other,
            total_variance_b=total_other if of == "a" else total_own,
            residual_variance_ratio=result.residual_variance_ratio.double().numpy(),
            singular_values=result.singular_values.double().numpy(),
            noise_floor=self.noise_floor(num),
            noise_margin=self.noise_margin,
            residual_of=self.settings["residual_of"],
            method=self.settings["method"],
            seed=int(self.settings["seed"]),
        )


__all__ = ["ModelDiff", "check_same_datasets"]
