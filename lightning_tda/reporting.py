"""Reporting: the one place that talks to loggers.

Every analysis reports through a :class:`Reporter`: matplotlib figures, tables (optionally with a
column or more of images), image grids and scalar metrics. Everything is always written as plain
files under the reporter's run directory, so nothing depends on W&B::

    <run_dir>/figures/<name>.png           log_figure, log_image_grid
    <run_dir>/tables/<name>.csv            log_table
    <run_dir>/tables/<name>/<column>_<row>.png   the images of a table's image columns
    <run_dir>/metrics.csv                  log_metrics (long format: step, name, value)

With a Lightning ``WandbLogger`` among the loggers, the same content also goes to W&B in its rich
form: ``wandb.Image`` for figures, ``wandb.Table`` with ``wandb.Image`` cells for tables, a list of
captioned ``wandb.Image`` for grids (all through ``logger.log_metrics``, so ``step`` becomes
``trainer/global_step`` as for Lightning's own metrics). Other loggers receive the scalar metrics.

Offline W&B runs keep a table's images in the run's artifact staging area (``wandb sync``
uploads them); the PNG files above are the copy that is always there.

Only global rank zero writes or logs; on other ranks every method does nothing and returns None.
Nothing is read from the environment and nothing of it is logged.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from lightning_tda.html_report import HtmlReport
from lightning_tda.images import ImageLike, to_uint8_image
from lightning_tda.store import validate_name

if TYPE_CHECKING:
    import lightning.pytorch as pl

def _cell(value: Any) -> Any:
    """A table cell as a plain Python value (tensors and numpy scalars unwrapped)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.item() if value.size == 1 else value.tolist()
    return value


def _is_wandb(logger: Logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


class Reporter:
    """Writes figures, tables, image grids and metrics as files under ``run_dir``, and to the
    given Lightning logger(s): richly to W&B, scalars to any logger.

    Args:
        run_dir: directory of the files (created on first write).
        logger: a Lightning ``Logger``, a list of them, or None (files only).
        dpi: resolution of the figure PNG files.
        html_title: title of the HTML page (:meth:`write_html`) that collects everything logged.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logger: Logger | Iterable[Logger] | None = None,
        dpi: int = 120,
        html_title: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if logger is None:
            loggers: list[Logger] = []
        elif isinstance(logger, Logger):
            loggers = [logger]
        else:
            loggers = list(logger)
        bad = [type(lg).__name__ for lg in loggers if not isinstance(lg, Logger)]
        if bad:
            raise TypeError(f"logger must be a Lightning Logger, a list of them, or None; got {bad}")
        self.loggers = loggers
        self.dpi = dpi
        self.html = HtmlReport(html_title or "lightning-tda report")

    @classmethod
    def from_trainer(cls, trainer: "pl.Trainer", subdir: str = "reports", **kwargs: Any) -> "Reporter":
        """A reporter on ``trainer.loggers``, writing under the first logger's run directory
        (``<save_dir>/<name>/<version>/<subdir>``, where Lightning puts its checkpoints) or
        ``<default_root_dir>/<subdir>`` without a logger."""
        validate_name(subdir, "subdir")
        loggers = list(trainer.loggers)
        if not loggers:
            return cls(Path(trainer.default_root_dir) / subdir, None, **kwargs)
        first = loggers[0]
        if first.version is None and _is_wandb(first):
            first.experiment  # starts the run, which gives the version (its id)
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        base = Path(first.save_dir or trainer.default_root_dir) / str(first.name) / version
        return cls(base / subdir, loggers, **kwargs)

    @property
    def wandb_loggers(self) -> list[Logger]:
        return [lg for lg in self.loggers if _is_wandb(lg)]

    def _path(self, folder: str, name: str, suffix: str) -> Path:
        path = self.run_dir / folder / f"{validate_name(name)}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _to_wandb(self, payload: Mapping[str, Any], step: int | None) -> None:
        for lg in self.wandb_loggers:
            lg.log_metrics(dict(payload), step)

    @rank_zero_only
    def log_figure(self, name: str, fig: Figure, step: int | None = None, close: bool = False) -> Path:
        """Save ``fig`` as ``figures/<name>.png`` and log that image to W&B under ``name``.

        ``close`` closes the figure afterwards (through pyplot when pyplot manages it).
        """
        path = self._path("figures", name, ".png")
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight")
        self.html.add_figure(name, path.read_bytes())
        if self.wandb_loggers:
            import wandb

            self._to_wandb({name: wandb.Image(str(path))}, step)
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        return path

    @rank_zero_only
    def log_table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]] | Tensor | np.ndarray,
        images: Mapping[str, Sequence[ImageLike | None] | Tensor | np.ndarray] | None = None,
        step: int | None = None,
    ) -> Path:
        """Write ``tables/<name>.csv`` and log a ``wandb.Table`` under ``name``.

        Args:
            columns: names of the value columns.
            rows: one sequence of values per row (numbers, strings, scalar tensors), or a 2-D array.
            images: extra image columns, appended after ``columns``: column name -> one image per
                row (or None for no image). Each image is saved as
                ``tables/<name>/<column>_<row>.png`` and the CSV cell holds that path relative to
                the CSV; W&B gets ``wandb.Image`` cells.
        """
        columns = [str(c) for c in columns]
        if isinstance(rows, (Tensor, np.ndarray)):
            rows = rows.tolist()
        rows = [[_cell(v) for v in row] for row in rows]
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"table {name!r}: row {i} has {len(row)} values for {len(columns)} columns"
                )
        images = dict(images or {})
        for column, column_images in images.items():
            validate_name(column, "image column name")
            if column in columns:
                raise ValueError(f"table {name!r}: image column {column!r} is also a value column")
            if len(column_images) != len(rows):
                raise ValueError(
                    f"table {name!r}: image column {column!r} has {len(column_images)} images "
                    f"for {len(rows)} rows"
                )
        csv_path = self._path("tables", name, ".csv")
        # Image cells: the PNG's path relative to the CSV, or None.
        cells: list[list[str | None]] = [[] for _ in rows]
        for column, column_images in images.items():
            for i, image in enumerate(column_images):
                cell = None if image is None else f"{name}/{column}_{i}.png"
                if cell is not None:
                    (csv_path.parent / name).mkdir(exist_ok=True)
                    Image.fromarray(to_uint8_image(image)).save(csv_path.parent / cell)
                cells[i].append(cell)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns + list(images))
            for row, row_cells in zip(rows, cells):
                writer.writerow(["" if v is None else v for v in row + row_cells])
        pngs = {
            column: [None if cells[i][k] is None else (csv_path.parent / cells[i][k]).read_bytes() for i in range(len(rows))]
            for k, column in enumerate(images)
        }
        self.html.add_table(name, columns, rows, pngs)
        if self.wandb_loggers:
            import wandb

            data = [
                row + [None if c is None else wandb.Image(str(csv_path.parent / c)) for c in row_cells]
                for row, row_cells in zip(rows, cells)
            ]
            self._to_wandb({name: wandb.Table(columns=columns + list(images), data=data)}, step)
        return csv_path

    def log_frame(
        self,
        name: str,
        frame: Any,
        images: Mapping[str, Sequence[ImageLike | None] | Tensor | np.ndarray] | None = None,
        step: int | None = None,
    ) -> Path | None:
        """:meth:`log_table` of a pandas DataFrame (an analysis result's ``to_frame()``): its
        columns and rows, with optional image columns."""
        columns = [str(c) for c in frame.columns]
        rows = frame.astype(object).where(frame.notna(), None).values.tolist()
        return self.log_table(name, columns, rows, images=images, step=step)

    @rank_zero_only
    def log_image_grid(
        self,
        name: str,
        images: Sequence[ImageLike] | Tensor | np.ndarray,
        captions: Sequence[str] | None = None,
        nrow: int = 8,
        step: int | None = None,
        cmap: str = "gray",
    ) -> Path:
        """Save a grid of ``images`` ([n, C, H, W], [n, H, W] or a list of single images), ``nrow``
        images per row, each under its caption, as ``figures/<name>.png``; log the images to W&B
        under ``name`` as a captioned gallery."""
        if isinstance(images, (Tensor, np.ndarray)) and images.ndim not in (3, 4):
            raise ValueError(
                f"images must be [n, C, H, W] or [n, H, W], got shape {tuple(images.shape)}"
            )
        arrays = [to_uint8_image(image) for image in images]
        if not arrays:
            raise ValueError(f"image grid {name!r} has no images")
        if captions is not None and len(captions) != len(arrays):
            raise ValueError(f"image grid {name!r}: {len(captions)} captions for {len(arrays)} images")
        if nrow < 1:
            raise ValueError(f"nrow must be >= 1, got {nrow}")
        ncols = min(nrow, len(arrays))
        nrows = math.ceil(len(arrays) / ncols)
        fig = Figure(figsize=(1.6 * ncols, (1.6 + (0.3 if captions else 0)) * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k < len(arrays):
                grey = arrays[k].ndim == 2
                ax.imshow(arrays[k], cmap=cmap if grey else None, vmin=0, vmax=255, interpolation="nearest")
                if captions is not None:
                    ax.set_title(str(captions[k]), fontsize=8)
        path = self._path("figures", name, ".png")
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight")
        self.html.add_figure(name, path.read_bytes())
        if self.wandb_loggers:
            import wandb

            gallery = [
                wandb.Image(array, caption=None if captions is None else str(captions[k]))
                for k, array in enumerate(arrays)
            ]
            self._to_wandb({name: gallery}, step)
        return path

    @rank_zero_only
    def log_line(
        self,
        name: str,
        x: Sequence[float],
        series: Mapping[str, Sequence[float]],
        xlabel: str = "x",
        ylabel: str = "y",
        title: str | None = None,
        step: int | None = None,
    ) -> Path:
        """A line plot of several ``series`` over ``x``: ``figures/<name>.png`` (and the HTML
        page) always; with W&B, a native line chart (``wandb.plot.line_series``) under ``name``
        that W&B redraws and lets one hover over."""
        x = [float(v) for v in x]
        if not series:
            raise ValueError(f"line plot {name!r} has no series")
        for key, ys in series.items():
            if len(ys) != len(x):
                raise ValueError(f"line plot {name!r}: series {key!r} has {len(ys)} values for {len(x)} x values")
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for key, ys in series.items():
            ax.plot(x, [float(v) for v in ys], marker="o", label=str(key))
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title or name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self._path("figures", name, ".png")
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight")
        self.html.add_figure(name, path.read_bytes(), title)
        if self.wandb_loggers:
            import wandb

            chart = wandb.plot.line_series(
                xs=x, ys=[[float(v) for v in ys] for ys in series.values()], keys=[str(k) for k in series],
                title=title or name, xname=xlabel,
            )
            self._to_wandb({name: chart}, step)
        return path

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
        """Append ``metrics`` to ``metrics.csv`` (columns step, name, value) and log them to every
        logger."""
        values = {}
        for key, value in metrics.items():
            value = _cell(value)
            if not isinstance(value, (int, float)):
                raise TypeError(
                    f"metric {key!r} must be a number or a one-element tensor, got {type(value).__name__}"
                )
            values[str(key)] = float(value)
        path = self.run_dir / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "name", "value"])
            for key, value in values.items():
                writer.writerow(["" if step is None else step, key, value])
        self.html.add_metrics(values, step)
        for lg in self.loggers:
            lg.log_metrics(values, step)

    @rank_zero_only
    def section(self, title: str, note: str | None = None) -> None:
        """Start a section of the HTML page: what is logged next is grouped under ``title``."""
        self.html.section(title, note)

    @rank_zero_only
    def note(self, text: str) -> None:
        """A paragraph of text in the HTML page's current section."""
        self.html.add_note(text)

    @rank_zero_only
    def write_html(self, name: str = "report") -> Path:
        """Write everything logged so far as one self-contained page, ``<run_dir>/<name>.html``."""
        return self.html.write(self.run_dir / f"{validate_name(name)}.html")
