"""Where a command's results go: a report directory (PNG/CSV and one HTML page, always) and,
optionally, a W&B run (offline unless the user is logged in, or as ``WANDB_MODE`` says)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_tda.reporting import Reporter
from lightning_tda.store import RunStore


def check_output_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path a report may go to: not a file, not a RunStore (reports never go into
    the records they are about). Checked before any work, created only when writing."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is an existing file; give a directory for the report")
    if RunStore.exists(path):
        raise ValueError(f"--out {path} is a RunStore; give another directory for the report")
    return path


def wandb_logged_in() -> bool:
    """Whether W&B has an API key here (then runs sync online, unless ``WANDB_MODE`` says otherwise)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_reporter(out: Path, title: str, wandb: bool, run_name: str) -> Reporter:
    """A reporter writing under ``out`` (and to a W&B run when ``wandb``)."""
    out.mkdir(parents=True, exist_ok=True)
    logger: Any = None
    if wandb:
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE", "") in ("offline", "dryrun") or not wandb_logged_in()
        logger = WandbLogger(project="lightning-tda", name=run_name, save_dir=str(out), offline=offline)
    return Reporter(out, logger, html_title=title)


def finish(reporter: Reporter) -> dict[str, str]:
    """Write the HTML page, close the W&B run; returns where everything is."""
    where = {"report": str(reporter.write_html())}
    for logger in reporter.wandb_loggers:
        experiment = logger.experiment
        where["wandb"] = str(Path(experiment.dir).parent) if experiment.dir else str(experiment.id)
        experiment.finish()
    return where
