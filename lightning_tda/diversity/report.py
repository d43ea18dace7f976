"""``diversity_report``: the whole diversity analysis of a handful of models in one call.

From trained models and a dataset, or from their RunStores and the split's labels: temperature
scaling on a held-out split, every pair's metrics and ensemble, the per-category table, and a
greedy ensemble selection on the held-out split (scored on the evaluation split). Returns a
:class:`DiversityReport` whose ``log(reporter, prefix)`` writes every table and figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_tda.diversity.analysis import CalibratedOutputs, DiversitySettings, calibrate, diversity_of
from lightning_tda.diversity.module import EnsembleDiversity
from lightning_tda.diversity.overlap import OverlapResult
from lightning_tda.diversity.result import DiversityResult
from lightning_tda.diversity.selection import SelectionResult, greedy_ensemble_selection
from lightning_tda.diversity.stores import read_store_outputs
from lightning_tda.results import AnalysisResult, ReporterLike

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DiversityReport", "diversity_report"]


@dataclasses.dataclass(frozen=True)
class DiversityReport(AnalysisResult):
    """The pairwise :class:`DiversityResult`, the greedy :class:`SelectionResult` (None without a
    held-out split) and any representation :class:`OverlapResult` s."""

    diversity: DiversityResult
    selection: SelectionResult | None = None
    overlaps: tuple[OverlapResult, ...] = ()

    def to_frame(self) -> "pd.DataFrame":
        return self.diversity.to_frame()

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        return self.diversity.plot(ax)

    def summary(self) -> dict[str, float]:
        out = dict(self.diversity.summary())
        if self.selection is not None:
            out.update({f"selection/{k}": v for k, v in self.selection.summary().items()})
        for overlap in self.overlaps:
            key = f"overlap/{overlap.names[0]}_vs_{overlap.names[1]}"
            out.update({f"{key}/{k}": v for k, v in overlap.summary().items()})
        return out

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Everything: the diversity tables and figures under ``prefix``, the selection under
        ``<prefix>_selection``, overlaps under ``<prefix>_overlap_<k>``."""
        self.diversity.log(reporter, prefix)
        if self.selection is not None:
            self.selection.log(reporter, f"{prefix}_selection")
        for k, overlap in enumerate(self.overlaps):
            overlap.log(reporter, f"{prefix}_overlap_{k}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Each part in a subdirectory (``diversity``, ``selection``, ``overlap_<k>``), then an
        index ``result.json``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        parts = {"diversity": self.diversity}
        if self.selection is not None:
            parts["selection"] = self.selection
        parts.update({f"overlap_{k}": o for k, o in enumerate(self.overlaps)})
        for name, part in parts.items():
            part.save(out / name)
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "parts": sorted(parts)}
        (out / "result.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DiversityReport":
        src = Path(path)
        meta_path = src / "result.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no saved report at {src} (result.json missing)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("class") != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"{src} holds a {meta.get('class')}, not a {cls.__qualname__}")
        parts = meta["parts"]
        overlaps = sorted((p for p in parts if p.startswith("overlap_")), key=lambda p: int(p.split("_")[1]))
        return cls(
            diversity=DiversityResult.load(src / "diversity"),
            selection=SelectionResult.load(src / "selection") if "selection" in parts else None,
            overlaps=tuple(OverlapResult.load(src / p) for p in overlaps),
        )


def report_of(
    outputs: CalibratedOutputs,
    names: Sequence[str],
    descriptions: Sequence[Mapping[str, Any]],
    settings: DiversitySettings,
    selection: bool = True,
) -> DiversityReport:
    """The report of calibrated outputs (see :func:`diversity_report`)."""
    result = diversity_of(outputs, names=names, descriptions=descriptions, settings=settings)
    picked = None
    if selection and outputs.held_out_target.shape[0] > 0:
        picked = greedy_ensemble_selection(
            outputs.held_out_logits, outputs.held_out_target, outputs.logits, outputs.target,
            names=result.names, descriptions=result.descriptions, category_order=settings.category_order,
            combine=settings.combine,
        )
    return DiversityReport(result, picked)


def _is_store_like(value: Any) -> bool:
    from lightning_tda.store import RunStore

    return isinstance(value, (RunStore, str, os.PathLike))


def diversity_report(
    members: Sequence[nn.Module] | Mapping[str, nn.Module] | Sequence[Any],
    data: Dataset | Tensor | np.ndarray,
    *,
    held_out: Dataset | float | str | None = None,
    held_out_labels: Tensor | np.ndarray | Dataset | None = None,
    split: str = "val",
    names: Sequence[str] | None = None,
    descriptions: Sequence[Mapping[str, Any]] | None = None,
    settings: DiversitySettings = DiversitySettings(),
    selection: bool = True,
    batch_size: int = 256,
) -> DiversityReport:
    """Compare trained models, or recorded runs, end to end.

    Args:
        members: M >= 2 trained classifiers (a sequence, or a name -> module mapping), or M
            RunStores / store paths recorded with ``MarginRecorder(..., logits=True)``.
        data: for models, the evaluation dataset; for stores, ``split``'s dataset or labels
            (checked against the stores' fingerprints).
        held_out: the split for temperature scaling and greedy selection: a dataset (models), a
            recorded split name (stores, with ``held_out_labels``), or a fraction of the
            evaluation examples; required while ``settings.temperature_scaling`` is on.
        names, descriptions: per model (descriptions: the factors pairs are grouped by).
        selection: also run :func:`greedy_ensemble_selection` on the held-out split.

    Example (a handful of digits models take a few seconds):
        >>> report = diversity_report(models, dm.recording_dataset("val"), held_out=0.5)  # doctest: +SKIP
        >>> report.log(Reporter("runs/diversity"), "diversity")  # doctest: +SKIP
    """
    seq = list(members.values()) if isinstance(members, Mapping) else list(members)
    if seq and all(_is_store_like(m) for m in seq):
        if isinstance(members, Mapping):
            if names is not None:
                raise ValueError("pass names either as the keys of a mapping of stores or as names=, not both")
            names = [str(k) for k in members]
        outputs = read_store_outputs(seq, split, data, names=names, descriptions=descriptions)
        if isinstance(held_out, str):
            other = read_store_outputs(seq, held_out, held_out_labels)
            held: Any = (other.logits, other.target)
        else:
            held = held_out
        calibrated = calibrate(outputs.logits, outputs.target, held, settings)
        return report_of(calibrated, outputs.names, outputs.descriptions, settings, selection)
    if isinstance(held_out, str):
        raise ValueError("held_out as a split name is for stores; for models pass a dataset or a fraction")
    if not isinstance(data, Dataset):
        raise TypeError(f"for models, data must be the evaluation Dataset, got {type(data).__name__}")
    module = EnsembleDiversity(members, names=names, descriptions=descriptions, settings=settings)
    module.evaluate(data, held_out, batch_size=batch_size)
    assert module.outputs is not None
    return report_of(module.outputs, module.names, module.descriptions, settings, selection)
