"""Attention kernels, chosen in one place: fused SDPA, SDPA with log-sum-exps, and the reference paths.

No T x T mask is ever built:
  * chunked layers fold whole chunks into the batch dim (chunk boundaries at absolute multiples of
    the chunk size) and run causal SDPA on each;
  * a block that follows cached keys attends to the cache unmasked and to itself causally, and the
    two results are merged by their log-sum-exps;
  * a decode token masks the slots of its row by the absolute position each holds ([B, 1, 1, S]);
  * packed training rows run each document on its own (`documents_causal`), grouped by shape, or,
    where FlexAttention serves (CUDA; `PACKED_BACKEND`), as one flex call with a block mask that
    skips every block outside a document (`documents_flex`; tested on the CPU, fast there only
    when compiled, so the CPU default stays per-document SDPA).

`sdpa_lse` picks a fused kernel that returns the log-sum-exp: the CPU flash kernel, CUDA's
efficient-attention kernel (unverified here: no GPU was available), or the blocked portable path
(`sdpa_lse_blocked`), which is also the reference the fused ones are tested against.

Shape legend: B batch, H query heads, K kv heads, T queries, S keys, Dh head dim, C chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q_BHTD, k_BKSD, v_BKSD, causal: bool, mask=None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q_BHTD.shape[1] != k_BKSD.shape[1])


def chunked_causal(q_BHTD, k_BKTD, v_BKTD, chunk: int | None, offset: int = 0) -> torch.Tensor:
    """Causal attention of T tokens at absolute positions [offset, offset + T), each seeing only its
    own chunk of `chunk` positions (None: one global causal attention). Whole chunks are folded into
    the batch dim; a partial chunk at either end is a causal call of its own."""
    B, H, T, Dh = q_BHTD.shape
    if chunk is None or (offset % chunk) + T <= chunk:
        return sdpa(q_BHTD, k_BKTD, v_BKTD, causal=True)
    head = (-offset) % chunk  # tokens before the first chunk boundary
    n_full = (T - head) // chunk
    outs = []
    if head:
        outs.append(sdpa(q_BHTD[:, :, :head], k_BKTD[:, :, :head], v_BKTD[:, :, :head], causal=True))
    if n_full:
        a, b = head, head + n_full * chunk

        def fold(x):  # [B, h, n*C, Dh] -> [B*n, h, C, Dh]
            h = x.shape[1]
            return x[:, :, a:b].reshape(B, h, n_full, chunk, Dh).transpose(1, 2).reshape(-1, h, chunk, Dh)

        o = sdpa(fold(q_BHTD), fold(k_BKTD), fold(v_BKTD), causal=True)
        outs.append(o.reshape(B, n_full, H, chunk, Dh).transpose(1, 2).reshape(B, H, n_full * chunk, Dh))
    s = head + n_full * chunk
    if s < T:
        outs.append(sdpa(q_BHTD[:, :, s:], k_BKTD[:, :, s:], v_BKTD[:, :, s:], causal=True))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_after_prefix(q_BHTD, kp_BKPD, vp_BKPD, k_BKTD, v_BKTD) -> torch.Tensor:
    """Queries are the T new tokens: each sees the whole prefix (P cached keys) and the block causally.
    Two fused attentions merged by their log-sum-exps, instead of a [T, P + T] mask."""
    if kp_BKPD.shape[2] == 0:
        return sdpa(q_BHTD, k_BKTD, v_BKTD, causal=True)
    o1, lse1 = sdpa_lse(q_BHTD, kp_BKPD, vp_BKPD, causal=False)
    o2, lse2 = sdpa_lse(q_BHTD, k_BKTD, v_BKTD, causal=True)
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - lse).unsqueeze(-1), torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(q_BHTD.dtype)


def masked_decode(q_BH1D, k_BKSD, v_BKSD, kpos_BS, pos_B, chunk: int | None) -> torch.Tensor:
    """One query per row at absolute position pos_B[b]: it sees the slots whose position lies in
    [start of its chunk (0 if global), pos]. Sync-free: the mask comes from positions alone."""
    hi_B1 = pos_B[:, None]
    lo_B1 = hi_B1 - hi_B1 % chunk if chunk is not None else torch.zeros_like(hi_B1)
    visible_BS = (kpos_BS >= lo_B1) & (kpos_BS <= hi_B1)
    return sdpa(q_BH1D, k_BKSD, v_BKSD, causal=False, mask=visible_BS[:, None, None, :])


def documents_causal(q_BHTD, k_BKTD, v_BKTD, doc_pos_BT: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Rows packed with several documents (training): each document attends only to itself, chunked
    at its own positions. `doc_pos_BT` is each token's position in its document (0 where one starts;
    a row may begin inside a document). Pieces of equal length and chunk phase run as one batch."""
    B, T = doc_pos_BT.shape
    pos = doc_pos_BT.cpu()
    pieces: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b in range(B):
        starts = [0] + [t for t in torch.nonzero(pos[b] == 0).flatten().tolist() if t > 0] + [T]
        for a, e in zip(starts, starts[1:]):
            offset = int(pos[b, a])
            pieces.setdefault((e - a, offset % chunk if chunk else 0), []).append((b, a))
    out_BHTD = torch.empty_like(q_BHTD)
    for (n, phase), where in pieces.items():
        rows = torch.tensor([b for b, _ in where], device=q_BHTD.device)
        cols = torch.stack([torch.arange(a, a + n) for _, a in where]).to(q_BHTD.device)  # [G, n]

        def take(x):  # [B, h, T, Dh] -> [G, h, n, Dh]
            return x[rows[:, None], :, cols].transpose(1, 2)

        o_GHnD = chunked_causal(take(q_BHTD), take(k_BKTD), take(v_BKTD), chunk, phase)
        out_BHTD[rows[:, None], :, cols] = o_GHnD.transpose(1, 2)
    return out_BHTD


# "auto": FlexAttention on CUDA, per-document SDPA elsewhere; or force "flex" / "sdpa".
PACKED_BACKEND = "auto"


def packed_causal(q_BHTD, k_BKTD, v_BKTD, doc_pos_BT: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Packed-document attention through the backend `PACKED_BACKEND` picks."""
    use_flex = PACKED_BACKEND == "flex" or (PACKED_BACKEND == "auto" and q_BHTD.is_cuda)
    return (documents_flex if use_flex else documents_causal)(q_BHTD, k_BKTD, v_BKTD, doc_pos_BT, chunk)


_FLEX = None


def documents_flex(q_BHTD, k_BKTD, v_BKTD, doc_pos_BT: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """`documents_causal` as one FlexAttention call: same document, same chunk (at document
    positions), causal. The block mask is built from the positions; no [T, T] tensor exists."""
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    doc_BT = torch.cumsum(doc_pos_BT == 0, dim=1)  # a row starting inside a document: its id 0
    pos_BT = doc_pos_BT

    def mask_mod(b, h, qi, ki):
        same = (doc_BT[b, qi] == doc_BT[b, ki]) & (ki <= qi)
        if chunk is not None:
            same = same & (pos_BT[b, qi] // chunk == pos_BT[b, ki] // chunk)
        return same

    B, H, T, _ = q_BHTD.shape
    block = create_block_mask(mask_mod, B, None, T, T, device=q_BHTD.device)
    return _FLEX(q_BHTD, k_BKTD, v_BKTD, block_mask=block, enable_gqa=H != k_BKTD.shape[1])


def sdpa_lse(q_BHTD, k_BKSD, v_BKSD, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its log-sum-exp per query [B, H, T] (fp32), from a fused kernel where the
    device has one. `causal` means the T queries are the last T of the S keys with S == T."""
    rep = q_BHTD.shape[1] // k_BKSD.shape[1]
    if rep > 1:
        k_BKSD, v_BKSD = k_BKSD.repeat_interleave(rep, dim=1), v_BKSD.repeat_interleave(rep, dim=1)
    fused_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if q_BHTD.device.type == "cpu" and q_BHTD.dtype in fused_dtypes:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BHTD, k_BKSD, v_BKSD, 0.0, causal)
        return out, lse.float()
    if q_BHTD.is_cuda and q_BHTD.dtype in fused_dtypes:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q_BHTD, k_BKSD, v_BKSD, None, True, 0.0, causal)[:2]
        return out, lse[:, :, :q_BHTD.shape[2]].float()
    return sdpa_lse_blocked(q_BHTD, k_BKSD, v_BKSD, causal)


def sdpa_lse_blocked(q_BHTD, k_BHSD, v_BHSD, causal: bool, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable `sdpa_lse`: keys in blocks of `block`, merged online, so the scores held at once are
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
