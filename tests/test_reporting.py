"""Reporter: files always; W&B (offline, read back from its run directory) with a WandbLogger."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from PIL import Image  # noqa: E402

from wandb_records import wait_for_history  # noqa: E402
from lightning_tda.reporting import Reporter, to_uint8_image  # noqa: E402
from lightning_tda.store import validate_name  # noqa: E402

SECRET = "ltda-secret-value-9d41f0"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def line_figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 0, 2])
    ax.set_title("curve")
    return fig


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def log_everything(reporter: Reporter) -> dict[str, Path]:
    imgs = images()
    return {
        "figure": reporter.log_figure("curve", line_figure(), step=1, close=True),
        "table": reporter.log_table(
            "top",
            ["rank", "score"],
            [[0, 0.5], [1, torch.tensor(0.25)], [2, np.float32(0.125)]],
            images={"image": imgs},
            step=2,
        ),
        "grid": reporter.log_image_grid("grid", imgs[:, 0], captions=["a", "b", "c"], nrow=2, step=3),
        "metrics": reporter.log_metrics({"lds": 0.5, "n": torch.tensor(3)}, step=3),
        "line": reporter.log_line("lds_curve", [1, 5, 10], {"trak": [0.1, 0.2, 0.3], "grad_dot": [0.1, 0.11, 0.12]},
                                  xlabel="models", ylabel="LDS", step=4),
    }


def check_files(run_dir: Path) -> None:
    """The files that are written whatever the loggers."""
    for name in ("curve", "grid"):
        png = read_png(run_dir / "figures" / f"{name}.png")
        assert png.ndim == 3 and png.shape[0] > 50 and png.shape[1] > 50
    with open(run_dir / "tables" / "top.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["rank", "score", "image"]
    assert [r[:2] for r in rows[1:]] == [["0", "0.5"], ["1", "0.25"], ["2", "0.125"]]
    imgs = images()
    for i, row in enumerate(rows[1:]):
        assert row[2] == f"top/image_{i}.png"
        np.testing.assert_array_equal(read_png(run_dir / "tables" / row[2]), to_uint8_image(imgs[i]))
    with open(run_dir / "metrics.csv", newline="") as f:
        assert list(csv.reader(f)) == [["step", "name", "value"], ["3", "lds", "0.5"], ["3", "n", "3.0"]]


# ------------------------------------------------------------------ reading an offline W&B run


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("LTDA_TEST_TOKEN", SECRET)  # must not end up anywhere
    return tmp_path


def test_wandb_offline_run_holds_figure_table_and_grid(offline_wandb):
    tmp_path = offline_wandb
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    reporter = Reporter(tmp_path / "report", logger)
    paths = log_everything(reporter)
    run = logger.experiment
    run_dir, run_id = Path(run.dir).parent, run.id
    from_trainer = Reporter.from_trainer(Trainer(default_root_dir=tmp_path, logger=logger, enable_progress_bar=False))
    assert from_trainer.run_dir == tmp_path / "t" / run_id / "reports"
    assert from_trainer.wandb_loggers == [logger]
    run.finish()

    assert paths["figure"] == tmp_path / "report" / "figures" / "curve.png"
    check_files(tmp_path / "report")
    records, rows = wait_for_history(run_dir / f"run-{run_id}.wandb", {"curve", "top", "grid", "lds", "lds_curve_table"})
    by_key = {key: row for row in rows for key in row if not key.startswith("_")}

    # The figure: one image, the very PNG written under the report directory.
    curve = by_key["curve"]
    assert curve["curve"]["_type"] == "image-file" and curve["trainer/global_step"] == 1
    assert sha256(run_dir / "files" / curve["curve"]["path"]) == sha256(paths["figure"])

    # The grid: a captioned gallery of the three images.
    grid = by_key["grid"]["grid"]
    assert grid["_type"] == "images/separated" and grid["count"] == 3 and grid["captions"] == ["a", "b", "c"]
    imgs = images()
    for i, name in enumerate(grid["filenames"]):
        np.testing.assert_array_equal(read_png(run_dir / "files" / name), to_uint8_image(imgs[i, 0]))

    # The table: a table file in the run directory, its full content (image cells) in the run-table
    # artifact that the .wandb file records (staged locally until `wandb sync`).
    table = by_key["top"]
    assert table["top"]["_type"] == "table-file" and table["top"]["nrows"] == 3 and table["top"]["ncols"] == 3
    assert table["trainer/global_step"] == 2
    table_file = json.loads((run_dir / "files" / table["top"]["path"]).read_text())
    assert table_file["columns"] == ["rank", "score", "image"]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.type == "run_table" and a.name.endswith("-top")]
    staged = {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}
    content = json.loads(staged["top.table.json"].read_text())
    assert content["columns"] == ["rank", "score", "image"]
    assert [row[:2] for row in content["data"]] == [[0, 0.5], [1, 0.25], [2, 0.125]]
    for i, row in enumerate(content["data"]):
        cell = row[2]
        assert cell["_type"] == "image-file"
        ours = tmp_path / "report" / "tables" / "top" / f"image_{i}.png"
        assert cell["sha256"] == sha256(ours) == sha256(staged[cell["path"]])

    # The line plot: a native W&B chart, its data a table of (x, series, y) rows.
    line = by_key["lds_curve_table"]["lds_curve_table"]
    assert line["_type"] == "table-file" and line["nrows"] == 6 and line["ncols"] == 3
    assert (tmp_path / "report" / "figures" / "lds_curve.png").exists()

    # Metrics went to W&B too.
    metric = by_key["lds"]
    assert metric["lds"] == 0.5 and metric["n"] == 3.0 and metric["trainer/global_step"] == 3

    # Nothing of the environment was logged.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"environment value found in {path}"


def test_no_logger_writes_files_only(tmp_path):
    reporter = Reporter(tmp_path / "run")
    assert reporter.loggers == [] and reporter.wandb_loggers == []
    log_everything(reporter)
    check_files(tmp_path / "run")


def test_csv_logger_gets_metrics_and_files_are_written(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    reporter = Reporter(tmp_path / "run", [logger])
    log_everything(reporter)
    check_files(tmp_path / "run")
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["lds"]) == 0.5 and int(row["step"]) == 3


def test_from_trainer_directories(tmp_path):
    plain = Reporter.from_trainer(Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False))
    assert plain.run_dir == tmp_path / "reports" and plain.loggers == []
    logger = CSVLogger(tmp_path / "logs", name="exp")
    trainer = Trainer(default_root_dir=tmp_path, logger=logger, enable_progress_bar=False)
    reporter = Reporter.from_trainer(trainer)
    assert reporter.run_dir == Path(logger.log_dir) / "reports" and reporter.loggers == [logger]
    assert Reporter.from_trainer(trainer, subdir="figs").run_dir.name == "figs"


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    reporter = Reporter(tmp_path / "run")
    assert reporter.log_figure("f", line_figure()) is None
    reporter.log_metrics({"x": 1.0})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "", "a\\b", "."])
def test_names_that_become_paths_are_validated(tmp_path, name):
    reporter = Reporter(tmp_path)
    with pytest.raises(ValueError, match="name"):
        reporter.log_figure(name, line_figure())
    with pytest.raises(ValueError, match="name"):
        reporter.log_table(name, ["a"], [[1]])
    with pytest.raises(ValueError, match="image column name"):
        reporter.log_table("t", ["a"], [[1]], images={name or "..": images(1)})
    assert validate_name("run_1.final") == "run_1.final"
    assert not any(tmp_path.iterdir())


def test_bad_tables_grids_and_metrics(tmp_path):
    reporter = Reporter(tmp_path)
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        reporter.log_table("t", ["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="has 2 images for 3 rows"):
        reporter.log_table("t", ["a"], [[1], [2], [3]], images={"img": images(2)})
    with pytest.raises(ValueError, match="also a value column"):
        reporter.log_table("t", ["a"], [[1]], images={"a": images(1)})
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        reporter.log_image_grid("g", images(3), captions=["a", "b"])
    with pytest.raises(ValueError, match=r"\[n, C, H, W\] or \[n, H, W\]"):
        reporter.log_image_grid("g", torch.rand(8, 8))
    with pytest.raises(ValueError, match="an image must be"):
        reporter.log_image_grid("g", torch.rand(2, 5, 8, 8))
    with pytest.raises(TypeError, match="metric 'm' must be a number"):
        reporter.log_metrics({"m": "high"})
    with pytest.raises(TypeError, match="Lightning Logger"):
        Reporter(tmp_path, [object()])  # type: ignore[list-item]


def test_to_uint8_image_conversions(tmp_path):
    unit = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    np.testing.assert_array_equal(to_uint8_image(unit), [[0, 255], [128, 64]])
    np.testing.assert_array_equal(to_uint8_image(unit[None] * 4 - 2), [[0, 255], [128, 64]])  # min-max, [1, H, W]
    np.testing.assert_array_equal(to_uint8_image(np.array([[True, False]])), [[255, 0]])
    rgb = torch.rand(3, 4, 5)
    assert to_uint8_image(rgb).shape == (4, 5, 3)
    assert to_uint8_image(rgb.permute(1, 2, 0).numpy()).shape == (4, 5, 3)
    assert to_uint8_image(np.zeros((4, 4), np.uint8)).dtype == np.uint8
    # A grid of RGB images, a list input and no captions.
    path = Reporter(tmp_path).log_image_grid("rgb", list(torch.rand(5, 3, 6, 6)), nrow=3)
    assert read_png(path).shape[2] in (3, 4)


def test_html_page_holds_everything_logged_and_needs_no_server(tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    reporter = Reporter(tmp_path / "run", html_title="demo page")
    reporter.section("First", "a note <with> markup")
    log_everything(reporter)
    reporter.section("Second")
    reporter.note("more")
    page = reporter.write_html().read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>demo page</title>" in page
    assert "a note &lt;with&gt; markup" in page  # escaped
    assert [m for m in re.findall(r"<h2>(.*?)</h2>", page)] == ["First", "Second"]
    assert 'class="sortable"' in page and "addEventListener('click'" in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 1 + 3 + 1 + 1  # the figure, the table's three image cells, the grid, the line plot
    for uri in uris:
        Image.open(io.BytesIO(base64.b64decode(uri))).verify()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
