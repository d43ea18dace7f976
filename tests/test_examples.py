"""Every example in examples/ runs in its fast mode on the embedded default."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# examples with a test file of their own (which checks their figures) run there
OWN_TEST = {
    "cli_train.py": "test_cli_configs.py",
    "dcor_diverse_models.py": "test_example_dcor.py",
    "dcor_transfer_attacks.py": "test_example_dcor_recipes.py",
    "dcor_layers.py": "test_example_dcor_recipes.py",
    "dcor_conditioning.py": "test_example_dcor_recipes.py",
    **{f"modeldiff_{case}.py": "test_modeldiff_examples.py" for case in ("augmentation", "pretraining", "sgd", "planted")},
}
FAST_EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py") if p.name not in OWN_TEST)


def test_every_example_is_run_by_a_test():
    for name, test in OWN_TEST.items():
        assert (REPO / "examples" / name).exists() and (REPO / "tests" / test).exists()


def run_example(name: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), "--fast"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("name", FAST_EXAMPLES)
def test_example_runs_fast(name, tmp_path):
    run_example(name, tmp_path)


def test_record_digits_prints_the_store(tmp_path):
    out = run_example("record_digits.py", tmp_path)
    assert "margins/val: (2, 359) float32 [complete]" in out
    assert "checkpoints: 2" in out
