"""Llama 4 attention: RoPE + chunked local attention, or NoPE + global attention with temperature tuning.

The module computes projections, RoPE, QK-norm and the temperature scale, then hands q, k, v to the
kernels in `backends.py`. Without a KV store it attends within the given tokens (at absolute
positions, or per packed document). With a store and a `Step` (a mixed batch: prefill slices and
single decode tokens of several sequences), each group of tokens attends to what the store holds
for its sequence plus itself; decode tokens go through a sync-free masked path that
`torch.compile(fullgraph=True)` can capture.

Shape legend: B batch, T tokens, N tokens of a step (flattened), G sequences of a prefill group,
L tokens each, D model dim, H query heads, K kv heads, Dh head dim, C chunk size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..kv.base import KVStore, PrefillGroup, Step
from . import backends
from .init import init_linear
from .layers import apply_rope, l2_norm


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
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

    def forward(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor, rope_BT: torch.Tensor | None,
                kv: KVStore | None = None, step: Step | None = None, doc_pos_BT: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
        """`pos_BT` holds absolute positions ([T] or [B, T]); `rope_BT` their RoPE rotations. With `kv`
        and `step`, x is the step's N tokens as [1, N, D]. `offset` is the absolute position of token 0
        when attending without a store; `doc_pos_BT` packs documents (then positions are per document)."""
        B, T, _ = x_BTD.shape
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTD, pos_BT, rope_BT)
        if kv is not None:
            out_NHD = self._attend_store(q_BTHD[0], k_BTKD[0], v_BTKD[0], kv, step)
            return self.wo(out_NHD.reshape(1, T, -1))
        q, k, v = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        if doc_pos_BT is not None:
            out_BHTD = backends.packed_causal(q, k, v, doc_pos_BT, self.chunk)
        else:
            out_BHTD = backends.chunked_causal(q, k, v, self.chunk, offset)
        return self.wo(out_BHTD.transpose(1, 2).reshape(B, T, -1))

    def project(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor, rope_BT: torch.Tensor | None):
        """q, k, v [B, T, heads, Dh] of tokens at absolute positions pos_BT: RoPE and QK-norm on RoPE
        layers, the temperature scale on the queries of NoPE layers (what every attention path shares)."""
        B, T, _ = x_BTD.shape
        q_BTHD = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTKD = self.wk(x_BTD).view(B, T, self.n_kv, self.head_dim)
        v_BTKD = self.wv(x_BTD).view(B, T, self.n_kv, self.head_dim)
        if self.use_rope:
            q_BTHD, k_BTKD = apply_rope(q_BTHD, rope_BT), apply_rope(k_BTKD, rope_BT)
            if self.qk_norm_eps is not None:  # after RoPE, weightless (Scout)
                q_BTHD, k_BTKD = l2_norm(q_BTHD, self.qk_norm_eps), l2_norm(k_BTKD, self.qk_norm_eps)
        elif self.temperature is not None:
            # Sharper attention far into the context (arXiv 2501.19399): scale grows with log(position).
            floor_scale, attn_scale = self.temperature
            scale_BT = torch.log1p(torch.floor((pos_BT.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_BTHD = (q_BTHD * scale_BT[..., None, None]).to(q_BTHD.dtype)
        return q_BTHD, k_BTKD, v_BTKD

    # With a KV store ---------------------------------------------------------------------------------
    def _attend_store(self, q_NHD, k_NKD, v_NKD, kv: KVStore, step: Step) -> torch.Tensor:
        if step.is_decode:  # every segment is one token: no Python lists are read (compilable)
            return self._decode(q_NHD, k_NKD, v_NKD, kv, step.decode_rows_B, step.decode_pos_B, step.decode_all_rows)
        out_NHD = torch.empty_like(q_NHD)
        for group in step.prefill:
            out_NHD[group.tokens_GL] = self._prefill_group(q_NHD, k_NKD, v_NKD, kv, group)
        if step.decode_rows_B is not None:
            idx_B = step.decode_tokens_B
            out_NHD[idx_B] = self._decode(q_NHD[idx_B], k_NKD[idx_B], v_NKD[idx_B], kv, step.decode_rows_B,
                                          step.decode_pos_B, step.decode_all_rows)
        return out_NHD

    def _decode(self, q_BHD, k_BKD, v_BKD, kv: KVStore, rows_B, pos_B, all_rows: bool) -> torch.Tensor:
        kv.write_tokens(self.layer, rows_B, pos_B, k_BKD, v_BKD)
        k_BKSD, v_BKSD, kpos_BS = kv.gather(self.layer, rows_B, all_rows)
        out_BH1D = backends.masked_decode(q_BHD[:, :, None], k_BKSD, v_BKSD, kpos_BS, pos_B, self.chunk)
        return out_BH1D[:, :, 0]

    def _prefill_group(self, q_NHD, k_NKD, v_NKD, kv: KVStore, g: PrefillGroup) -> torch.Tensor:
        """G sequences each adding L tokens at positions [start, start + L): split at chunk boundaries,
        each piece sees the cached keys of its own chunk (only the first piece has any) and itself."""
        q_GHLD, k_GKLD, v_GKLD = (x[g.tokens_GL].transpose(1, 2) for x in (q_NHD, k_NKD, v_NKD))
        outs, a = [], g.start
        end = g.start + g.length
        while a < end:
            lo = a - a % self.chunk if self.chunk else 0
            b = min(end, lo + self.chunk) if self.chunk else end
            s, e = a - g.start, b - g.start
            kp, vp = kv.prefix(self.layer, g.rows_G, lo, a, g.all_rows) if lo < a else (k_GKLD[:, :, :0],) * 2
            outs.append(backends.attend_after_prefix(q_GHLD[:, :, s:e], kp, vp, k_GKLD[:, :, s:e], v_GKLD[:, :, s:e]))
            a = b
        # Written after attending: in a chunked ring, the block's own later keys may reuse the slots
        # of keys its earlier pieces still needed.
        kv.write_block(self.layer, g.rows_G, g.start, k_GKLD, v_GKLD, g.all_rows)
        out_GHLD = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out_GHLD.transpose(1, 2)
