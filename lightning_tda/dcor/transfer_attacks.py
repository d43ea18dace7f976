r"""Diverse models against transfer attacks (Zhen et al., ECCV 2022): does a model trained to be
distance-decorrelated from another resist adversarial examples crafted on that other better?

1. :func:`train_diverse_family`: a family in which each new model is penalised by its mean
   squared dCor to the frozen earlier ones (weight 0.05 on L2-normalised penultimate features,
   :meth:`~lightning_tda.dcor.penalty.DistanceCorrelationPenalty.diverse_from`), and, for the
   comparison, the same models trained without the penalty (same seeds, same data order).
2. :func:`~lightning_tda.dcor.attacks.fgsm` and :func:`~lightning_tda.dcor.attacks.pgd`: L-inf
   attacks crafted on the family's first model (the source).
3. :func:`evaluate_transfer`: clean and attacked accuracy of every model on the adversarial
   examples of the source, at several radii: a :class:`TransferAttackResult`.

:func:`diverse_models_against_transfer_attacks` runs all three over several seeds on digits.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_tda.dcor._data import EvalData, check_positive, data_length, fit_quietly, iterate_batches
from lightning_tda.dcor.attacks import ATTACKS, DEFAULT_EPS, AttackLoss, check_eps, eval_mode, fgsm, pgd
from lightning_tda.dcor.functional import distance_correlation
from lightning_tda.dcor.layers import layer_activations
from lightning_tda.dcor.penalty import DistanceCorrelationPenalty
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DiverseFamily",
    "TransferAttackResult",
    "diverse_models_against_transfer_attacks",
    "evaluate_transfer",
    "train_diverse_family",
]

PENULTIMATE = "model.relu"  # DigitsCNN's 64-d features after fc1 and its ReLU, in an ImageClassifier


# ---------------------------------------------------------------------------------- the result


@dataclasses.dataclass(frozen=True)
class TransferAttackResult(AnalysisResult):
    """Accuracy of every model on clean inputs and on adversarial examples crafted on the source.

    ``accuracy[s, m, c]``: seed ``seeds[s]``, model ``models[m]`` (of group ``groups[m]``;
    ``"source"`` is attacked white-box), column ``c`` = (``attacks[c]``, ``eps[c]``), the first
    column being clean accuracy (``"clean"``, 0). ``dcor_to_source[s, m]``: dCor of the model's
    features with the source's over the evaluation set (NaN when not computed).
    """

    seeds: tuple[int, ...]
    models: tuple[str, ...]
    groups: tuple[str, ...]
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    accuracy: np.ndarray
    dcor_to_source: np.ndarray
    n_examples: int
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def stack(cls, results: Sequence["TransferAttackResult"]) -> "TransferAttackResult":
        """One result over the seeds of several (same models, groups and columns)."""
        first = results[0]
        for other in results[1:]:
            if (other.models, other.groups, other.attacks, other.eps) != (first.models, first.groups, first.attacks,
                                                                          first.eps):
                raise ValueError("results to stack must have the same models, groups, attacks and eps")
        return dataclasses.replace(
            first, seeds=tuple(s for r in results for s in r.seeds),
            accuracy=np.concatenate([r.accuracy for r in results]),
            dcor_to_source=np.concatenate([r.dcor_to_source for r in results]),
        )

    def columns(self) -> list[str]:
        return ["clean" if a == "clean" else f"{a.upper()} eps={e:g}" for a, e in zip(self.attacks, self.eps)]

    def to_frame(self) -> "pd.DataFrame":
        """Long format: one row per seed, model and column."""
        import pandas as pd

        rows = [
            {"seed": seed, "model": model, "group": group, "attack": attack, "eps": eps,
             "accuracy": float(self.accuracy[s, m, c]), "dcor_to_source": float(self.dcor_to_source[s, m])}
            for s, seed in enumerate(self.seeds)
            for m, (model, group) in enumerate(zip(self.models, self.groups))
            for c, (attack, eps) in enumerate(zip(self.attacks, self.eps))
        ]
        return pd.DataFrame(rows)

    def group_accuracy(self) -> tuple[list[str], np.ndarray]:
        """Groups in order of appearance and their accuracy averaged over the group's models:
        ``[seeds, groups, columns]``."""
        groups = list(dict.fromkeys(self.groups))
        mask = np.array([[g == group for g in self.groups] for group in groups], dtype=float)
        acc = np.einsum("smc,gm->sgc", self.accuracy, mask) / mask.sum(1)[None, :, None]
        return groups, acc

    def summary_frame(self) -> "pd.DataFrame":
        """Per group: mean and spread over seeds of each column; per target model position the
        paired gain of the penalised over the independent model when both groups are there."""
        import pandas as pd

        groups, acc = self.group_accuracy()
        rows = []
        for g, group in enumerate(groups):
            row: dict[str, Any] = {"group": group}
            for c, name in enumerate(self.columns()):
                row[name] = _mean_sd(acc[:, g, c])
            rows.append(row)
        if {"dcor penalty", "independent"} <= set(groups):
            gain = acc[:, groups.index("dcor penalty")] - acc[:, groups.index("independent")]
            row = {"group": "gain (penalty - independent)"}
            for c, name in enumerate(self.columns()):
                row[name] = _mean_sd(gain[:, c], signed=True)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        """:meth:`summary_frame` as a markdown table (accuracy in %, mean ± sd over seeds)."""
        frame = self.summary_frame()
        lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
        return "\n".join(lines)

    def summary(self) -> dict[str, float]:
        """Mean accuracy of each group at each column, and the mean paired gain."""
        groups, acc = self.group_accuracy()
        out = {}
        keys = ["clean" if a == "clean" else f"{a}_eps{e:g}" for a, e in zip(self.attacks, self.eps)]
        for g, group in enumerate(groups):
            for c, key in enumerate(keys):
                out[f"{group.replace(' ', '_')}/{key}"] = float(acc[:, g, c].mean())
        if {"dcor penalty", "independent"} <= set(groups):
            gain = acc[:, groups.index("dcor penalty")] - acc[:, groups.index("independent")]
            for c, key in enumerate(keys):
                out[f"gain/{key}"] = float(gain[:, c].mean())
        return out

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """Accuracy against eps, one line per group and attack (mean, bars: sd over seeds)."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(6.4, 4.2)).subplots()
        groups, acc = self.group_accuracy()
        colours = {"source": "0.5", "dcor penalty": "tab:red", "independent": "tab:blue"}
        labels = {"source": "source (white-box)"}
        styles = {"fgsm": "--", "pgd": "-"}
        for g, group in enumerate(groups):
            for attack in dict.fromkeys(a for a in self.attacks if a != "clean"):
                cols = [0] + [c for c, a in enumerate(self.attacks) if a == attack]
                xs = [self.eps[c] for c in cols]
                ys = acc[:, g, cols]
                ax.errorbar(xs, 100 * ys.mean(0), yerr=100 * ys.std(0), label=f"{labels.get(group, group)}, {attack.upper()}",
                            color=colours.get(group), linestyle=styles.get(attack, ":"), marker="o", markersize=3,
                            capsize=2)
        ax.set_xlabel("L-inf radius eps (attack crafted on the source model)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Transfer attacks, {len(self.seeds)} seed(s), n={self.n_examples}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return ax.figure, ax

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Scalars, the long table, the summary table (mean ± sd) and the figure; with a reporter
        that draws line charts (``log_line``, a native W&B chart), accuracy against eps for each
        attack too."""
        super().log(reporter, prefix)
        reporter.log_frame(f"{prefix}_summary", self.summary_frame())
        log_line = getattr(reporter, "log_line", None)
        if log_line is None:
            return
        groups, acc = self.group_accuracy()
        for attack in dict.fromkeys(a for a in self.attacks if a != "clean"):
            cols = [0] + [c for c, a in enumerate(self.attacks) if a == attack]
            log_line(f"{prefix}_{attack}", [self.eps[c] for c in cols],
                     {group: (100 * acc[:, g, cols].mean(0)).tolist() for g, group in enumerate(groups)},
                     xlabel="eps", ylabel="accuracy (%)", title=f"{attack.upper()} crafted on the source")


def _mean_sd(values: np.ndarray, signed: bool = False) -> str:
    mean, sd = 100 * float(values.mean()), 100 * float(values.std())
    return f"{mean:+.1f} ± {sd:.1f}" if signed else f"{mean:.1f} ± {sd:.1f}"


# ---------------------------------------------------------------------------------- evaluation


def evaluate_transfer(
    source: nn.Module,
    targets: Mapping[str, nn.Module],
    data: EvalData,
    *,
    groups: Mapping[str, str] | None = None,
    eps: Sequence[float] = DEFAULT_EPS,
    attacks: Sequence[str] = ATTACKS,
    pgd_steps: int = 40,
    pgd_step_size: float | None = None,
    loss: AttackLoss = "cross_entropy",
    clip: tuple[float, float] | None = (0.0, 1.0),
    feature_layer: str | None = None,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = False,
) -> TransferAttackResult:
    """Craft FGSM/PGD examples on ``source`` and measure every model's accuracy on them.

    Args:
        source: the attacked model (its own white-box accuracy is the first row).
        targets: name -> model, evaluated on the source's adversarial examples.
        data: ``(x, y)``, a Dataset or a DataLoader of labelled examples.
        groups: name -> group label (e.g. ``"dcor penalty"`` / ``"independent"``).
        eps: L-inf radii, each >= 0. attacks: names from :data:`ATTACKS`.
        pgd_steps, pgd_step_size, loss, clip: as in :func:`pgd` / :func:`fgsm`.
        feature_layer: a layer present in every model: adds each model's dCor to the source there.
        seed: of PGD's random starts (one generator, batches in order).
    """
    eps = tuple(check_eps(e) for e in eps)
    if not eps:
        raise ValueError("eps is empty: pass at least one radius")
    for attack in attacks:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {ATTACKS}")
    check_positive(pgd_steps, "pgd_steps")
    if "source" in targets:
        raise ValueError("'source' names the attacked model; give the targets other names")
    if data_length(data, "data") == 0:
        raise ValueError("the evaluation set is empty")
    models = {"source": source, **targets}
    group_of = {"source": "source", **{name: (groups or {}).get(name, "target") for name in targets}}
    columns = [("clean", 0.0)] + [(attack, e) for attack in attacks for e in eps]
    correct = np.zeros((len(models), len(columns)))
    generator = torch.Generator().manual_seed(seed)
    n = 0
    batches = iterate_batches(data, batch_size)
    for x, y in tqdm(batches, desc="transfer attacks", disable=not progress):
        if y is None:
            raise ValueError("transfer attacks need labels: pass (x, y), a Dataset or a DataLoader of (x, y)")
        y = torch.as_tensor(y).long()
        n += len(y)
        for c, (attack, e) in enumerate(columns):
            if attack == "clean":
                x_adv = x
            elif attack == "fgsm":
                x_adv = fgsm(source, x, y, e, loss=loss, clip=clip)
            else:
                x_adv = pgd(source, x, y, e, steps=pgd_steps, step_size=pgd_step_size, loss=loss, clip=clip,
                            generator=generator)
            with torch.no_grad():
                for m, model in enumerate(models.values()):
                    with eval_mode(model):
                        correct[m, c] += float((model(x_adv).argmax(1) == y).sum())
    dcor = np.full(len(models), np.nan)
    if feature_layer is not None:
        feats = {name: layer_activations(model, data, [feature_layer], batch_size=batch_size,
                                         dtype=torch.float64)[feature_layer]
                 for name, model in models.items()}
        dcor = np.array([float(distance_correlation(feats["source"], f)) for f in feats.values()])
    return TransferAttackResult(
        seeds=(seed,), models=tuple(models), groups=tuple(group_of[m] for m in models),
        attacks=tuple(a for a, _ in columns), eps=tuple(e for _, e in columns),
        accuracy=(correct / n)[None], dcor_to_source=dcor[None], n_examples=n,
        settings={"pgd_steps": pgd_steps, "pgd_step_size": pgd_step_size, "loss": loss,
                  "clip": None if clip is None else list(clip), "feature_layer": feature_layer},
    )


# ---------------------------------------------------------------------------------- the family


@dataclasses.dataclass
class DiverseFamily:
    """A trained family: the source (no penalty), the penalised models (each decorrelated from
    all before it) and their independently trained twins (same seeds, no penalty)."""

    source: L.LightningModule
    penalised: list[L.LightningModule]
    independent: list[L.LightningModule]
    seeds: list[int]


def train_diverse_family(
    make_module: Callable[[], L.LightningModule],
    datamodule: L.LightningDataModule,
    *,
    size: int = 3,
    layer: str = PENULTIMATE,
    weight: float = 0.05,
    epochs: int = 8,
    seed: int = 0,
    independent: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> DiverseFamily:
    """Train ``size`` models one after the other, each penalised by its mean squared dCor to the
    frozen earlier ones (the seed's recipe: weight 0.05, L2-normalised features of ``layer``).

    Model ``i`` is initialised and fed data with seed ``100 * seed + i``; with ``independent`` its
    twin (same seed, no penalty) is trained too, the baseline. The seed's code trains its
    family interleaved epoch by epoch; here each model is trained to the end before the next
    starts, so each is penalised against its finished predecessors.
    """
    check_positive(size, "size")
    if size < 2:
        raise ValueError(f"size must be >= 2 (a source and at least one model decorrelated from it), got {size}")
    check_positive(epochs, "epochs")
    seeds = [100 * seed + i for i in range(size)]

    def new(i: int) -> L.LightningModule:
        torch.manual_seed(seeds[i])
        return make_module()

    family: list[L.LightningModule] = []
    twins: list[L.LightningModule] = []
    for i in tqdm(range(size), desc=f"family of seed {seed}", disable=not progress):
        module = new(i)
        if i == 0:
            fit_quietly(module, datamodule, epochs, seeds[i], trainer_kwargs)
        else:
            wrapped = DistanceCorrelationPenalty.diverse_from(module, earlier=list(family), layer=layer, weight=weight)
            fit_quietly(wrapped, datamodule, epochs, seeds[i], trainer_kwargs)
            wrapped.remove_hooks()
            if independent:
                twin = new(i)
                fit_quietly(twin, datamodule, epochs, seeds[i], trainer_kwargs)
                twins.append(twin)
        family.append(module.eval())
    return DiverseFamily(source=family[0], penalised=family[1:], independent=twins, seeds=seeds)


def diverse_models_against_transfer_attacks(
    make_module: Callable[[], L.LightningModule] | None = None,
    datamodule: L.LightningDataModule | None = None,
    *,
    seeds: Sequence[int] = (0,),
    size: int = 3,
    layer: str = PENULTIMATE,
    weight: float = 0.05,
    epochs: int = 8,
    eps: Sequence[float] = DEFAULT_EPS,
    attacks: Sequence[str] = ATTACKS,
    pgd_steps: int = 40,
    split: str = "val",
    progress: bool = False,
) -> TransferAttackResult:
    """The whole recipe, for each seed: train a diverse family and its independent twins
    (:func:`train_diverse_family`), attack the source, evaluate everyone
    (:func:`evaluate_transfer`); stacked over ``seeds``.

    Defaults: a DigitsCNN classifier on digits (:class:`~lightning_tda.data.DigitsDataModule`),
    evaluated on its validation split. ``make_module`` builds a fresh untrained LightningModule;
    ``datamodule`` must offer ``recording_dataset(split)`` (the un-augmented split, in order).
    """
    for e in eps:
        check_eps(e)
    if not seeds:
        raise ValueError("seeds is empty: pass at least one seed")
    if make_module is None:
        from lightning_tda.models import DigitsCNN, ImageClassifier

        def make_module() -> L.LightningModule:
            return ImageClassifier(DigitsCNN())

    if datamodule is None:
        from lightning_tda.data import DigitsDataModule

        datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    data = datamodule.recording_dataset(split)  # type: ignore[attr-defined]
    results = []
    for seed in seeds:
        family = train_diverse_family(make_module, datamodule, size=size, layer=layer, weight=weight, epochs=epochs,
                                      seed=seed, progress=progress)
        targets = {f"M{i + 1}": m for i, m in enumerate(family.penalised)}
        targets.update({f"M{i + 1}'": m for i, m in enumerate(family.independent)})
        groups = {name: "independent" if name.endswith("'") else "dcor penalty" for name in targets}
        result = evaluate_transfer(family.source, targets, data, groups=groups, eps=eps, attacks=attacks,
                                   pgd_steps=pgd_steps, feature_layer=layer, seed=seed, progress=progress)
        results.append(result)
    stacked = TransferAttackResult.stack(results)
    settings = {**stacked.settings, "size": size, "layer": layer, "weight": weight, "epochs": epochs, "split": split}
    return dataclasses.replace(stacked, settings=settings)
