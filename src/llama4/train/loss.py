"""Cross-entropy over the vocabulary without the full [tokens, vocab] logits.

With Llama 4's 202,048-entry vocabulary, fp32 logits for 16k tokens are 13 GB, and autograd would keep
them (and their softmax) for the backward pass. Here the hidden states of the target positions are
projected a chunk of tokens at a time; each chunk's gradient with respect to the hidden states and the
output matrix is computed on the spot (softmax minus one-hot), so at most one chunk of logits exists.

Shape legend: N target tokens, D model dim, V vocab, C tokens per chunk.
"""

from __future__ import annotations

import torch


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk: int, norm: float):
        dev = h_ND.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_ND.dtype
        with torch.autocast(dev, enabled=False):
            w_cVD = w_VD.to(cdt)
            grad_h_ND = torch.empty_like(h_ND)
            grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if w_VD.requires_grad \
                else None
            total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            for a in range(0, h_ND.shape[0], chunk):
                h_CD = h_ND[a:a + chunk].to(cdt)
                y_C = labels_N[a:a + chunk]
                logits_CV = (h_CD @ w_cVD.t()).float()
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                total += (lse_C - logits_CV.gather(1, y_C[:, None])[:, 0]).sum()
                # d(loss)/d(logits) = softmax - onehot, written over the logits to save memory.
                g_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                g_CV[torch.arange(len(y_C), device=y_C.device), y_C] -= 1.0
                g_CV /= norm
                grad_h_ND[a:a + chunk] = (g_CV.to(cdt) @ w_cVD).to(h_ND.dtype)
                if grad_w_VD is not None:
                    grad_w_VD.addmm_(g_CV.t(), h_CD.float())
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(w_VD.dtype) if grad_w_VD is not None else None)
        return total / norm

    @staticmethod
    def backward(ctx, grad_out):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return grad_h_ND * grad_out, None if grad_w_VD is None else grad_w_VD * grad_out, None, None, None


def chunked_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, *,
                          chunk: int = 4096, norm: float | None = None) -> torch.Tensor:
    """sum over tokens of -log softmax(h @ w.T)[label], divided by `norm` (default: the token count).

    `h_ND` are the final-norm hidden states of the target positions only; `norm` lets gradient
    accumulation divide by the whole step's target count.
    """
    if h_ND.ndim != 2 or labels_N.shape != h_ND.shape[:1] or w_VD.shape[1] != h_ND.shape[1]:
        raise ValueError(f"chunked_cross_entropy: expected h [N, D], w [V, D], labels [N]; got {tuple(h_ND.shape)}, "
                         f"{tuple(w_VD.shape)}, {tuple(labels_N.shape)}")
    norm = float(norm if norm is not None else max(len(labels_N), 1))
    if len(labels_N) == 0:
        return h_ND.sum() * 0.0
    return _ChunkedCE.apply(h_ND, w_VD, labels_N, chunk, norm)
