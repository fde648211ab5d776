"""Chunked local / global attention against an explicit-mask reference, and no T x T tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.model.attention import chunked_causal
from llama4.model.layers import rope_inv_freq
from conftest import LargestTensor, small_text


def masked_reference(q, k, v, chunk):
    T = q.shape[2]
    i = torch.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] // chunk == i[:, None] // chunk)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


@pytest.mark.parametrize("T", [1, 31, 32, 33, 64, 100, 129])
def test_chunked_equals_masked(T):
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    torch.testing.assert_close(chunked_causal(q, k, v, 32), masked_reference(q, k, v, 32), rtol=1e-5, atol=1e-5)


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
