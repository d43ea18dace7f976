"""Scoring into a store resumes where it stopped: killed (an exception, or SIGKILL in a
subprocess) and rerun, it computes only the missing kernels and tiles and ends with the same
scores as an uninterrupted run; other settings are refused."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_tda.attribution import TRAK, GradDot
from lightning_tda.store import RunStore, StoreError

SCRIPT = Path(__file__).with_name("scoring_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from scoring_run import TILES, scorer, sources  # noqa: E402


class Counter:
    """Counts (and optionally stops after) calls of a RunStore method or a scorer's kernel."""

    def __init__(self, monkeypatch, owner, name, fail_after=None):
        self.calls, original = 0, getattr(owner, name)

        def counted(*args, **kwargs):
            if fail_after is not None and self.calls == fail_after:
                raise KeyboardInterrupt("killed for the test")
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def reference(tmp_path):
    out = RunStore.create(tmp_path / "reference")
    return scorer().score(sources(tmp_path), out=out, **TILES)


def test_interrupted_scoring_recomputes_only_missing_tiles(tmp_path, reference, monkeypatch):
    out = RunStore.create(tmp_path / "out")
    with monkeypatch.context() as patch:
        Counter(patch, RunStore, "write_tile", fail_after=5)
        with pytest.raises(KeyboardInterrupt):
            scorer().score(sources(tmp_path), out=out, **TILES)
    assert out.completed_tiles("scores/trak/val").sum() == 5
    assert not out.manifest["scores"]["trak/val"]["complete"]
    tiles = Counter(monkeypatch, RunStore, "write_tile")
    kernels = Counter(monkeypatch, TRAK, "kernel")
    resumed = scorer().score(sources(tmp_path), out=out, **TILES)
    assert (tiles.calls, kernels.calls) == (12 - 5, 0)  # the 6 kernels were all written before
    np.testing.assert_array_equal(resumed, reference)
    assert out.manifest["scores"]["trak/val"]["complete"] and not out.has_array("scoring/trak/val/kernels")
    again = scorer().score(sources(tmp_path), out=out, **TILES)  # complete: nothing recomputed
    assert tiles.calls == 7 and kernels.calls == 0
    np.testing.assert_array_equal(again, reference)


@pytest.mark.parametrize("flag, count", [
    ("--kill-after-tiles", 7), pytest.param("--kill-after-kernels", 2, marks=pytest.mark.slow),
])
def test_sigkilled_scoring_resumes_to_the_same_scores(tmp_path, reference, monkeypatch, flag, count):
    root = tmp_path / "killed"
    sources(root)  # the same fake runs as the reference (fixed seeds)
    killed = subprocess.run([sys.executable, str(SCRIPT), str(root), flag, str(count)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = RunStore(root / "out")
    tiles = Counter(monkeypatch, RunStore, "write_tile")
    kernels = Counter(monkeypatch, TRAK, "kernel")
    resumed = scorer().score(sources(root), out=out, **TILES)
    if flag == "--kill-after-kernels":
        assert (kernels.calls, tiles.calls) == (6 - 2, 12)
    else:
        assert (kernels.calls, tiles.calls) == (0, 12 - 7)
    np.testing.assert_array_equal(resumed, reference)


def test_other_settings_are_refused_unless_overwrite(tmp_path, reference):
    out = RunStore(tmp_path / "reference")
    with pytest.raises(StoreError, match="already holds scores 'trak/val' from other settings"):
        TRAK(damping=0.5, progress=False).score(sources(tmp_path), out=out, **TILES)
    with pytest.raises(StoreError, match="other settings or sources"):
        scorer().score(sources(tmp_path)[:1], out=out, **TILES)
    replaced = TRAK(damping=0.5, progress=False).score(sources(tmp_path), out=out, overwrite=True, **TILES)
    assert not np.allclose(replaced, reference)
    np.testing.assert_allclose(out.read("scores/trak/val"), replaced)
    GradDot(progress=False).score(sources(tmp_path), out=out)  # another scorer: its own array
    assert sorted(out.manifest["scores"]) == ["grad_dot/val", "trak/val"]
