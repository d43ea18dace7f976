"""benchmarks/attribution_scale.py --quick runs, checks its scores against TRAK's formula and writes its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "attribution_scale.py"


def test_attribution_scale_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("attribution_scale", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "attribution_scale.md"
    module.main(["--quick", "--root", str(tmp_path / "root"), "--out", str(out)])
    report = out.read_text()
    for needle in ("peak RSS (GiB)", "(floor)", "<= 2 GiB: met", "largest relative error", "Command:"):
        assert needle in report, needle
