"""Meta's original-format fp8_mixed / int4_mixed checkpoints (llama-models' quantization/loader.py layout)."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import rel_err
from llama4.checkpoint.meta import config_from_params
from llama4.model.quant import QuantExperts, QuantLinear, QuantScheme, dequantize_weight, quantize_weight
from test_checkpoint_meta import BASE, ours_to_published, write_meta

PARAMS = dict(BASE, dim=128, multiple_of=128, moe_args=dict(num_experts=4, interleave_moe_layer_step=1))
IDS = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))


def meta_quantized_dir(path, mode):
    """(checkpoint dir, the same model with dequantized fp32 weights: the reference)."""
    model = llama4.Llama4(config_from_params(PARAMS)).init_weights(std=0.02, seed=0).eval()
    scheme = QuantScheme("fp8") if mode == "fp8_mixed" else QuantScheme("int4", 128)
    n = len(model.layers)
    layers = range(1, n - 1) if mode == "fp8_mixed" else range(n)  # fp8_mixed skips the first and last
    values, ref = llama4.Llama4(model.config), llama4.Llama4(model.config)
    values.load_state_dict(model.state_dict())
    ref.load_state_dict(model.state_dict())
    scales = {}
    with torch.no_grad():
        for i in layers:
            p = f"layers.{i}.feed_forward"
            ex, ex_v, ex_r = (m.layers[i].feed_forward.experts for m in (model, values, ref))
            E, D, F2 = ex.gate_up_proj.shape
            F = F2 // 2
            s_gu, s_dn = [], []
            for e in range(E):
                q, s = quantize_weight(ex.gate_up_proj[e].t(), scheme)
                ex_v.gate_up_proj[e] = q.float().t()
                ex_r.gate_up_proj[e] = dequantize_weight(q, s).t()
                s_gu.append(s)
                q, s = quantize_weight(ex.down_proj[e].t(), scheme)
                ex_v.down_proj[e] = q.float().t()
                ex_r.down_proj[e] = dequantize_weight(q, s).t()
                s_dn.append(s)
            s_gu, s_dn = torch.stack(s_gu), torch.stack(s_dn)  # [E, 2F, G], [E, D, G]
            if mode == "fp8_mixed":  # fbgemm row-wise scales of the transposed [E, F, D] weights
                scales[f"{p}.experts.w1"], scales[f"{p}.experts.w3"] = s_gu[:, :F, 0], s_gu[:, F:, 0]
                scales[f"{p}.experts.w2"] = s_dn[:, :, 0]
            else:  # int4_row_quantize: [E, K/128, N]
                scales[f"{p}.experts.w1"] = s_gu[:, :F].transpose(1, 2).contiguous()
                scales[f"{p}.experts.w3"] = s_gu[:, F:].transpose(1, 2).contiguous()
                scales[f"{p}.experts.w2"] = s_dn.transpose(1, 2).contiguous()
                for w in ("w1", "w3", "w2"):
                    lin, lin_v, lin_r = (getattr(m.layers[i].feed_forward.shared_expert, w) for m in (model, values, ref))
                    q, s = quantize_weight(lin.weight, scheme)
                    lin_v.weight.copy_(q.float())
                    lin_r.weight.copy_(dequantize_weight(q, s))
                    scales[f"{p}.shared_expert.{w}"] = s.t().contiguous()
    published = ours_to_published(values)
    if mode == "fp8_mixed":
        for k in published:
            if any(k.startswith(f"layers.{i}.feed_forward.experts.") for i in layers):
                published[k] = published[k].to(torch.float8_e4m3fn)
    write_meta(path, PARAMS, [published])
    torch.save(scales, path / ("fp8_scales_0.pt" if mode == "fp8_mixed" else "int4_scales_0.pt"))
    return path, ref


@pytest.mark.parametrize("mode", ["fp8_mixed", "int4_mixed"])
def test_meta_quantized_runs_quantized_and_matches_dequantized(tmp_path, mode, one_thread):
    path, ref = meta_quantized_dir(tmp_path / mode, mode)
    model = llama4.load(path, dtype=torch.float32)
    first, middle = model.layers[0].feed_forward, model.layers[1].feed_forward
    assert isinstance(middle.experts, QuantExperts)
    assert isinstance(first.experts, QuantExperts) == (mode == "int4_mixed")  # fp8_mixed keeps layer 0 bf16
    assert isinstance(middle.shared_expert.w1, QuantLinear) == (mode == "int4_mixed")
    for e in range(4):  # the stored values and scales (the CPU int4 kernel keeps bf16 scales)
        tol = dict(rtol=0, atol=1e-6) if mode == "fp8_mixed" else dict(rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(middle.experts.gate_up.dequantize(e),
                                   ref.layers[1].feed_forward.experts.gate_up_proj[e].t(), **tol)
    with torch.no_grad():
        got, want = model(IDS), ref(IDS)
    # W8A8 rounds activations to fp8; the int4 kernel takes bf16 activations
    assert rel_err(got, want) < (0.1 if mode == "fp8_mixed" else 0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_meta_quantized_bad_scales(tmp_path):
    path, _ = meta_quantized_dir(tmp_path / "bad", "fp8_mixed")
    scales = torch.load(path / "fp8_scales_0.pt", weights_only=True)
    scales["layers.1.feed_forward.experts.w1"] = scales["layers.1.feed_forward.experts.w1"][:, :3]
    torch.save(scales, path / "fp8_scales_0.pt")
    with pytest.raises(ValueError, match=r"scale 'layers\.1\.feed_forward\.experts\.w1' has shape"):
        llama4.load(path)
    (path / "fp8_scales_0.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        llama4.load(path)
