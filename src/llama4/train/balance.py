"""MoE load balancing: auxiliary-loss-free expert bias (DeepSeek-V3, arXiv 2412.19437) and an optional
auxiliary loss, plus the per-layer expert load that the logs and plots show.

The bias is added to the router logits only to *choose* the top-k experts (`MoE.route`), never to the
scores that weight them. After each optimizer step every layer's bias moves by `rate` towards balance:
up for experts that got fewer tokens than average, down for those that got more.

Shape legend: L MoE layers, E experts, N tokens.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE


class ExpertBalancer:
    def __init__(self, model: torch.nn.Module, bias_update_rate: float, aux_loss_coef: float):
        self.layers = [i for i, block in enumerate(model.layers) if isinstance(block.feed_forward, MoE)]
        self.moes: list[MoE] = [model.layers[i].feed_forward for i in self.layers]
        self.rate, self.aux_coef = bias_update_rate, aux_loss_coef
        for m in self.moes:
            m.record = []
        E = self.moes[0].n_experts if self.moes else 0
        # Summed on the model's device: reading counts back every layer would stall a GPU.
        device = self.moes[0].expert_bias_E.device if self.moes else "cpu"
        self.counts_LE = torch.zeros(len(self.moes), E, dtype=torch.float64, device=device)

    def begin(self) -> None:
        """Call before each forward: drops what activation-checkpoint recomputes appended in backward."""
        for m in self.moes:
            m.record.clear()

    def collect(self) -> torch.Tensor | None:
        """After a forward: add its expert counts to the step's, and return the auxiliary loss (or None)."""
        aux = []
        for j, m in enumerate(self.moes):
            for counts_E, logits_NE in m.record:
                self.counts_LE[j] += counts_E.detach()
                if self.aux_coef:
                    aux.append(aux_loss(logits_NE, counts_E, m.top_k))
            m.record.clear()
        return self.aux_coef * torch.stack(aux).mean() if aux else None

    @torch.no_grad()
    def step(self) -> list[list[float]]:
        """After an optimizer step: update the biases from this step's counts; returns each layer's load
        (fraction of routed tokens per expert) and starts counting afresh."""
        load = (self.counts_LE / self.counts_LE.sum(-1, keepdim=True).clamp(min=1)).tolist()
        for j, m in enumerate(self.moes):
            c_E = self.counts_LE[j]
            if self.rate:  # an expert at exactly the mean keeps its bias (sign 0)
                m.expert_bias_E += self.rate * torch.sign(c_E.mean() - c_E).to(m.expert_bias_E)
        self.counts_LE.zero_()
        return load

    def biases(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.feed_forward.expert_bias": m.expert_bias_E.detach().cpu().clone()
                for i, m in zip(self.layers, self.moes)}

    @torch.no_grad()
    def load_biases(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for i, m in zip(self.layers, self.moes):
            key = f"layers.{i}.feed_forward.expert_bias"
            if key not in tensors or tensors[key].shape != m.expert_bias_E.shape:
                raise ValueError(f"{where}: expected {key} of shape {tuple(m.expert_bias_E.shape)}")
            m.expert_bias_E.copy_(tensors[key])


def aux_loss(logits_NE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """sum_e f_e * P_e: f_e the share of routed slots expert e got (x E/k, so 1 when balanced), P_e its
    mean normalised sigmoid affinity. Smallest when tokens spread evenly; only P_e carries gradient."""
    N, E = logits_NE.shape
    s_NE = torch.sigmoid(logits_NE.float())
    p_E = (s_NE / s_NE.sum(-1, keepdim=True)).mean(0)
    f_E = counts_E.float() * E / (top_k * max(N, 1))
    return (f_E * p_E).sum()


def imbalance(load_LE: list[list[float]]) -> float:
    """Mean over layers of (busiest expert's load) / (average load): 1.0 is perfect balance."""
    if not load_LE:
        return 1.0
    return sum(max(row) * len(row) for row in load_LE) / len(load_LE)
