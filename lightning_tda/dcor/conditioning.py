r"""Conditioning one model on another (Zhen et al., ECCV 2022; their ViT given a ResNet): train
model B to learn about a target signal what a given model A does not already capture.

B's loss gets ``weight * (1 - R*((f_B | f_A), s))``: the partial distance correlation of B's
features :math:`f_B` with the signal :math:`s` (one-hot labels by default) given A's frozen
features :math:`f_A`, through :meth:`~lightning_tda.dcor.penalty.DistanceCorrelationPenalty.conditioned_on`
(the seed's code: semi-partial dCor, weight 0.1, unnormalised features). Its twin B' is trained
from the same seed without the term. :func:`condition_on_model` reports, per seed, over an
evaluation set: the accuracy of A, B and B'; what B (B') knows about the signal beyond A and A
beyond B (B'); dCor(A, B); and the accuracy of the ensembles A+B and A+B'.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_tda.dcor._data import check_positive, fit_quietly, iterate_batches
from lightning_tda.dcor.functional import PARTIAL_STATISTICS, distance_correlation, resolve_statistic
from lightning_tda.dcor.layers import layer_activations
from lightning_tda.dcor.penalty import DistanceCorrelationPenalty
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ConditioningResult", "condition_on_model"]

PENULTIMATE = "model.relu"
VARIANTS = ("conditioned", "independent")

_METRICS = {
    "accuracy": "accuracy of B",
    "pdcor_beyond_given": "R*(B given A, signal)",
    "pdcor_given_beyond": "R*(A given B, signal)",
    "dcor_to_given": "dCor(A, B)",
    "ensemble_accuracy": "accuracy of A+B",
}


@dataclasses.dataclass(frozen=True)
class ConditioningResult(AnalysisResult):
    """Per seed (rows) and variant (columns: B trained ``"conditioned"`` on A, its
    ``"independent"`` twin B'): accuracy, the partial statistic of B with the signal given A
    (``pdcor_beyond_given``) and of A given B (``pdcor_given_beyond``), dCor of A's and B's
    features, and the accuracy of the ensemble A+B (mean of softmax probabilities)."""

    seeds: tuple[int, ...]
    accuracy_given: np.ndarray
    accuracy: np.ndarray
    pdcor_beyond_given: np.ndarray
    pdcor_given_beyond: np.ndarray
    dcor_to_given: np.ndarray
    ensemble_accuracy: np.ndarray
    statistic: str
    n_examples: int
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_frame(self) -> "pd.DataFrame":
        """One row per seed and variant."""
        import pandas as pd

        rows = []
        for s, seed in enumerate(self.seeds):
            for v, variant in enumerate(VARIANTS):
                row: dict[str, Any] = {"seed": seed, "variant": variant,
                                       "accuracy_given": float(self.accuracy_given[s])}
                row.update({key: float(getattr(self, key)[s, v]) for key in _METRICS})
                rows.append(row)
        return pd.DataFrame(rows)

    def summary_frame(self) -> "pd.DataFrame":
        """Per metric: mean ± sd over seeds for each variant, and the paired difference."""
        import pandas as pd

        rows = []
        for key, label in _METRICS.items():
            values = getattr(self, key)
            diff = values[:, 0] - values[:, 1]
            rows.append({"figure": label, "conditioned B": _mean_sd(values[:, 0]),
                         "independent B'": _mean_sd(values[:, 1]),
                         "difference (paired)": f"{diff.mean():+.3f} ± {diff.std():.3f}"})
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        frame = self.summary_frame()
        lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
        return "\n".join(lines)

    def summary(self) -> dict[str, float]:
        out = {"accuracy_given": float(self.accuracy_given.mean())}
        for key in _METRICS:
            values = getattr(self, key)
            out[f"conditioned/{key}"] = float(values[:, 0].mean())
            out[f"independent/{key}"] = float(values[:, 1].mean())
            out[f"difference/{key}"] = float((values[:, 0] - values[:, 1]).mean())
        return out

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Bars: each figure for the conditioned B and its independent twin (mean, sd over seeds)."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(7.5, 4.0)).subplots()
        x = np.arange(len(_METRICS))
        for v, (variant, colour) in enumerate(zip(VARIANTS, ("tab:red", "tab:blue"))):
            values = np.stack([getattr(self, key)[:, v] for key in _METRICS], 1)
            ax.bar(x + (v - 0.5) * 0.38, values.mean(0), 0.38, yerr=values.std(0), capsize=3, color=colour,
                   label="B conditioned on A" if v == 0 else "B' independent")
        ax.set_xticks(x, list(_METRICS.values()), rotation=15, fontsize=8)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_title(f"Conditioning B on A ({self.statistic}, {len(self.seeds)} seed(s), n={self.n_examples})",
                     fontsize=9)
        top = max(float(np.nanmax(getattr(self, key))) for key in _METRICS)
        ax.set_ylim(top=top + 0.2)
        ax.legend(fontsize=8, ncol=2, loc="upper center")
        ax.grid(axis="y", alpha=0.3)
        return ax.figure, ax

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, the per-seed table, the summary table and the figure."""
        super().log(reporter, prefix)
        reporter.log_frame(f"{prefix}_summary", self.summary_frame())


def _mean_sd(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def _signal_values(signal: Any, data: Any, labels: Tensor) -> Tensor:
    if signal == "labels":
        return nn.functional.one_hot(labels.long()).double()
    parts = [signal(batch) for batch in torch.utils.data.DataLoader(data, batch_size=512, shuffle=False)]
    return torch.cat(parts).reshape(len(labels), -1).double()


def _evaluate(models: Sequence[nn.Module], layers: Sequence[str], data: Any) -> tuple[list[Tensor], list[Tensor]]:
    """Features of ``layers`` and logits (``""``, the whole model) of each model, one pass each."""
    feats, logits = [], []
    for model, layer in zip(models, layers):
        acts = layer_activations(model, data, [layer, ""], dtype=torch.float64)
        feats.append(acts[layer])
        logits.append(acts[""])
    return feats, logits


def condition_on_model(
    make_module: Callable[[], L.LightningModule] | None = None,
    datamodule: L.LightningDataModule | None = None,
    *,
    given: nn.Module | None = None,
    layer: str = PENULTIMATE,
    given_layer: str | None = None,
    signal: Literal["labels"] | Callable[[Any], Tensor] = "labels",
    weight: float = 0.1,
    statistic: str = "semi_partial_distance_correlation",
    epochs: int = 8,
    seeds: Sequence[int] = (0,),
    split: str = "val",
    progress: bool = False,
) -> ConditioningResult:
    """Train B conditioned on A (and its independent twin) for each seed and compare them.

    Args:
        make_module: builds a fresh LightningModule (default: a DigitsCNN classifier).
        datamodule: default :class:`~lightning_tda.data.DigitsDataModule`; must offer
            ``recording_dataset(split)``.
        given: a trained model A (frozen); default: A is trained per seed (seed ``100 * seed``).
        layer, given_layer: the features of B and of A (default: the same name).
        signal: ``"labels"`` (one-hot) or a function ``batch -> tensor``.
        weight, statistic: of the conditioning term (the seed's: 0.1, semi-partial dCor).
        epochs: of each training run. seeds: one run (A, B, B') per seed; B and B' use seed
            ``100 * seed + 1``.
    """
    check_positive(epochs, "epochs")
    if not seeds:
        raise ValueError("seeds is empty: pass at least one seed")
    if statistic not in PARTIAL_STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(PARTIAL_STATISTICS)}, got {statistic!r}")
    stat = resolve_statistic(statistic, partial=True)
    given_layer = layer if given_layer is None else given_layer
    if make_module is None:
        from lightning_tda.models import DigitsCNN, ImageClassifier

        def make_module() -> L.LightningModule:
            return ImageClassifier(DigitsCNN())

    if datamodule is None:
        from lightning_tda.data import DigitsDataModule

        datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    data = datamodule.recording_dataset(split)  # type: ignore[attr-defined]
    labels = torch.cat([torch.as_tensor(y) for _, y in iterate_batches(data)]).long()
    target = _signal_values(signal, data, labels)

    def new(seed: int) -> L.LightningModule:
        torch.manual_seed(seed)
        return make_module()

    rows: dict[str, list] = {key: [] for key in ("accuracy_given", *_METRICS)}
    for seed in tqdm(seeds, desc="conditioning", disable=not progress):
        model_a = given
        if model_a is None:
            model_a = new(100 * seed)
            fit_quietly(model_a, datamodule, epochs, 100 * seed)
        model_a.eval()
        conditioned = new(100 * seed + 1)
        wrapped = DistanceCorrelationPenalty.conditioned_on(
            conditioned, model_a, layer, given_layer, signal=signal, weight=weight, statistic=statistic
        )
        fit_quietly(wrapped, datamodule, epochs, 100 * seed + 1)
        wrapped.remove_hooks()
        twin = new(100 * seed + 1)
        fit_quietly(twin, datamodule, epochs, 100 * seed + 1)
        (f_a, f_b, f_t), (z_a, z_b, z_t) = _evaluate([model_a, conditioned, twin], [given_layer, layer, layer], data)
        p_a = z_a.softmax(1)

        def accuracy(logits: Tensor) -> float:
            return float((logits.argmax(1) == labels).double().mean())

        rows["accuracy_given"].append(accuracy(z_a))
        rows["accuracy"].append([accuracy(z_b), accuracy(z_t)])
        rows["pdcor_beyond_given"].append([float(stat(f, target, f_a)) for f in (f_b, f_t)])
        rows["pdcor_given_beyond"].append([float(stat(f_a, target, f)) for f in (f_b, f_t)])
        rows["dcor_to_given"].append([float(distance_correlation(f_a, f)) for f in (f_b, f_t)])
        rows["ensemble_accuracy"].append([accuracy(p_a + z.softmax(1)) for z in (z_b, z_t)])
    return ConditioningResult(
        seeds=tuple(seeds), statistic=statistic, n_examples=len(labels),
        settings={"layer": layer, "given_layer": given_layer, "weight": weight, "epochs": epochs, "split": split,
                  "signal": signal if isinstance(signal, str) else repr(signal), "given": given is not None},
        **{key: np.asarray(values, dtype=np.float64) for key, values in rows.items()},
    )
