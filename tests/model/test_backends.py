"""Attention kernels against explicit-mask references: packed documents without a T x T mask, the
prefix + block merge, and the masked decode path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4
from conftest import LargestTensor, small_text
from llama4.model import backends


def _doc_mask(pos_BT: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The [B, 1, T, T] mask packed training used to build: same document, same chunk, causal."""
    group_BT = torch.cumsum(pos_BT == 0, dim=1)
    if chunk is not None:
        group_BT = group_BT * (int(pos_BT.max()) // chunk + 1) + pos_BT // chunk
    T = pos_BT.shape[1]
    same = group_BT[:, :, None] == group_BT[:, None, :]
    return (same & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)


def _packed_positions(lengths: list[int], first: int = 0) -> torch.Tensor:
    """Positions of documents laid end to end; the first piece may continue a document at `first`."""
    parts = [torch.arange(first, first + lengths[0])] + [torch.arange(n) for n in lengths[1:]]
    return torch.cat(parts)


@pytest.mark.parametrize("kernel", ["documents_causal", pytest.param("documents_flex", marks=pytest.mark.slow)])
@pytest.mark.parametrize("chunk", [None, 8])
def test_documents_equal_the_document_mask(chunk, kernel):
    """Per-document SDPA (the CPU choice) and FlexAttention with a block mask (the CUDA choice,
    checked here on the CPU, compiled: slow) against the mask packed training used to build."""
    g = torch.Generator().manual_seed(0)
    pos = torch.stack([_packed_positions([5, 17, 1, 9, 16]), _packed_positions([30, 18], first=13)])
    q = torch.randn(2, 4, 48, 8, generator=g)
    k, v = torch.randn(2, 2, 48, 8, generator=g), torch.randn(2, 2, 48, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=_doc_mask(pos, chunk))
    torch.testing.assert_close(getattr(backends, kernel)(q, k, v, pos, chunk), want, rtol=1e-5, atol=1e-5)


def test_packed_forward_builds_no_txt_tensor():
    T = 1024
    cfg = small_text(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     intermediate_size=32, intermediate_size_mlp=32)
    model = llama4.Llama4(cfg).init_weights(seed=0)
    ids = torch.randint(0, 64, (1, T))
    doc_pos = _packed_positions([300, 200, 124, 400])[None]
    with torch.no_grad(), LargestTensor() as spy:
        model(ids, doc_pos=doc_pos)
    assert spy.largest < T * T // 4  # the largest is a document's own scores at most (400 x 400 x heads)


def test_prefix_merge_equals_masked_attention():
    g = torch.Generator().manual_seed(1)
    P, T = 23, 9
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, P + T, 8, generator=g), torch.randn(2, 2, P + T, 8, generator=g)
    got = backends.attend_after_prefix(q, k[:, :, :P], v[:, :, :P], k[:, :, P:], v[:, :, P:])
    mask = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 4])
def test_masked_decode_sees_its_chunk_by_position(chunk):
    g = torch.Generator().manual_seed(2)
    S = 8
    q = torch.randn(3, 2, 1, 8, generator=g)
    k, v = torch.randn(3, 2, S, 8, generator=g), torch.randn(3, 2, S, 8, generator=g)
    kpos = torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1], [8, 9, 2, 3, 4, 5, 6, 7], [-1] * 7 + [0]])
    pos = torch.tensor([5, 9, 0])
    got = backends.masked_decode(q, k, v, kpos, pos, chunk)
    for b in range(3):
        lo = int(pos[b]) - int(pos[b]) % chunk if chunk else 0
        keep = (kpos[b] >= lo) & (kpos[b] <= pos[b])
        want = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep])
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)

