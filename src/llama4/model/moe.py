"""Sparse mixture of experts: sigmoid top-k routing, experts run only on their own tokens, plus a shared expert.

The published references (transformers' `Llama4TextMoe`, Meta's `moe.py`) push every token through
every expert and zero the unrouted results: E times the routed FLOPs. Here tokens are sorted by
expert and each expert multiplies only its own contiguous slice. `moe_dense_reference` keeps the
all-experts formulation for tests. The experts' kernel is chosen in `experts.py`.

No host syncs in routing, dispatch or combine (decode must compile): the bias is always added, counts
come from `index_add_`, and the expert kernel is sync-free for small row counts and under compile.

Shape legend: N tokens (B*T flattened), D model dim, E experts, F expert hidden, k experts per token,
R routed (token, expert) pairs = N*k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .experts import Experts
from .init import init_linear, zeros_
from .layers import SwiGLU


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.num_local_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # Auxiliary-loss-free balancing adds this to the logits used to *choose* experts (never to the
        # scores); zero unless a trainer moves it. Persistent, so it travels in state_dict (and with
        # FSDP / distributed checkpoints); fp32 even in a bf16 model, see `_apply`.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_local_experts, dtype=torch.float32))
        # Routed rows of valid (non-padding) tokens per expert, counted in train mode, read and zeroed
        # by the balancer after each optimizer step. Not persistent: it is zero at every checkpoint,
        # so saving it would add a key to every format and carry nothing.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_local_experts, dtype=torch.int64),
                             persistent=False)
        # The balancer turns counting off between a forward and its backward, where activation
        # checkpointing runs the forward again.
        self.count_tokens = True

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts every floating buffer; in bf16, 1e-3 bias steps vanish once
        # the bias is around 0.25. Keep the routing bias fp32 (values taken from before the cast).
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device, torch.float32)
        return self

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        init_linear(self.router, std, generator)
        self.experts.init_weights(std, generator)
        self.shared_expert.init_weights(std, generator)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        zeros_(self.expert_bias)
        zeros_(self.tokens_per_expert)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen experts [N, k], their sigmoid scores [N, k], router logits [N, E])."""
        logits_NE = self.router(x_ND)
        # The choice is made in fp32 (logits of a bf16 model, plus the fp32 bias), always adding the
        # bias: testing it for zero would be a host sync.
        choose_NE = logits_NE.float() + self.expert_bias
        idx_Nk = torch.topk(choose_NE, self.top_k, dim=-1).indices
        scores_Nk = torch.sigmoid(logits_NE.gather(1, idx_Nk).float()).to(x_ND.dtype)
        return idx_Nk, scores_Nk, logits_NE

    def forward(self, x_BTD: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`token_mask` [B, T] (True for real tokens) keeps padding out of the expert load counts; every
        token is still computed."""
        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        idx_Nk, scores_Nk, _ = self.route(x_ND)
        if x_ND.shape[0] == 1 and not (self.training and self.count_tokens):
            return self._one_token(x_ND, idx_Nk, scores_Nk).view(shape)
        # Group (token, expert) pairs by expert: a stable sort keeps token order inside each expert.
        expert_R = idx_Nk.reshape(-1)
        order_R = torch.argsort(expert_R, stable=True)
        token_R = order_R // self.top_k
        # index_add_, not bincount: bincount sizes its output from the data (a host sync on CUDA).
        ones_R = torch.ones_like(expert_R)
        counts_E = torch.zeros(self.n_experts, dtype=torch.int64, device=x_ND.device).index_add_(0, expert_R, ones_R)
        if self.training and self.count_tokens:
            valid_R = ones_R if token_mask is None else \
                token_mask.reshape(-1, 1).expand(-1, self.top_k).reshape(-1).to(torch.int64)
            self.tokens_per_expert.index_add_(0, expert_R, valid_R)
        # The router score scales the expert's *input* (as published), not its output.
        # index_select, not x[idx]: advanced indexing is several times slower on CPU (bf16 most).
        routed_in_RD = x_ND.index_select(0, token_R) * scores_Nk.reshape(-1, 1).index_select(0, order_R)
        routed_out_RD = self.experts(routed_in_RD, counts_E)
        out_ND = self.shared_expert(x_ND)
        out_ND.index_add_(0, token_R, routed_out_RD.to(out_ND.dtype))
        return out_ND.view(shape)

    def _one_token(self, x_1D: torch.Tensor, idx_1k: torch.Tensor, scores_1k: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: the k rows are the one token's, so there is no sort over experts (k = 1:
        none at all; k > 1: a sort of k expert ids), no gather of tokens and no scatter back."""
        expert_k = idx_1k[0]
        in_kD = x_1D * scores_1k.reshape(-1, 1)
        if self.top_k > 1:
            expert_k, order_k = torch.sort(expert_k)
            in_kD = in_kD.index_select(0, order_k)
        counts_E = torch.zeros(self.n_experts, dtype=torch.int64, device=x_1D.device).index_add_(
            0, expert_k, torch.ones_like(expert_k))
        routed_kD = self.experts(in_kD, counts_E)
        out_1D = self.shared_expert(x_1D)
        routed_1D = routed_kD if self.top_k == 1 else routed_kD.sum(0, keepdim=True)
        return out_1D + routed_1D.to(out_1D.dtype)


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
