"""The Llama 4 decoder: embeddings -> blocks (attention + MoE/dense FFN) -> norm -> logits.

Single device, no I/O: checkpoints, tokenizers and parallelism wrap it from outside. Images enter
as embeddings written into the `<|patch|>` positions (early fusion) before the first block.

Shape legend: B batch, T tokens, D model dim, V vocab, N image tiles, P patch tokens per tile.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Llama4Config, TextConfig
from .attention import Attention, document_mask
from ..kv.contiguous import LayerCache
from .init import normal_
from .layers import RMSNorm, SwiGLU, rope_freqs, rope_inv_freq
from .moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe(layer) else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        self.attention_norm.init_weights()
        self.attention.init_weights(std, generator)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std, generator)

    def forward(self, x_BTD, pos_T, freqs_TF, cache: LayerCache | None = None, mask_B1TT=None, token_mask_BT=None):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), pos_T, freqs_TF, cache, mask_B1TT)
        ffn_in_BTD = self.ffn_norm(h_BTD)
        if isinstance(self.feed_forward, MoE):
            return h_BTD + self.feed_forward(ffn_in_BTD, token_mask_BT)
        return h_BTD + self.feed_forward(ffn_in_BTD)


class Llama4(nn.Module):
    """Text decoder, plus the vision encoder and projector when the config has a vision part."""

    def __init__(self, cfg: Llama4Config):
        super().__init__()
        self.config = cfg
        t = cfg.text
        # An explicit weight skips nn.Embedding's own normal_() init, which imports torch._dynamo
        # (seconds) even on the meta device; init_weights() or a checkpoint fills it.
        self.tok_embeddings = nn.Embedding(t.vocab_size, t.hidden_size, _weight=torch.empty(t.vocab_size, t.hidden_size))
        self.layers = nn.ModuleList(Block(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.output = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.vision = None
        if cfg.vision is not None:
            from .vision import VisionEncoder

            self.vision = VisionEncoder(cfg.vision, t.hidden_size)
        self.register_buffer("inv_freq", rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling), persistent=False)

    # Weights --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, seed: int | None = None) -> "Llama4":
        """Random init: normal(0, std) matrices, unit norms, zero biases and routing state. Kept out of
        __init__ so the model can be built on the meta device and filled from a checkpoint instead.

        Each module initialises its own parameters (`init_weights` on it); meta tensors are skipped
        and a sharded (DTensor) parameter draws only its local shard's numbers (`model/init.py`).
        """
        std = self.config.text.initializer_range if std is None else std
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        normal_(self.tok_embeddings.weight, std, gen)
        for layer in self.layers:
            layer.init_weights(std, gen)
        self.norm.init_weights()
        if self.output.weight is not self.tok_embeddings.weight:
            normal_(self.output.weight, std, gen)
        if self.vision is not None:
            self.vision.init_weights(std, gen)
        self.reset_buffers()
        return self

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers and zero the routing state (after building on the meta
        device, or before a checkpoint that may not carry the routing bias is applied)."""
        t = self.config.text
        self.inv_freq = rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling).to(self.output.weight.device)
        for m in self.modules():
            if isinstance(m, MoE):
                m.reset_buffers()

    # Forward --------------------------------------------------------------------------------------
    def embed(self, input_ids_BT: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written into the `<|patch|>` slots (early fusion).

        `pixel_values` [N, C, S, S] holds every tile of every image of every row, in prompt order: the
        slots are filled row by row, left to right, P = `tokens_per_tile` per tile. Without images this
        is a plain lookup; the vision tower runs only when pixels are given.
        """
        _check_ids(input_ids_BT, self.config.text.vocab_size)
        x_BTD = self.tok_embeddings(input_ids_BT)
        if pixel_values is None:
            return x_BTD
        if self.vision is None:
            raise ValueError("pixel_values given but this model has no vision encoder (text-only config)")
        slots_BT = input_ids_BT == self.config.image_token_index
        # Check the count before running the tower: a mismatch is a prompt/tiling bug, not worth the compute.
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be tiles [N, C, S, S], got shape {tuple(pixel_values.shape)}")
        per_tile = self.config.vision.tokens_per_tile
        n_slots, n_tiles = int(slots_BT.sum()), pixel_values.shape[0]
        if n_slots != n_tiles * per_tile:
            raise ValueError(f"image features do not match <|patch|> slots: input_ids hold {n_slots} slots "
                             f"(token id {self.config.image_token_index}; per row {slots_BT.sum(1).tolist()}) "
                             f"but pixel_values has {n_tiles} tiles x {per_tile} tokens = {n_tiles * per_tile}")
        feats_NPD = self.vision(pixel_values)  # masked_scatter reads it in order, tile by tile
        return x_BTD.masked_scatter(slots_BT.unsqueeze(-1), feats_NPD.to(x_BTD.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
                embeds: torch.Tensor | None = None, start_pos: int | torch.Tensor = 0,
                cache: list[LayerCache] | None = None, return_hidden: bool = False,
                doc_pos: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens at absolute positions [start_pos, start_pos + T).

        `cache` (from `make_cache`) is read and extended in place; without it the call sees only
        these T tokens. `return_hidden` skips the vocabulary projection (for chunked losses).
        `doc_pos` [B, T] packs several documents per row (training, no cache): each token's position
        inside its own document, 0 where one starts; every document then runs as if it were alone.
        `token_mask` [B, T] (True for real tokens) keeps padding out of the MoE's expert load counts.
        """
        x_BTD = self.embed(input_ids, pixel_values) if embeds is None else embeds
        T = x_BTD.shape[1]
        # One start for all rows, or one per row ([B] tensor: a ragged batch decoding side by side).
        pos_T = torch.as_tensor(start_pos, device=x_BTD.device).unsqueeze(-1) + torch.arange(T, device=x_BTD.device)
        masks = {}
        if doc_pos is not None:
            pos_T = doc_pos.to(x_BTD.device)
            masks = {c: document_mask(pos_T, c) for c in {layer.attention.chunk for layer in self.layers}}
        freqs_TF = rope_freqs(pos_T, self.inv_freq)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            x_BTD = layer(x_BTD, pos_T, freqs_TF, layer_cache, masks.get(layer.attention.chunk), token_mask)
        h_BTD = self.norm(x_BTD)
        return h_BTD if return_hidden else self.output(h_BTD)


def _check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
