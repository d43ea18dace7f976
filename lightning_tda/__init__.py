"""lightning-tda: training-data attribution and model comparison for PyTorch Lightning."""

__version__ = "0.1.0"
