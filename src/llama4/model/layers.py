"""Small building blocks shared by the text decoder: norms, SwiGLU, RoPE.

Shape legend: B batch, T tokens, D model dim, F FFN hidden, H query heads, Dh head dim,
A rotation angles per head (Dh/2), each a (cos, sin) pair.
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
    """Rotations for absolute `positions` [..., T] -> [..., T, A, 2] holding (cos, sin) of p * f.

    A real tensor, so that every backend (torch.compile included) can hold it. Eager mode computes it
    with `polar` and rotates by complex multiplication, as Meta and transformers do: bf16 logits then
    match theirs bit for bit (one rounding flip is enough to change a near-tied top-1 expert)."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    if torch.compiler.is_compiling():
        return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))


def apply_rope(x_BTHD: torch.Tensor, rot_BTA2: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... by the angles in `rot` (Meta's layout).

    `rot` is [T, A, 2] or [B, T, A, 2] (cos, sin), or the equivalent complex [.., T, A];
    the head dim is broadcast."""
    if rot_BTA2.is_complex():
        rot_BTA2 = torch.view_as_real(rot_BTA2)
    x = x_BTHD.float().reshape(*x_BTHD.shape[:-1], -1, 2)
    if not torch.compiler.is_compiling():
        rot = torch.view_as_complex(rot_BTA2.contiguous()).unsqueeze(-2)
        return torch.view_as_real(torch.view_as_complex(x) * rot).flatten(-2).type_as(x_BTHD)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = rot_BTA2[..., 0].unsqueeze(-2), rot_BTA2[..., 1].unsqueeze(-2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x_BTHD)
