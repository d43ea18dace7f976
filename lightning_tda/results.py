"""The one shape every analysis result takes: a frozen dataclass of arrays and settings.

Every analysis (ModelDiff, further training, ModelPred, diversity, the dCor recipes) returns a
subclass of :class:`AnalysisResult`, so the CLI, W&B and the HTML report render each the same way:

- ``to_frame()``: the table a user sorts or filters (a pandas DataFrame);
- ``plot(ax=None)``: ``(fig, ax)`` without ever calling ``show()``, as torchmetrics does;
- ``summary()``: a few named scalars, for any Lightning logger;
- ``log(reporter, prefix)``: all of the above through a reporter (files always, W&B when a
  ``WandbLogger`` is given). Results never import the reporting layer: ``reporter`` is any object
  with ``log_metrics``, ``log_frame`` and ``log_figure`` (duck-typed), so imports point down;
- ``save(path)`` / ``load(path)``: next to the stores it came from, without pickle: arrays as
  safetensors, every other field as JSON.

Subclasses declare their fields with ``@dataclass(frozen=True)`` and override what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

R = TypeVar("R", bound="AnalysisResult")

_ARRAYS_FILE = "arrays.safetensors"
_FIELDS_FILE = "result.json"


class ReporterLike(Protocol):
    """What a result needs of a reporter (:class:`lightning_tda.reporting.Reporter` is one)."""

    def log_metrics(self, metrics: Any, step: int | None = None) -> None: ...

    def log_frame(self, name: str, frame: Any, images: Any = None, step: int | None = None) -> Any: ...

    def log_figure(self, name: str, fig: Any, step: int | None = None, close: bool = False) -> Any: ...


def _jsonable(value: Any, name: str) -> Any:
    """``value`` as plain JSON types; tuples become lists, numpy scalars Python numbers."""
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, name) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"result field {name!r} holds a {type(value).__name__}, which cannot be saved as JSON; "
        "store arrays as numpy arrays and settings as numbers, strings, lists or dicts"
    )


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """Base class of analysis results (see the module docstring)."""

    def to_frame(self) -> "pd.DataFrame":
        """The result as a table (one row per item the analysis ranks or compares)."""
        raise NotImplementedError(f"{type(self).__name__} has no table view")

    def plot(self, ax: "Axes | None" = None) -> tuple["Figure", "Axes"]:
        """The result's main figure; returns ``(fig, ax)`` and never shows it."""
        raise NotImplementedError(f"{type(self).__name__} has no figure")

    def summary(self) -> dict[str, float]:
        """A few named scalars (logged to every logger)."""
        return {}

    def log(self, reporter: ReporterLike, prefix: str) -> None:
        """Report the scalars, the table and the figure under ``prefix``."""
        scalars = self.summary()
        if scalars:
            reporter.log_metrics({f"{prefix}/{k}": v for k, v in scalars.items()})
        try:
            frame = self.to_frame()
        except NotImplementedError:
            frame = None
        if frame is not None:
            reporter.log_frame(f"{prefix}_table", frame)
        try:
            fig, _ = self.plot()
        except NotImplementedError:
            return
        reporter.log_figure(prefix, fig, close=True)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to directory ``path``: arrays as safetensors, the rest as JSON."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        fields: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if isinstance(value, np.ndarray):
                arrays[field.name] = np.ascontiguousarray(value)
            else:
                fields[field.name] = _jsonable(value, field.name)
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "fields": fields}
        tmp = out / f".{_FIELDS_FILE}.partial"
        save_file(arrays, str(out / _ARRAYS_FILE))
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, out / _FIELDS_FILE)  # the JSON last: a result is complete once it exists
        return out

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        """Read a result written by :meth:`save` (never unpickles)."""
        src = Path(path)
        meta_path = src / _FIELDS_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"no saved result at {src} ({_FIELDS_FILE} missing); save one with result.save(path)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err}); save the result again") from err
        expected = f"{cls.__module__}.{cls.__qualname__}"
        if meta.get("class") != expected:
            raise ValueError(f"{src} holds a {meta.get('class')}, not a {expected}; load it with that class")
        arrays = load_file(str(src / _ARRAYS_FILE))
        values = {**meta["fields"], **arrays}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _restore(v) for k, v in values.items() if k in names})


def _restore(value: Any) -> Any:
    """JSON lists back to tuples, the form frozen dataclass settings use."""
    if isinstance(value, list):
        return tuple(_restore(v) for v in value)
    return value


__all__ = ["AnalysisResult", "ReporterLike"]
