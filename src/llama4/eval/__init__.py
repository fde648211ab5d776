"""Evaluation: log-likelihood scoring (`eval.score`: `llama4.score`, `llama4.score_rolling`) and exact-match
accuracy on chat questions (`eval.synth_qa`).

`score` is the submodule here (the function is `llama4.score`), so `from llama4.eval import score` gets the module."""

from .synth_qa import evaluate, heldout_synthetic

__all__ = ["evaluate", "heldout_synthetic"]
