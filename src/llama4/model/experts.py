"""The routed experts: E SwiGLU FFNs applied to rows already sorted by expert.

Shape legend: R routed rows (token, expert pairs), D model dim, E experts, F expert hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """E SwiGLU experts stored as the HF checkpoint stores them: gate|up fused on the last dim."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """`x_RD` is sorted by expert; expert e owns the next `counts_E[e]` rows."""
        if _grouped_mm_ok(x_RD):
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            h_RF2 = torch._grouped_mm(x_RD, self.gate_up_proj, offs=offs)
            gate, up = h_RF2.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj, offs=offs)
        # Two matmuls per expert that has tokens; the activation runs once over all rows in between,
        # since each kernel call costs a parallel region (hundreds of them at E = 128).
        sizes = counts_E.tolist()
        used = [e for e, n in enumerate(sizes) if n]
        if not used:
            return torch.empty_like(x_RD)
        x_per_expert = x_RD.split(sizes)
        # unbind, not w[e]: in backward each w[e] would add a zero-filled gradient the size of all E
        # experts; unbind's backward stacks the E gradients once.
        w_gate_up, w_down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        h_RF2 = torch.cat([x_per_expert[e] @ w_gate_up[e] for e in used])
        gate, up = h_RF2.chunk(2, dim=-1)
        a_per_expert = (F.silu(gate) * up).split([sizes[e] for e in used])
        return torch.cat([a @ w_down[e] for a, e in zip(a_per_expert, used)])


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    # One kernel for all experts where the device has it (Hopper+ CUDA, bf16); the loop elsewhere.
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)
