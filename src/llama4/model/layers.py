"""Small building blocks shared by the text decoder: norms, SwiGLU, RoPE.

Shape legend: B batch, T tokens, D model dim, F FFN hidden, H heads, Dh head dim, R = Dh/2 rotary
frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_linear, ones_


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Llama does (bf16 sums lose too much)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation of the last dim (Llama 4's QK-norm), in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the MoE's shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        for w in (self.w1, self.w3, self.w2):
            init_linear(w, std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [R], with llama3-style scaling when configured.

    llama3 scaling keeps high frequencies (short wavelengths), divides low ones by `factor`, and blends
    linearly in between. When high_freq_factor == low_freq_factor (Scout) the blend band is empty:
    we never divide by their difference.
    """
    # Always on the CPU: tiny, and arithmetic on the meta device would import torch._dynamo (seconds).
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv
    factor = float(scaling["factor"])
    lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    if hi > lo:
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        out = torch.where(medium, blended, out)
    return out


def rope_freqs(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Complex rotations e^{i p f} for absolute `positions` [..., T] -> [..., T, R] (complex64)."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs_TR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of `x` [B, T, H, Dh] as complex numbers (Meta's
    layout).

    `freqs_TR` is [T, R] or [B, T, R] (complex); the head dim is broadcast.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_TR.unsqueeze(-2)).flatten(-2).type_as(x)
