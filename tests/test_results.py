"""The shared result base: save/load without pickle, and one log path through a reporter."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lightning_tda.reporting import Reporter
from lightning_tda.results import AnalysisResult


@dataclass(frozen=True)
class Toy(AnalysisResult):
    values: np.ndarray
    names: tuple[str, ...]
    settings: dict
    scale: float = 1.0

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"name": list(self.names), "value": self.values * self.scale})

    def plot(self, ax=None):
        fig = Figure() if ax is None else ax.figure
        ax = ax or fig.subplots()
        ax.bar(list(self.names), self.values)
        return fig, ax

    def summary(self) -> dict[str, float]:
        return {"mean": float(self.values.mean())}


def test_save_load_round_trip_without_pickle(tmp_path, monkeypatch):
    toy = Toy(np.arange(3, dtype=np.float32), ("a", "b", "c"), {"k": 2, "damping": None}, 0.5)
    toy.save(tmp_path / "toy")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    back = Toy.load(tmp_path / "toy")
    np.testing.assert_array_equal(back.values, toy.values)
    assert (back.names, back.settings, back.scale) == (toy.names, toy.settings, toy.scale)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved result"):
        Toy.load(tmp_path / "missing")

    @dataclass(frozen=True)
    class Other(AnalysisResult):
        x: np.ndarray

    Other(np.zeros(1)).save(tmp_path / "other")
    with pytest.raises(ValueError, match="not a .*Toy"):
        Toy.load(tmp_path / "other")

    @dataclass(frozen=True)
    class Bad(AnalysisResult):
        x: object

    with pytest.raises(TypeError, match="field 'x'.*cannot be saved as JSON"):
        Bad(object()).save(tmp_path / "bad")


def test_log_writes_scalars_table_and_figure(tmp_path):
    toy = Toy(np.array([1.0, 3.0]), ("a", "b"), {}, 1.0)
    toy.log(Reporter(tmp_path / "report"), "toy")
    assert (tmp_path / "report" / "figures" / "toy.png").exists()
    table = pd.read_csv(tmp_path / "report" / "tables" / "toy_table.csv")
    assert table["value"].tolist() == [1.0, 3.0]
    assert "toy/mean,2.0" in (tmp_path / "report" / "metrics.csv").read_text()
