"""lightning-tda: training-data attribution and model comparison for PyTorch Lightning."""

import warnings as _warnings

__version__ = "0.1.0"

# Lightning 2.6's batch-size inference builds torch's deprecated ``LeafSpec`` on every training
# step (a FutureWarning since torch 2.10): a warning about Lightning's internals that no user of
# ours can act on, raised by the fits our recorders, sweeps and analyses run. Only that exact
# message is filtered; every other warning reaches the user.
_warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
