"""The dCor recipe examples run in their fast modes, print their tables, write PNG/CSV, and log to
an offline W&B run when asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_attacks_fast(tmp_path, capsys):
    result = load("dcor_transfer_attacks").main(["--fast", "--out", str(tmp_path)])
    assert result.models == ("source", "M1", "M1'") and result.groups == ("source", "dcor penalty", "independent")
    assert result.columns() == ["clean", "FGSM eps=0.1", "FGSM eps=0.3", "PGD eps=0.1", "PGD eps=0.3"]
    acc = result.accuracy[0]
    assert acc[0, 0] > 0.5 and acc[0, -1] < 0.5 * acc[0, 0]  # learnt; white-box PGD at 0.3 breaks the source
    # the penalty decorrelates M1 from the source more than its twin is
    assert result.dcor_to_source[0, 1] < result.dcor_to_source[0, 2]
    printed = capsys.readouterr().out
    assert "| gain (penalty - independent) |" in printed and "| dcor penalty |" in printed
    assert (tmp_path / "figures" / "transfer_attacks.png").stat().st_size > 10_000
    assert (tmp_path / "tables" / "transfer_attacks_summary.csv").exists()
    assert (tmp_path / "result" / "result.json").exists()


def test_transfer_attacks_checks_its_arguments():
    example = load("dcor_transfer_attacks")
    for bad in (["--eps", "-0.1"], ["--epochs", "0"], ["--size", "1"], ["--pgd-steps", "0"]):
        with pytest.raises(SystemExit):
            example.main(bad)


def test_layers_fast_logs_to_wandb_offline(tmp_path, capsys, monkeypatch):
    from wandb_records import wait_for_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    result = load("dcor_layers").main(["--fast", "--out", str(tmp_path), "--wandb"])
    assert result.dcor.shape == (8, 8) and result.partial_a_given_b.shape == (8, 8)
    assert ((result.dcor > 0) & (result.dcor <= 1)).all()
    assert "| pdcor_last_b_given_a |" in capsys.readouterr().out
    assert (tmp_path / "figures" / "layers.png").stat().st_size > 10_000
    assert (tmp_path / "tables" / "layers_table.csv").exists()
    (run_file,) = tmp_path.rglob("run-*.wandb")
    expected = {"layers", "layers_table", "layers/dcor_mean", "layers/pdcor_last_a_given_b"}
    _, rows = wait_for_history(run_file, expected)  # the run file can trail the run's finish
    keys = {key for row in rows for key in row}
    assert expected <= keys


def test_conditioning_fast(tmp_path, capsys):
    result = load("dcor_conditioning").main(["--fast", "--out", str(tmp_path)])
    assert result.pdcor_beyond_given.shape == (1, 2) and result.n_examples == 359
    assert "| R*(B given A, signal) |" in capsys.readouterr().out
    assert (tmp_path / "figures" / "conditioning.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        load("dcor_conditioning").main(["--weight", "-1"])
