"""The sparse MoE equals the dense all-experts reference, and spends only routed experts' FLOPs."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.model.moe import MoE, moe_dense_reference


def make_moe(E=8, k=1, D=32, F=48, seed=0, dtype=torch.float32):
    cfg = llama4.TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe.to(dtype)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_equals_dense(k):
    moe = make_moe(k=k)
    x = torch.randn(3, 50, 32)
    torch.testing.assert_close(moe(x), moe_dense_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_expert_without_tokens():
    moe = make_moe(E=16)
    x = torch.randn(1, 3, 32)  # 3 tokens, 16 experts: most experts receive nothing
    idx, _, _ = moe.route(x.reshape(-1, 32))
    counts = torch.bincount(idx.flatten(), minlength=16)
    assert (counts == 0).sum() >= 13
    torch.testing.assert_close(moe(x), moe_dense_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_score_scales_input_not_output():
    """silu is not linear, so scaling the expert's input differs from scaling its output."""
    moe = make_moe(E=2)
    x = torch.randn(1, 4, 32)
    x_ND = x.reshape(-1, 32)
    idx, scores, _ = moe.route(x_ND)
    e = int(idx[0, 0])
    gate, up = (x_ND[:1] * scores[0, 0] @ moe.experts.gate_up_proj[e]).chunk(2, -1)
    expected = moe.shared_expert(x_ND[:1]) + (torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e]
    torch.testing.assert_close(moe(x)[0, :1], expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_dense():
    moe = make_moe(k=2)
    x = torch.randn(2, 20, 32, requires_grad=True)
    moe(x).square().sum().backward()
    g_sparse = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    moe_dense_reference(moe, x).square().sum().backward()
    g_dense = [p.grad for p in moe.parameters()] + [x.grad]
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_close_to_dense():
    moe = make_moe(dtype=torch.bfloat16)
    x = torch.randn(2, 30, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(moe(x).float(), moe_dense_reference(moe, x).float(), rtol=2e-2, atol=2e-2)


def test_only_routed_experts_compute():
    """Count expert matmul rows: the loop touches each (token, expert) pair once, never E x N."""
    moe = make_moe(E=16, k=1)
    x = torch.randn(1, 64, 32)
    seen = []
    orig = moe.experts.forward

    def spy(x_RD, counts_E):
        seen.append((x_RD.shape[0], int(counts_E.sum())))
        return orig(x_RD, counts_E)

    moe.experts.forward = spy
    moe(x)
    assert seen == [(64, 64)]


def test_expert_bias_changes_choice_not_scores():
    moe = make_moe(E=4)
    x_ND = torch.randn(10, 32)
    idx0, scores0, logits = moe.route(x_ND)
    moe.expert_bias[:] = torch.tensor([100.0, 0, 0, 0])
    idx1, scores1, _ = moe.route(x_ND)
    assert (idx1 == 0).all()
    torch.testing.assert_close(scores1[:, 0], torch.sigmoid(logits[:, 0]))


# Routing state ------------------------------------------------------------------------------------

def test_expert_bias_is_persistent_fp32_state():
    moe = make_moe(E=4)
    moe.expert_bias.copy_(torch.tensor([0.25, 0.251, -0.1, 1e-3]))
    assert "expert_bias" in moe.state_dict() and "tokens_per_expert" not in moe.state_dict()
    moe = moe.to(torch.bfloat16)
    assert moe.expert_bias.dtype == torch.float32 and moe.router.weight.dtype == torch.bfloat16
    assert moe.expert_bias.tolist() == torch.tensor([0.25, 0.251, -0.1, 1e-3]).tolist()  # not rounded
    other = make_moe(E=4, seed=1)
    other.load_state_dict(moe.state_dict())
    torch.testing.assert_close(other.expert_bias, moe.expert_bias)


def test_choice_in_fp32_sees_a_small_bias_step_in_a_bf16_model():
    """At bias 0.5, bf16's spacing is 4e-3: a 1e-3 step vanishes in bf16 arithmetic."""
    moe = make_moe(E=2, dtype=torch.bfloat16)
    with torch.no_grad():
        moe.router.weight.zero_()  # equal logits: only the bias decides
    moe.expert_bias.copy_(torch.tensor([0.5, 0.5 + 1e-3]))
    assert torch.tensor(0.5 + 1e-3).bfloat16().item() == 0.5
    idx, _, _ = moe.route(torch.randn(6, 32, dtype=torch.bfloat16))
    assert (idx[:, 0] == 1).all()


def test_padding_does_not_count_toward_expert_load():
    moe = make_moe(E=8, k=2).train()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :7], mask[1, :3] = True, True
    out = moe(x, token_mask=mask)
    idx, _, _ = moe.route(x.reshape(-1, 32))
    expected = torch.bincount(idx[mask.reshape(-1)].reshape(-1), minlength=8)
    assert moe.tokens_per_expert.tolist() == expected.tolist() and int(expected.sum()) == 10 * 2
    torch.testing.assert_close(out, moe(x))  # the mask changes counting only, not the output
    moe.eval()
    before = moe.tokens_per_expert.clone()
    moe(x)
    assert torch.equal(moe.tokens_per_expert, before)  # inference never counts


def test_model_forward_threads_the_token_mask():
    text = llama4.TextConfig(hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_local_experts=4,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             vocab_size=64, interleave_moe_layer_step=1)
    model = llama4.Llama4(llama4.Llama4Config(text, None, name="test")).init_weights(seed=0).train()
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    model(ids, token_mask=mask)
    for layer in model.layers:
        assert int(layer.feed_forward.tokens_per_expert.sum()) == 8
