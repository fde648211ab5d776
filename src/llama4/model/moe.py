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
from .experts import Experts
from .layers import SwiGLU


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
    gate, up = torch.bmm(in_END, moe.experts.gate_up_proj).chunk(2, dim=-1)
    routed_ND = torch.bmm(F.silu(gate) * up, moe.experts.down_proj).sum(0)
    return (moe.shared_expert(x_ND) + routed_ND).view(x_BTD.shape)
