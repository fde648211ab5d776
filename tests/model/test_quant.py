"""Quantized kernels equal dequantize-then-matmul within rounding; quantized experts route like float ones."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.model.moe import MoE, moe_dense_reference
from llama4.model.quant import (QuantExperts, QuantLinear, QuantMatrices, QuantScheme, as_scheme,
                                dequantize_weight, fp8_to, quantize_weight)
from llama4.model.quantize import expert_weights, quantize_model

SCHEMES = [QuantScheme("int8"), QuantScheme("fp8"), QuantScheme("int4", 32), QuantScheme("int4", 64),
           QuantScheme("int4", 128)]


def test_scheme_parsing_and_errors():
    assert as_scheme("int4-g64") == QuantScheme("int4", 64)
    assert as_scheme("int4", 32).group_size == 32
    with pytest.raises(ValueError, match="nf4"):
        as_scheme("nf4")
    with pytest.raises(ValueError, match="group size 48"):
        as_scheme("int4", 48)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantize_error_within_half_a_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different ranges
    q, s = quantize_weight(w, scheme)
    err = (dequantize_weight(q, s) - w).abs()
    if scheme.name == "fp8":  # 3 mantissa bits: relative error <= 2^-4, plus subnormal steps
        assert (err <= w.abs() * 2**-4 + s * 2**-9).all()
    else:
        step = s.repeat_interleave(256 // s.shape[1], 1)
        assert (err <= step * (0.5 + 1e-4)).all()


def test_fp8_bit_shift_equals_to_for_every_value():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1)
    ref = values.to(torch.float32)
    got = fp8_to(values, torch.ones(256, 1), torch.float32)
    finite = ~ref.isnan()
    assert torch.equal(got[finite], ref[finite])


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 5, 40])  # 40 rows: past the int8 kernel's row limit
def test_mm_equals_dequantized_matmul(scheme, dtype, M):
    torch.manual_seed(1)
    N, K = 48, 128
    w = torch.randn(N, K)
    q, s = quantize_weight(w, scheme)
    m = QuantMatrices(2, N, K, scheme)
    m.set(1, q, s)
    x = torch.randn(M, K).to(dtype)
    xr = x.double()
    if scheme.name == "fp8":  # W8A8: activations rounded to fp8 per token (max -> 448)
        xs = x.float().abs().amax(-1, keepdim=True) / 448
        xr = ((x.float() / xs).to(torch.float8_e4m3fn).float() * xs).double()
    ref = xr @ dequantize_weight(q, s).double().t()
    got = m.mm(1, x)
    assert got.dtype == dtype and got.shape == (M, N)
    # bf16 activations / outputs: relative rounding of a K-term sum of bf16 products
    tol = 2e-2 * ref.abs().max().item() if (dtype == torch.bfloat16 or scheme.name != "fp8") else 1e-4
    assert (got.double() - ref).abs().max().item() <= tol
    torch.testing.assert_close(m.dequantize(1), dequantize_weight(q, s), rtol=1e-2, atol=1e-2 * s.max().item())


def test_int4_nibble_layout_where_the_cpu_kernel_cannot_pack():
    torch.manual_seed(2)
    w = torch.randn(24, 64)  # N = 24: the CPU int4 packing needs N % 16 == 0
    scheme = QuantScheme("int4", 32)
    m = QuantMatrices(1, 24, 64, scheme)
    assert m.layout == "nibble"
    q, s = quantize_weight(w, scheme)
    m.set(0, q, s)
    torch.testing.assert_close(m.dequantize(0), dequantize_weight(q, s))
    x = torch.randn(3, 64)
    torch.testing.assert_close(m.mm(0, x), x @ dequantize_weight(q, s).t(), rtol=1e-5, atol=1e-5)


def make_moe(E, k, D=64, F=64, seed=0):
    cfg = llama4.TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


def dequantized_copy(moe: MoE, scheme: QuantScheme) -> MoE:
    """The same MoE with float experts holding exactly the quantized values (the reference)."""
    ref = make_moe(moe.n_experts, moe.top_k)
    ref.load_state_dict(moe.state_dict())
    gate_up, down = expert_weights(ref.experts)
    with torch.no_grad():
        for e in range(gate_up.shape[0]):
            gate_up[e] = dequantize_weight(*quantize_weight(gate_up[e].t(), scheme)).t()
            down[e] = dequantize_weight(*quantize_weight(down[e].t(), scheme)).t()
    return ref


@pytest.mark.parametrize("scheme", [QuantScheme("int8"), QuantScheme("fp8"), QuantScheme("int4", 32)], ids=str)
@pytest.mark.parametrize("E,k,T", [(16, 1, 40), (16, 2, 40), (128, 1, 300), (128, 2, 20)])
def test_quantized_experts_equal_dequantized_reference(scheme, E, k, T):
    """E = 128 with 20 tokens leaves most experts without rows; top-2 routes each token twice."""
    moe = make_moe(E, k)
    ref = dequantized_copy(moe, scheme)
    x = torch.randn(1, T, 64)
    counts = torch.bincount(moe.route(x.reshape(-1, 64))[0].flatten(), minlength=E)
    if E == 128 and T == 20:
        assert (counts == 0).sum() >= 80
    moe.experts = QuantExperts.from_float(*expert_weights(moe.experts), scheme)
    with torch.no_grad():
        want = moe_dense_reference(ref, x)  # every expert on every token, float weights
        got = moe(x)
        # The int kernels take bf16 activations, fp8 rounds them to fp8 per token (W8A8)
        assert (got - want).abs().max() <= (5e-2 if scheme.name == "fp8" else 2e-2) * want.abs().max()
        # bf16: against the reference also in bf16, so that both route near-ties the same way
        want_b = moe_dense_reference(ref.to(torch.bfloat16), x.bfloat16()).float()
        got_b = moe.to(torch.bfloat16)(x.bfloat16()).float()
        assert (got_b - want_b).abs().max() <= (6e-2 if scheme.name == "fp8" else 3e-2) * want_b.abs().max()


def test_quantized_experts_no_routed_rows():
    q = QuantExperts(4, 64, 64, QuantScheme("int8"))
    out = q(torch.empty(0, 64), torch.zeros(4, dtype=torch.int64))
    assert out.shape == (0, 64)


def test_quantize_model_all_linears_and_memory():
    cfg = llama4.preset("tiny")
    cfg.vision = None
    model = llama4.Llama4(cfg).init_weights(seed=0).eval()
    ids = torch.randint(0, cfg.text.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, "int8", only="all")
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
                   if ".attention.w" in n or "shared_expert.w" in n)
    assert isinstance(model.layers[0].attention.wq, QuantLinear)
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith((".q", ".scale")))
    assert after < 0.5 * before + cfg.text.vocab_size * cfg.text.hidden_size * 4 * 2
    with torch.no_grad():
        got = model(ids)
    # int8 everywhere on a random model: logits move by a small fraction of their spread
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


# pack_for_cpu: bf16 weights packed as fp16 for fbgemm ---------------------------------------------

from llama4.model.quant import PackedExperts, PackedLinear, pack_for_cpu  # noqa: E402


def test_packed_linear_equals_fp32_matmul_of_the_bf16_weights():
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 96)
    want = torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float())
    got = PackedLinear(lin)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # bf16 -> fp16 is exact here
    assert PackedLinear(lin)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("E,k,T", [(16, 1, 1), (16, 2, 1), (16, 2, 40), (128, 1, 20)])
def test_packed_experts_equal_the_reference(E, k, T):
    moe = make_moe(E, k).to(torch.bfloat16).float()  # bf16 weight values, fp32 math
    x = torch.randn(1, T, 64)
    with torch.no_grad():
        want = moe_dense_reference(moe, x)
        moe.experts = PackedExperts(moe.experts)
        got = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = moe.experts(torch.empty(0, 64), torch.zeros(E, dtype=torch.int64))
    assert out.shape == (0, 64)


def test_pack_for_cpu_model_equals_fp32_of_the_same_weights_and_decodes_the_same():
    cfg = llama4.preset("tiny")
    cfg.vision = None
    model = llama4.Llama4(cfg).init_weights(seed=0).eval().to(torch.bfloat16)
    ref = llama4.Llama4(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, cfg.text.vocab_size, (1, 12))
    with torch.no_grad():
        want = ref(ids)
        bf16_err = float((model(ids).float() - want).abs().max())
    pack_for_cpu(model)
    assert isinstance(model.layers[0].attention.wq, PackedLinear)
    moe_layer = next(i for i in range(cfg.text.num_hidden_layers) if cfg.text.is_moe(i))
    assert isinstance(model.layers[moe_layer].feed_forward.experts, PackedExperts)
    with torch.no_grad():
        got = model(ids)
    # fp32 math on the same weight values (fp16 holds bf16 values but for subnormals): within 2e-3 of
    # the logits' range, and several times closer than the bf16 model itself
    err = float((got - want).abs().max())
    assert got.dtype == torch.float32 and err <= 2e-3 * float(want.abs().max()) and err < bf16_err / 4
    prompt = ids[0].tolist()
    assert llama4.generate(model, prompt, max_new_tokens=8, stop_ids=[]) == \
        llama4.generate(ref, prompt, max_new_tokens=8, stop_ids=[])
    with pytest.raises(ValueError, match="packed for CPU inference .* save the model before packing"):
        model.state_dict()


def test_pack_for_cpu_refuses_what_it_cannot_pack():
    lin = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="magnitude 100000 does not fit fp16"):
        PackedLinear(lin)
    cfg = llama4.preset("tiny")
    cfg.vision = None
    model = quantize_model(llama4.Llama4(cfg).init_weights(seed=0).eval(), "int8")
    with pytest.raises(ValueError, match="is quantized; pack a float"):
        pack_for_cpu(model)
