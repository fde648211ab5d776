"""Datasets built here: the synthetic shapes / moving-square question-answer set."""

from .synth import make_dataset

__all__ = ["make_dataset"]
