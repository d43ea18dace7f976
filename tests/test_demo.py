"""``lightning-tda demo --fast`` end to end: the report holds every section and every image
decodes, the offline W&B run holds the logged tables and images, and the summary's numbers are
finite and in range."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from wandb_records import wait_for_history

SECTIONS = ["Demo", "Attribution (TRAK)", "ModelDiff (A against B)", "Ensemble diversity", "Distance correlation", "Further training", "ModelPred data values and cleaning", "Summary"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        env[var] = str(out.parent / "wandb-home" / sub)
    done = subprocess.run([sys.executable, "-m", "lightning_tda.cli", "demo", "--out", str(out), "--fast", "true"],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


def test_report_has_every_section_and_every_image_decodes(demo_run):
    out, stdout = demo_run
    page = (out / "report.html").read_text()
    sections = re.findall(r"<h2>(.*?)</h2>", page)
    for section in SECTIONS:
        assert section in sections, (section, sections)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 20
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert f"report:  {out / 'report.html'}" in stdout and "W&B run:" in stdout


def test_summary_numbers_are_finite_and_in_range(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "demo.json").read_text())["summary"]
    for key, value in summary.items():
        assert math.isfinite(value), key
    for key in ("accuracy/A", "accuracy/B", "diversity/mean_accuracy"):
        assert 0.8 <= summary[key] <= 1.0, (key, summary[key])
    for key, value in summary.items():
        if key.startswith(("attribution/lds", "further_training/", "dcor/")):
            assert -1.0 <= value <= 1.0, key
    assert 0 <= summary["diversity/mean_error_inconsistency"] <= 0.5
    assert summary["dcor/A0_A1_penultimate"] > 0.5  # two seeds of one algorithm share most of their representation


def test_wandb_offline_run_holds_tables_and_images(demo_run):
    out, _ = demo_run
    (run_dir,) = list((out / "wandb").glob("offline-run-*"))
    (run_file,) = list(run_dir.glob("run-*.wandb"))
    _, rows = wait_for_history(run_file, {"trak_top_examples", "diversity_heatmap"})
    logged = {key: value for row in rows for key, value in row.items() if not key.startswith("_")}
    kinds = {value["_type"] for value in logged.values() if isinstance(value, dict) and "_type" in value}
    assert {"image-file", "table-file"} <= kinds, kinds
    assert logged["trak_top_examples"]["_type"] == "table-file"
    assert logged["diversity_heatmap"]["_type"] == "image-file"
    assert (run_dir / "files" / logged["diversity_heatmap"]["path"]).exists()
    assert "summary/accuracy/A" in logged or "accuracy/A" in logged
