"""Cross-entropy over the vocabulary without the full [tokens, vocab] logits.

With Llama 4's 202,048-entry vocabulary, fp32 logits for 16k tokens are 13 GB, and autograd would keep
them (and their softmax) for the backward pass. Here the hidden states of the target positions go
through the output head a chunk of tokens at a time, each chunk under activation checkpointing: its
logits are dropped after the forward and recomputed in the backward, so at most one chunk of logits
exists at a time. The last chunk is not checkpointed: the backward starts right after it, so keeping its
logits costs no more memory than recomputing them would, and a short sequence (one chunk) pays no
recompute at all.

The head is *called* (`model.output(h_CD)`), never replaced by a product with its weight, so that a
sharded head's hooks (FSDP's all-gather, tensor-parallel collectives, LoRA parametrizations) fire.

Shape legend: N target tokens, D model dim, V vocab, C tokens per chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], h_CD: torch.Tensor, y_C: torch.Tensor) -> torch.Tensor:
    # Softmax in fp32 whatever the head's dtype (bf16 logits under autocast lose too much in the sum).
    return F.cross_entropy(head(h_CD).float(), y_C, reduction="sum")


def chunked_cross_entropy(h_ND: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels_N: torch.Tensor,
                          *, chunk: int = 4096, norm: float | None = None) -> torch.Tensor:
    """sum over tokens of -log softmax(head(h))[label], divided by `norm` (default: the token count).

    `h_ND` are the final-norm hidden states of the target positions only; `head` maps [C, D] to logits
    [C, V] (the model's output module); `norm` lets gradient accumulation divide by the whole step's
    target count.
    """
    if h_ND.ndim != 2 or labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: expected h [N, D] and labels [N]; got {tuple(h_ND.shape)}, "
                         f"{tuple(labels_N.shape)}")
    norm = float(norm if norm is not None else max(len(labels_N), 1))
    if len(labels_N) == 0:
        return h_ND.sum() * 0.0
    total = None
    for a in range(0, h_ND.shape[0], chunk):
        h_CD, y_C = h_ND[a:a + chunk], labels_N[a:a + chunk]
        if a + chunk >= h_ND.shape[0]:  # the last chunk: its logits live only until the backward starts
            part = _chunk_loss(head, h_CD, y_C)
        else:
            part = checkpoint(_chunk_loss, head, h_CD, y_C, use_reentrant=False)
        total = part if total is None else total + part
    return total / norm
