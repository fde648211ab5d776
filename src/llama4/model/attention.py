"""Llama 4 attention: RoPE + chunked local attention, or NoPE + global attention with temperature tuning.

No T x T mask is ever built. Without a cache, a chunked layer reshapes full chunks into the batch
dim and runs causal SDPA on each; a global layer runs fused causal SDPA. With a cache (generation),
queries see [cached prefix | new block]: the prefix unmasked, the block causal, the two merged with
their log-sum-exps, so memory stays linear in the context.

Shape legend: B batch, T new tokens, S cached positions, D model dim, H query heads, K kv heads,
Dh head dim, C chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..kv.contiguous import LayerCache
from .init import init_linear
from .layers import apply_rope, l2_norm


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.use_rope = cfg.uses_rope(layer)
        self.chunk = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.qk_norm_eps = cfg.rms_norm_eps if (cfg.use_qk_norm and self.use_rope) else None
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if (cfg.attn_temperature_tuning and not self.use_rope) \
            else None

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        for w in (self.wq, self.wk, self.wv, self.wo):
            init_linear(w, std, generator)

    def forward(self, x_BTD: torch.Tensor, pos_T: torch.Tensor, freqs_TF: torch.Tensor | None,
                cache: LayerCache | None = None, mask_B1TT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHD = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTKD = self.wk(x_BTD).view(B, T, self.n_kv, self.head_dim)
        v_BTKD = self.wv(x_BTD).view(B, T, self.n_kv, self.head_dim)
        if self.use_rope:
            q_BTHD, k_BTKD = apply_rope(q_BTHD, freqs_TF), apply_rope(k_BTKD, freqs_TF)
            if self.qk_norm_eps is not None:  # after RoPE, weightless (Scout)
                q_BTHD, k_BTKD = l2_norm(q_BTHD, self.qk_norm_eps), l2_norm(k_BTKD, self.qk_norm_eps)
        elif self.temperature is not None:
            # Sharper attention far into the context (arXiv 2501.19399): scale grows with log(position).
            floor_scale, attn_scale = self.temperature
            scale_T = torch.log1p(torch.floor((pos_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_BTHD = (q_BTHD * scale_T[..., None, None]).to(q_BTHD.dtype)  # pos_T may be [B, T] (per row)
        q, k, v = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        if mask_B1TT is not None:  # packed documents (from `document_mask`)
            out_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT,
                                                      enable_gqa=self.n_heads != self.n_kv)
        elif cache is None:
            out_BHTD = chunked_causal(q, k, v, self.chunk) if self.chunk else _sdpa(q, k, v, causal=True)
        else:
            out_BHTD = self._attend_cached(q, k, v, pos_T, cache)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, -1))

    def _attend_cached(self, q, k, v, pos_T: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Attend through the cache. `pos_T` is [T] (every row at the same positions) or [B, 1]
        (one token per row, each row at its own position)."""
        if pos_T.ndim == 2:
            if q.shape[2] != 1:
                raise ValueError(f"per-row positions need one token per row, got a block of {q.shape[2]} "
                                 f"(prefill rows of different lengths one row at a time)")
            return _attend_step(q, k, v, pos_T[:, 0].tolist(), cache)
        # Split the block at chunk boundaries; each segment sees its own chunk's cached prefix.
        T, start = q.shape[2], int(pos_T[0])
        outs, a = [], 0
        while a < T:
            p = start + a
            b = T if not self.chunk else min(T, a + self.chunk - p % self.chunk)
            prefix_len = cache.write(k[:, :, a:b], v[:, :, a:b], p)
            k_all, v_all = cache.view(prefix_len + b - a)
            outs.append(attend_after_prefix(q[:, :, a:b], k_all, v_all, prefix_len))
            a = b
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _attend_step(q_BH1D, k_BK1D, v_BK1D, pos_B: list[int], cache: LayerCache) -> torch.Tensor:
    """One new token per row at per-row positions: rows hold different numbers of valid keys, so a
    [B, 1, 1, S] key mask (linear in S) hides each row's unused slots."""
    lengths = cache.write_step(k_BK1D[:, :, 0], v_BK1D[:, :, 0], pos_B)
    S = max(lengths)
    k_BKSD, v_BKSD = cache.view(S)
    mask_B11S = None
    if min(lengths) < S:
        len_B = torch.tensor(lengths, device=q_BH1D.device)
        mask_B11S = (torch.arange(S, device=q_BH1D.device) < len_B[:, None]).view(-1, 1, 1, S)
    return F.scaled_dot_product_attention(q_BH1D, k_BKSD, v_BKSD, attn_mask=mask_B11S,
                                          enable_gqa=q_BH1D.shape[1] != k_BKSD.shape[1])


def document_mask(pos_BT: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """[B, 1, T, T] bool for rows packed with several documents (training): query t sees key s <= t of
    its own document and, in a chunked layer, of its own chunk. `pos_BT` is each token's position in
    its document, 0 where one starts. Packing is the one place a T x T mask is worth its memory."""
    group_BT = torch.cumsum(pos_BT == 0, dim=1)
    if chunk is not None:  # documents restart at 0, so (document, chunk) pairs are distinct numbers
        group_BT = group_BT * (int(pos_BT.max()) // chunk + 1) + pos_BT // chunk
    same_BTT = group_BT[:, :, None] == group_BT[:, None, :]
    T = pos_BT.shape[1]
    return (same_BTT & torch.ones(T, T, dtype=torch.bool, device=pos_BT.device).tril()).unsqueeze(1)


def _sdpa(q, k, v, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def chunked_causal(q_BHTD, k_BKTD, v_BKTD, chunk: int) -> torch.Tensor:
    """Causal attention within chunks of `chunk` positions starting at position 0 (no mask tensor).

    Full chunks are folded into the batch dim; a trailing partial chunk is a separate causal call.
    """
    B, H, T, Dh = q_BHTD.shape
    n_full = T // chunk
    if n_full <= 1 and T <= chunk:
        return _sdpa(q_BHTD, k_BKTD, v_BKTD, causal=True)
    outs = []
    if n_full:
        def fold(x):  # [B, h, n*C, Dh] -> [B*n, h, C, Dh]
            h = x.shape[1]
            return x[:, :, : n_full * chunk].reshape(B, h, n_full, chunk, Dh).transpose(1, 2).reshape(-1, h, chunk, Dh)
        o = _sdpa(fold(q_BHTD), fold(k_BKTD), fold(v_BKTD), causal=True)
        outs.append(o.reshape(B, n_full, H, chunk, Dh).transpose(1, 2).reshape(B, H, n_full * chunk, Dh))
    if T > n_full * chunk:
        s = n_full * chunk
        outs.append(_sdpa(q_BHTD[:, :, s:], k_BKTD[:, :, s:], v_BKTD[:, :, s:], causal=True))
    return torch.cat(outs, dim=2)


def attend_after_prefix(q_BHTD, k_BKSD, v_BKSD, prefix: int) -> torch.Tensor:
    """Queries are the last T of the S keys: every query sees the whole prefix, and the new block causally."""
    T, S = q_BHTD.shape[2], k_BKSD.shape[2]
    assert S == prefix + T, (S, prefix, T)
    if prefix == 0:
        return _sdpa(q_BHTD, k_BKSD, v_BKSD, causal=True)
    if T == 1:
        return _sdpa(q_BHTD, k_BKSD, v_BKSD, causal=False)
    # Merge two fused attentions by their log-sum-exps instead of building a [T, S] mask.
    o1, lse1 = _sdpa_lse(q_BHTD, k_BKSD[:, :, :prefix], v_BKSD[:, :, :prefix], causal=False)
    o2, lse2 = _sdpa_lse(q_BHTD, k_BKSD[:, :, prefix:], v_BKSD[:, :, prefix:], causal=True)
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - lse).unsqueeze(-1), torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(q_BHTD.dtype)


def _sdpa_lse(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its log-sum-exp per query [B, H, T] (fp32)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse.float()
    return sdpa_lse_blocked(q, k, v, causal)


def sdpa_lse_blocked(q_BHTD, k_BHSD, v_BHSD, causal: bool, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable `_sdpa_lse`: keys in blocks of `block`, merged online, so the scores held at once are
    [T, block] (never T x S). `causal` means the T queries are the S = T keys' own positions."""
    T = q_BHTD.shape[2]
    qf_BHTD = q_BHTD.float() * q_BHTD.shape[-1] ** -0.5
    out_BHTD = lse_BHT = None
    for a in range(0, k_BHSD.shape[2], block):
        s_BHTS = qf_BHTD @ k_BHSD[:, :, a:a + block].float().transpose(-1, -2)
        if causal:
            cols = torch.arange(a, a + s_BHTS.shape[-1], device=q_BHTD.device)
            s_BHTS = s_BHTS.masked_fill(cols > torch.arange(T, device=q_BHTD.device)[:, None], float("-inf"))
        v_blk = v_BHSD[:, :, a:a + block].float()
        # The first block holds key 0, visible to every query, so every running lse is finite after it.
        new_BHT = torch.logsumexp(s_BHTS, -1) if lse_BHT is None else \
            torch.logaddexp(lse_BHT, torch.logsumexp(s_BHTS, -1))
        blk_BHTD = torch.exp(s_BHTS - new_BHT.unsqueeze(-1)) @ v_blk
        out_BHTD = blk_BHTD if out_BHTD is None else out_BHTD * torch.exp(lse_BHT - new_BHT).unsqueeze(-1) + blk_BHTD
        lse_BHT = new_BHT
    return out_BHTD.to(q_BHTD.dtype), lse_BHT
