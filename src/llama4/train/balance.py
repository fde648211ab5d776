"""MoE load balancing: auxiliary-loss-free expert bias (DeepSeek-V3, arXiv 2412.19437) and an optional
auxiliary loss, plus the per-layer expert load that the logs and plots show.

The bias is added to the router logits only to *choose* the top-k experts (`MoE.route`), never to the
scores that weight them. After each optimizer step every layer's bias moves by `rate` towards balance:
up for experts that got fewer tokens than average, down for those that got more.

State lives on the modules, so it survives wrapping and sharding: each MoE counts its valid
(non-padding) routed rows in its `tokens_per_expert` buffer, and keeps its bias in the persistent
`expert_bias` buffer. Under torch.distributed the counts are summed over `group` (the data-parallel
ranks: each routes its own tokens over all E experts) before the update, so the bias moves as in one
process; the auxiliary loss takes its token shares f_e and token count from the same sums, and each
rank adds its own tokens' part of P_e, so the ranks' losses (and summed gradients) add up to the
one-process loss. The auxiliary loss reads the router's logits through a forward hook on `moe.router`.

Shape legend: L MoE layers, E experts, N tokens, k experts per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.moe import MoE


class ExpertBalancer:
    def __init__(self, model: torch.nn.Module, bias_update_rate: float, aux_loss_coef: float, group=None):
        self.group = group  # the ranks whose counts are summed (None: every rank, when distributed)
        self.layers = [i for i, block in enumerate(model.layers) if isinstance(block.feed_forward, MoE)]
        self.moes: list[MoE] = [model.layers[i].feed_forward for i in self.layers]
        self.rate, self.aux_coef = bias_update_rate, aux_loss_coef
        # (moe, router logits [N, E], token mask [N] or None) of every MoE call since `begin`.
        self.seen: list[tuple[MoE, torch.Tensor, torch.Tensor | None]] = []
        self._masks: dict[int, torch.Tensor | None] = {}
        if aux_loss_coef:
            for m in self.moes:
                m.register_forward_pre_hook(self._see_mask, with_kwargs=True)
                m.router.register_forward_hook(lambda mod, args, out, m=m: self.seen.append(
                    (m, out, self._masks.get(id(m)))))

    def _see_mask(self, moe: MoE, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
        self._masks[id(moe)] = None if mask is None else mask.reshape(-1)

    def begin(self) -> None:
        """Call before each forward: counts this forward's tokens and drops what activation-checkpoint
        recomputes recorded during the last backward."""
        self.seen.clear()
        for m in self.moes:
            m.count_tokens = True

    def collect(self) -> torch.Tensor | None:
        """After a forward, before its backward: stop counting (recomputes in backward run the MoE again)
        and return the auxiliary loss (or None)."""
        for m in self.moes:
            m.count_tokens = False
        group = self.group if _distributed() else None
        aux = [aux_loss(logits_NE, m, mask_N, group, distributed=_distributed())
               for m, logits_NE, mask_N in self.seen] if self.aux_coef else []
        self.seen.clear()
        return self.aux_coef * torch.stack(aux).mean() if aux else None

    @property
    def counts_LE(self) -> torch.Tensor:
        """This step's routed rows per expert so far (this rank's), [L, E]."""
        if not self.moes:
            return torch.zeros(0, 0)
        return torch.stack([m.tokens_per_expert for m in self.moes]).double()

    @torch.no_grad()
    def step(self) -> list[list[float]]:
        """After an optimizer step: update the biases from this step's counts; returns each layer's load
        (fraction of routed tokens per expert) and starts counting afresh."""
        counts_LE = self.counts_LE
        if _distributed() and self.moes:
            dist.all_reduce(counts_LE, group=self.group)
        load = (counts_LE / counts_LE.sum(-1, keepdim=True).clamp(min=1)).tolist()
        for j, m in enumerate(self.moes):
            c_E = counts_LE[j]
            if self.rate:  # an expert at exactly the mean keeps its bias (sign 0)
                m.expert_bias += self.rate * torch.sign(c_E.mean() - c_E).to(m.expert_bias)
            m.tokens_per_expert.zero_()
        return load

    def biases(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.feed_forward.expert_bias": m.expert_bias.detach().cpu().clone()
                for i, m in zip(self.layers, self.moes)}

    @torch.no_grad()
    def load_biases(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for i, m in zip(self.layers, self.moes):
            key = f"layers.{i}.feed_forward.expert_bias"
            if key not in tensors or tensors[key].shape != m.expert_bias.shape:
                raise ValueError(f"{where}: expected {key} of shape {tuple(m.expert_bias.shape)}")
            m.expert_bias.copy_(tensors[key])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def aux_loss(logits_NE: torch.Tensor, moe: MoE, mask_N: torch.Tensor | None = None, group=None,
             distributed: bool = False) -> torch.Tensor:
    """sum_e f_e * P_e over valid tokens: f_e the share of routed slots expert e got (x E/k, so 1 when
    balanced), P_e its mean normalised sigmoid affinity. Smallest when tokens spread evenly; only P_e
    carries gradient. The choice is the MoE's own (fp32 logits plus its bias).

    `distributed`: the tokens are spread over the ranks of `group`; f_e and the token count are summed
    over them, and this rank's value is its own tokens' share, so the values over the ranks add up to
    the loss of all their tokens together."""
    N, E = logits_NE.shape
    k = moe.top_k
    w_N = torch.ones(N, device=logits_NE.device) if mask_N is None else mask_N.to(logits_NE.device).float()
    with torch.no_grad():
        idx_Nk = torch.topk(logits_NE.float() + moe.expert_bias, k, dim=-1).indices
        counts_E = torch.zeros(E, device=logits_NE.device).index_add_(0, idx_Nk.reshape(-1),
                                                                      w_N.repeat_interleave(k))
        n_valid = w_N.sum()
        if distributed:
            both_E1 = torch.cat([counts_E, n_valid[None]]).double()
            dist.all_reduce(both_E1, group=group)
            counts_E, n_valid = both_E1[:E].to(counts_E), both_E1[E].to(n_valid)
        n_valid = n_valid.clamp(min=1)
    s_NE = torch.sigmoid(logits_NE.float())
    p_E = ((s_NE / s_NE.sum(-1, keepdim=True)) * w_N[:, None]).sum(0) / n_valid
    f_E = counts_E * E / (k * n_valid)
    return (f_E * p_E).sum()


def imbalance(load_LE: list[list[float]]) -> float:
    """Mean over layers of (busiest expert's load) / (average load): 1.0 is perfect balance."""
    if not load_LE:
        return 1.0
    return sum(max(row) * len(row) for row in load_LE) / len(load_LE)
