"""The Llama 4 decoder: embeddings -> blocks (attention + MoE/dense FFN) -> norm -> logits.

Single device, no I/O: checkpoints, tokenizers and parallelism wrap it from outside. Images enter
as embeddings written into the `<|patch|>` positions (early fusion) before the first block.

Shape legend: B batch, T tokens, D model dim, V vocab, N image tiles, P patch tokens per tile,
M image feature tokens (N * P).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import Llama4Config, TextConfig
from ..kv.base import KVStore, Step
from .attention import Attention
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

    def forward(self, x_BTD, pos_BT, rope_BT, kv: KVStore | None = None, step: Step | None = None,
                doc_pos_BT=None, offset: int = 0, token_mask_BT=None):
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), pos_BT, rope_BT, kv, step, doc_pos_BT, offset)
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
    def embed(self, input_ids_BT: torch.Tensor, pixel_values: torch.Tensor | None = None,
              validate: bool = True) -> torch.Tensor:
        """Token embeddings with image features written into the `<|patch|>` slots (early fusion).

        `pixel_values` [N, C, S, S] holds every tile of every image of every row, in prompt order: the
        slots are filled row by row, left to right, P = `tokens_per_tile` per tile. Without images this
        is a plain lookup; the vision tower runs only when pixels are given.
        """
        if validate:  # reads the ids on the host: the engine does it once, at its edge
            _check_ids(input_ids_BT, self.config.text.vocab_size)
        x_BTD = self.tok_embeddings(input_ids_BT)
        if pixel_values is None:
            return x_BTD
        if self.vision is None:
            raise ValueError("pixel_values given but this model has no vision encoder (text-only config)")
        slots_BT = input_ids_BT == self.config.image_token_index
        # Check the count before running the tower: a mismatch is a prompt/tiling bug, not worth the compute.
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = f"shape {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor) else \
                type(pixel_values).__name__
            raise ValueError(f"pixel_values must be tiles [N, C, S, S], got {got}")
        # Raw uint8 pixels are refused, not converted: the tower expects tiles normalised to [-1, 1]
        # (preprocess_image), and a silent conversion would hide a skipped preprocessing step.
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values have dtype {pixel_values.dtype}; expected floating-point tiles normalised "
                             f"to [-1, 1], as llama4.preprocess_image returns (raw uint8 pixels are not accepted)")
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contain NaN or infinite values; expected tiles normalised to [-1, 1]")
        per_tile = self.config.vision.tokens_per_tile
        n_slots, n_tiles = int(slots_BT.sum()), pixel_values.shape[0]
        if n_slots != n_tiles * per_tile:
            raise ValueError(f"image features do not match <|patch|> slots: input_ids hold {n_slots} slots "
                             f"(token id {self.config.image_token_index}; per row {slots_BT.sum(1).tolist()}) "
                             f"but pixel_values has {n_tiles} tiles x {per_tile} tokens = {n_tiles * per_tile}")
        feats_MD = self.vision(pixel_values).reshape(-1, x_BTD.shape[-1])
        return x_BTD.masked_scatter(slots_BT.unsqueeze(-1), feats_MD.to(x_BTD.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
                embeds: torch.Tensor | None = None, start_pos: int | Sequence[int] | torch.Tensor | None = None,
                cache: KVStore | None = None, step: Step | None = None, return_hidden: bool = False,
                doc_pos: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or the final hidden states with `return_hidden`, for chunked losses).

        * No cache: the T tokens attend among themselves, at absolute positions [start_pos,
          start_pos + T) (chunk boundaries and temperature scales follow those positions).
        * `cache` (a KV store, e.g. `make_cache(cfg, B, max_len)`) without `step`: row b continues
          sequence b of the store by T tokens; `start_pos`, if given, must be where each stands.
        * `cache` and `step` (from `cache.plan([(seq, n), ...])`): a mixed batch, x is the step's N
          tokens flattened as [1, N] (prefill slices and decode tokens of several sequences); the ids
          are not re-validated here (the engine checks prompts once at its edge).
        * `doc_pos` [B, T] packs several documents per row (training, no cache): each token's position
          inside its own document, 0 where one starts; every document then runs as if it were alone.
        * `token_mask` [B, T] (True for real tokens) keeps padding out of the MoE's expert load counts.
        """
        if step is None:
            x_BTD = self.embed(input_ids, pixel_values) if embeds is None else embeds
        else:
            x_BTD = self.embed(input_ids, pixel_values, validate=False) if embeds is None else embeds
        B, T = x_BTD.shape[:2]
        dev = x_BTD.device
        offset = 0
        if doc_pos is not None:
            if cache is not None:
                raise ValueError("doc_pos (packed documents) cannot be combined with a KV cache: packing is for "
                                 "training forwards, which see every token at once")
            pos_BT = doc_pos.to(dev)
        elif cache is not None:
            if step is None:
                step = _rows_step(cache, B, T, start_pos)
            elif B != 1 or T != step.n_tokens:
                raise ValueError(f"a step of {step.n_tokens} tokens needs its ids flattened as [1, {step.n_tokens}], "
                                 f"got {tuple(x_BTD.shape[:2])}")
            x_BTD = x_BTD.reshape(1, B * T, -1)
            pos_BT = step.pos_N
        else:
            if step is not None:
                raise ValueError("a step describes tokens of a KV store: pass the store as cache=")
            start_pos = 0 if start_pos is None else start_pos
            if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
                raise ValueError(f"start_pos={start_pos!r} without a cache must be one int >= 0 (the absolute "
                                 f"position of the first token); per-row positions need a KV cache")
            offset = start_pos
            pos_BT = torch.arange(start_pos, start_pos + T, device=dev)
        rope_BT = rope_freqs(pos_BT, self.inv_freq)
        for layer in self.layers:
            x_BTD = layer(x_BTD, pos_BT, rope_BT, cache, step, doc_pos, offset, token_mask)
        h_BTD = self.norm(x_BTD).reshape(B, T, -1)
        return h_BTD if return_hidden else self.output(h_BTD)


def _rows_step(cache: KVStore, B: int, T: int, start_pos) -> Step:
    """The step where row b continues sequence b of the store by T tokens."""
    have = [cache.length(b) for b in range(B)]
    if start_pos is not None:
        want = torch.as_tensor(start_pos).reshape(-1).tolist()
        want = want * B if len(want) == 1 else want
        if want != have:
            raise ValueError(f"cache expects positions {have} next, got start_pos={want} (tokens must be fed "
                             f"in order)")
    return cache.plan([(b, T) for b in range(B)])


def _check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with B >= 1 and T >= 1, got {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
