"""Chunked local / global attention against an explicit-mask reference, and no T x T tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.model.backends import chunked_causal
from llama4.model.layers import rope_inv_freq
from conftest import LargestTensor, small_text

C = 32  # small_text's attention_chunk_size


def masked_reference(q, k, v, chunk, offset=0):
    T = q.shape[2]
    i = torch.arange(T) + offset
    mask = (i[None, :] <= i[:, None]) & (i[None, :] // chunk == i[:, None] // chunk)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


@pytest.mark.parametrize("T", [1, 31, 32, 33, 64, 100, 129])
def test_chunked_equals_masked(T):
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    torch.testing.assert_close(chunked_causal(q, k, v, 32), masked_reference(q, k, v, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [1, 31, 32, 45, 100])
@pytest.mark.parametrize("T", [1, 19, 64, 100])
def test_chunks_sit_at_absolute_positions(T, offset):
    """A window that starts at `offset` folds chunks at absolute multiples of the chunk size."""
    q, k, v = torch.randn(1, 4, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    torch.testing.assert_close(chunked_causal(q, k, v, 32, offset), masked_reference(q, k, v, 32, offset),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [7, 45, 64])
def test_uncached_window_at_start_pos_folds_chunks_at_absolute_positions(p):
    """`model(ids, start_pos=p)` (lm-eval's rolling windows): in a model whose layers are all chunked,
    a token after the first absolute chunk boundary must not see the window's first token."""
    cfg = small_text(no_rope_layers=[1, 1, 1, 1])
    model = llama4.Llama4(cfg).init_weights(std=0.08, seed=1).eval()
    ids = torch.randint(1, 512, (1, 70), generator=torch.Generator().manual_seed(5))
    other = ids.clone()
    other[0, 0] = 0
    boundary = (p // C + 1) * C - p  # index of the first token in the next chunk
    with torch.no_grad():
        a, b = model(ids, start_pos=p), model(other, start_pos=p)
    assert (a[0, :boundary] - b[0, :boundary]).abs().max() > 1e-4  # same chunk: it sees the change
    torch.testing.assert_close(a[0, boundary:], b[0, boundary:], rtol=0, atol=1e-5)


def test_scout_rope_scaling_has_no_nan():
    inv = rope_inv_freq(128, 500000.0, {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    assert torch.isfinite(inv).all()
    plain = rope_inv_freq(128, 500000.0, None)
    assert torch.equal(inv[:8], plain[:8])  # high frequencies untouched
    torch.testing.assert_close(inv[-1], plain[-1] / 16)  # lowest frequency divided by the factor


def test_forward_never_builds_txt_tensors():
    T = 2048
    cfg = small_text(vocab_size=256, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     intermediate_size=32, intermediate_size_mlp=32, attention_chunk_size=64)
    model = llama4.Llama4(cfg).init_weights(seed=0)
    ids = torch.randint(0, 256, (1, T))
    with torch.no_grad(), LargestTensor() as spy:
        model(ids)
    # The largest tensors are the logits (T x V = 512K elements); T x T would be 4M.
    assert spy.largest <= T * 256 < T * T
