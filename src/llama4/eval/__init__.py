"""Evaluation: exact-match accuracy on chat questions (the synthetic held-out set)."""

from .synth_qa import evaluate, heldout_synthetic

__all__ = ["evaluate", "heldout_synthetic"]
