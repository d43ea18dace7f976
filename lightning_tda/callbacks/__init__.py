"""Recorders: Lightning callbacks that write what the analyses need into a RunStore."""

from lightning_tda.callbacks.checkpoint_recorder import CheckpointRecorder, checkpoint_tag
from lightning_tda.callbacks.gradient_recorder import GradientRecorder
from lightning_tda.callbacks.margin_recorder import MarginRecorder, read_logits, read_margins
from lightning_tda.callbacks.recording import RecordSchedule

__all__ = ["CheckpointRecorder", "GradientRecorder", "MarginRecorder", "RecordSchedule", "checkpoint_tag", "read_logits", "read_margins"]
