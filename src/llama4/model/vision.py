"""The Llama 4 vision tower: ViT with 2D RoPE -> pixel shuffle -> adapter MLP -> projector to text width.

Each tile becomes P = (S/patch)^2 * ratio^2 embeddings (144 for 336-px tiles) that the decoder reads
at the `<|patch|>` positions.

Shape legend: N tiles, C channels, S tile side in pixels, L patches per tile (+1 with the class token),
D vision width, Dh head dim, R = Dh/2 rotary frequencies, P tokens per tile after pixel shuffle,
W a width other than D (pixel-shuffled or adapter features), E text width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .init import init_layernorm, init_linear, normal_
from .layers import apply_rope


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = v.num_attention_heads, v.hidden_size // v.num_attention_heads
        self.wq = nn.Linear(v.hidden_size, v.hidden_size)
        self.wk = nn.Linear(v.hidden_size, v.hidden_size)
        self.wv = nn.Linear(v.hidden_size, v.hidden_size)
        self.wo = nn.Linear(v.hidden_size, v.hidden_size)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        for w in (self.wq, self.wk, self.wv, self.wo):
            init_linear(w, std, generator)

    def forward(self, x_NLD: torch.Tensor, freqs_LR: torch.Tensor) -> torch.Tensor:
        N, L, _ = x_NLD.shape
        q, k, v = (w(x_NLD).view(N, L, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, freqs_LR), apply_rope(k, freqs_LR)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(N, L, -1))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(v.hidden_size)
        self.attention = VisionAttention(v)
        self.ffn_norm = nn.LayerNorm(v.hidden_size)
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        init_layernorm(self.attention_norm)
        self.attention.init_weights(std, generator)
        init_layernorm(self.ffn_norm)
        init_linear(self.fc1, std, generator)
        init_linear(self.fc2, std, generator)

    def forward(self, x_NLD, freqs_LR):
        x_NLD = x_NLD + self.attention(self.attention_norm(x_NLD), freqs_LR)
        return x_NLD + self.fc2(F.gelu(self.fc1(self.ffn_norm(x_NLD))))


def pixel_shuffle(x_NLD: torch.Tensor, ratio: float) -> torch.Tensor:
    """Trade resolution for width: [N, h*w, D] -> [N, h*w*r^2, D/r^2], in the published ordering.

    With r = 0.5 each output token is one 2x2 block of the patch grid (blocks in row-major order),
    its features the block's four patches concatenated: (top-left, top-right, bottom-left, bottom-right).
    """
    N, L, D = x_NLD.shape
    side = math.isqrt(L)
    small, wide = int(side * ratio), int(D / ratio)
    x = x_NLD.view(N, side, small, wide).permute(0, 2, 1, 3).contiguous()
    x = x.view(N, small, small, int(D / ratio**2)).permute(0, 2, 1, 3).contiguous()
    return x.view(N, small * small, -1)


def vision_rope_freqs(v: VisionConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """2D RoPE for the patch grid plus the class token (which gets no rotation): [L+1, R] complex.

    Half of each head's pairs rotate with the patch's x coordinate, half with its y coordinate.
    """
    side = v.image_size // v.patch_size
    idx = torch.arange(side * side, dtype=torch.int32, device=device).reshape(-1, 1)
    idx = torch.cat([idx, idx[:1]], dim=0)
    idx[-1, -1] = -2  # the class token
    fx, fy = idx % side, idx // side
    freq_dim = v.hidden_size // v.num_attention_heads // 2
    exponents = torch.arange(0, freq_dim, 2, device=device)[: freq_dim // 2].float() / freq_dim
    base = 1.0 / (v.rope_theta ** exponents)
    ax = ((fx + 1)[..., None] * base[None, None, :]).repeat_interleave(2, dim=-1)
    ay = ((fy + 1)[..., None] * base[None, None, :]).repeat_interleave(2, dim=-1)
    angles = torch.cat([ax, ay], dim=-1).float()[..., ::2]
    angles = angles.masked_fill(idx.reshape(-1, 1, 1) < 0, 0)
    return torch.polar(torch.ones_like(angles), angles).squeeze(1)


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionConfig, text_dim: int):
        super().__init__()
        self.config = v
        n_patches = (v.image_size // v.patch_size) ** 2
        self.patch_embed = nn.Linear(v.num_channels * v.patch_size**2, v.hidden_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(v.hidden_size))
        self.positional_embedding = nn.Parameter(torch.empty(n_patches + 1, v.hidden_size))
        self.layernorm_pre = nn.LayerNorm(v.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(v) for _ in range(v.num_hidden_layers))
        self.layernorm_post = nn.LayerNorm(v.hidden_size)
        # Adapter after pixel shuffle; HF sizes fc1's input by `intermediate_size` (the config checks that
        # it equals the shuffled width).
        self.adapter_fc1 = nn.Linear(v.intermediate_size, v.projector_input_dim, bias=False)
        self.adapter_fc2 = nn.Linear(v.projector_output_dim, v.projector_output_dim, bias=False)
        # transformers' projector never has a bias, whatever `multi_modal_projector_bias` says, and the
        # published checkpoints carry none.
        self.projector = nn.Linear(v.vision_output_dim, text_dim, bias=False)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        init_linear(self.patch_embed, std, generator)
        normal_(self.class_embedding, std, generator)
        normal_(self.positional_embedding, std, generator)
        init_layernorm(self.layernorm_pre)
        for layer in self.layers:
            layer.init_weights(std, generator)
        init_layernorm(self.layernorm_post)
        for w in (self.adapter_fc1, self.adapter_fc2, self.projector):
            init_linear(w, std, generator)

    def forward(self, pixels_NCSS: torch.Tensor) -> torch.Tensor:
        """Tiles [N, C, S, S] -> text-space embeddings [N, P, E]."""
        v = self.config
        if pixels_NCSS.ndim != 4 or tuple(pixels_NCSS.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must have shape [N, {v.num_channels}, {v.image_size}, {v.image_size}], "
                             f"got {tuple(pixels_NCSS.shape)}")
        pixels_NCSS = pixels_NCSS.to(self.patch_embed.weight.dtype)
        # Each patch flattened channel-major (C, row, col), the order the checkpoint's linear expects.
        patches = F.unfold(pixels_NCSS, kernel_size=v.patch_size, stride=v.patch_size).transpose(1, 2)
        x_NLD = self.patch_embed(patches)
        cls = self.class_embedding.expand(x_NLD.shape[0], 1, -1)
        x_NLD = torch.cat([x_NLD, cls], dim=1) + self.positional_embedding
        x_NLD = self.layernorm_pre(x_NLD)
        # Rebuilt per call (a few kernels, nothing next to the tower) rather than held as a buffer: a
        # complex buffer would lose its imaginary part to `model.to(torch.bfloat16)`.
        freqs_LR = vision_rope_freqs(v, pixels_NCSS.device)
        for layer in self.layers:
            x_NLD = layer(x_NLD, freqs_LR)
        x_NLD = self.layernorm_post(x_NLD)[:, :-1]  # drop the class token
        shuffled_NPW = pixel_shuffle(x_NLD, v.pixel_shuffle_ratio)
        adapted_NPW = F.gelu(self.adapter_fc2(F.gelu(self.adapter_fc1(shuffled_NPW))))
        return self.projector(adapted_NPW)
