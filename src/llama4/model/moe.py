"""Sparse mixture of experts: sigmoid top-k routing, experts run only on their own tokens, plus a shared expert.

The published references (transformers' `Llama4TextMoe`, Meta's `moe.py`) push every token through
every expert and zero the unrouted results: E times the routed FLOPs. Here tokens are sorted by
expert and each expert multiplies only its own contiguous slice. `moe_dense_reference` keeps the
all-experts formulation for tests.

Shape legend: N tokens (B*T flattened), D model dim, E experts, F expert hidden, k experts per token,
R routed (token, expert) pairs = N*k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .layers import SwiGLU


class Experts(nn.Module):
    """E SwiGLU experts stored as the HF checkpoint stores them: gate|up fused on the last dim."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate_up_EDF2 = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """`x_RD` is sorted by expert; expert e owns the next `counts_E[e]` rows."""
        if _grouped_mm_ok(x_RD):
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h_RF2 = torch._grouped_mm(x_RD, self.w_gate_up_EDF2, offs=offs)
            gate, up = h_RF2.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.w_down_EFD, offs=offs)
        # Two matmuls per expert that has tokens; the activation runs once over all rows in between,
        # since each kernel call costs a parallel region (hundreds of them at E = 128).
        sizes = counts_E.tolist()
        used = [e for e, n in enumerate(sizes) if n]
        if not used:
            return torch.empty_like(x_RD)
        x_per_expert = x_RD.split(sizes)
        # unbind, not w[e]: in backward each w[e] would add a zero-filled gradient the size of all E
        # experts; unbind's backward stacks the E gradients once.
        w_gate_up, w_down = self.w_gate_up_EDF2.unbind(0), self.w_down_EFD.unbind(0)
        h_RF2 = torch.cat([x_per_expert[e] @ w_gate_up[e] for e in used])
        gate, up = h_RF2.chunk(2, dim=-1)
        a_per_expert = (F.silu(gate) * up).split([sizes[e] for e in used])
        return torch.cat([a @ w_down[e] for a, e in zip(a_per_expert, used)])


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    # One kernel for all experts where the device has it (Hopper+ CUDA, bf16); the loop elsewhere.
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.num_local_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # Auxiliary-loss-free balancing adds a bias to the logits used to *choose* experts (never to
        # the scores); zero unless a trainer updates it.
        self.register_buffer("expert_bias_E", torch.zeros(cfg.num_local_experts), persistent=False)
        # A trainer sets a list here to receive (counts_E, router logits_NE) from every call.
        self.record: list | None = None

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen experts [N, k], their sigmoid scores [N, k], router logits [N, E])."""
        logits_NE = self.router(x_ND)
        choose_NE = logits_NE + self.expert_bias_E.to(logits_NE.dtype) if self.expert_bias_E.any() else logits_NE
        idx_Nk = torch.topk(choose_NE, self.top_k, dim=-1).indices
        scores_Nk = torch.sigmoid(logits_NE.gather(1, idx_Nk).float()).to(x_ND.dtype)
        return idx_Nk, scores_Nk, logits_NE

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        idx_Nk, scores_Nk, logits_NE = self.route(x_ND)
        # Group (token, expert) pairs by expert: a stable sort keeps token order inside each expert.
        expert_R = idx_Nk.reshape(-1)
        order_R = torch.argsort(expert_R, stable=True)
        token_R = order_R // self.top_k
        counts_E = torch.bincount(expert_R, minlength=self.n_experts)
        if self.record is not None:
            self.record.append((counts_E, logits_NE))
        # The router score scales the expert's *input* (as published), not its output.
        # index_select, not x[idx]: advanced indexing is several times slower on CPU (bf16 most).
        routed_in_RD = x_ND.index_select(0, token_R) * scores_Nk.reshape(-1, 1).index_select(0, order_R)
        routed_out_RD = self.experts(routed_in_RD, counts_E)
        out_ND = self.shared_expert(x_ND)
        out_ND.index_add_(0, token_R, routed_out_RD.to(out_ND.dtype))
        return out_ND.view(shape)


def moe_dense_reference(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, unrouted scores zero: the published formulation, for tests."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    idx_Nk, scores_Nk, _ = moe.route(x_ND)
    scores_NE = torch.zeros(x_ND.shape[0], moe.n_experts, dtype=x_ND.dtype, device=x_ND.device)
    scores_NE.scatter_(1, idx_Nk, scores_Nk)
    in_END = x_ND.unsqueeze(0) * scores_NE.t().unsqueeze(-1)
    gate, up = torch.bmm(in_END, moe.experts.w_gate_up_EDF2).chunk(2, dim=-1)
    routed_ND = torch.bmm(F.silu(gate) * up, moe.experts.w_down_EFD).sum(0)
    return (moe.shared_expert(x_ND) + routed_ND).view(x_BTD.shape)
