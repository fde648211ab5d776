"""Quantized checkpoints: quantizing while loading, `llama4 quantize` output read by us and by
transformers, published layouts (compressed-tensors FP8 built with the package, fbgemm_fp8), refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama4
import llama4.cli
from llama4.checkpoint.quantized import quantized_nbytes
from llama4.checkpoint.quantized_save import quantize_checkpoint
from llama4.model.quant import QuantExperts, QuantLinear, dequantize_weight, quantize_weight
from llama4.model.quantize import quantize_model
from conftest import hf_model, hf_text_logits, rel_err, save_hf, small_text

CFG = dict(hidden_size=128, intermediate_size=128, intermediate_size_mlp=256, head_dim=32, interleave_moe_layer_step=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # std 0.02: a random model calm enough that rounding differences do not get amplified layer by layer
    hf = hf_model(small_text(**CFG), seed=5, std=0.02)
    return save_hf(hf, tmp_path_factory.mktemp("q") / "src"), hf


IDS = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("scheme", ["int8", "int4-g64", "fp8"])
@pytest.mark.parametrize("only", ["experts", "all"])
def test_quantize_while_loading_equals_quantizing_after(ckpt, scheme, only, one_thread):
    src, _ = ckpt
    model = llama4.load(src, quantize=scheme, quantize_only=only)
    assert isinstance(model.layers[1].feed_forward.experts, QuantExperts)
    assert isinstance(model.layers[0].attention.wq, QuantLinear) == (only == "all")
    assert isinstance(model.layers[0].feed_forward.w1, QuantLinear) == (only == "all")  # dense layer
    assert torch.equal(logits(model), logits(quantize_model(llama4.load(src), scheme, only)))


@pytest.mark.parametrize("scheme,only", [("int8", "experts"), ("int4-g32", "all"), ("fp8", "all")])
def test_quantize_command_output_reads_back(ckpt, tmp_path, scheme, only, one_thread):
    src, hf = ckpt
    out = tmp_path / "q"
    assert llama4.cli.main(["quantize", "--scheme", scheme.split("-g")[0], *(["--group-size", "32"] if "g32" in scheme else []),
                            "--only", only, str(src), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == ("float-quantized" if scheme == "fp8" else "pack-quantized")
    assert "lm_head" in cfg["ignore"]
    keys = load_file(out / "model.safetensors").keys()
    assert "model.layers.1.feed_forward.experts.3.up_proj.weight_scale" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    again = llama4.load(out)
    # Same scales, values rounded by compressed-tensors instead of us: identical models.
    assert torch.equal(logits(again), logits(llama4.load(src, quantize=scheme, quantize_only=only)))
    assert rel_err(logits(again), hf_text_logits(hf, IDS)) < {"int8": 0.03, "int4-g32": 0.3, "fp8": 0.15}[scheme]
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(src, out, "int8")


@pytest.mark.parametrize("scheme", ["int8", "int4-g64"])
def test_transformers_reads_our_quantized_checkpoint(ckpt, tmp_path, scheme, one_thread):
    """transformers (compressed-tensors, CPU: decompressed on load) computes what we compute. Our int
    kernels take bf16 activations, hence the tolerance."""
    from transformers import Llama4ForCausalLM

    out = quantize_checkpoint(ckpt[0], tmp_path / "q", scheme, "all")
    theirs = Llama4ForCausalLM.from_pretrained(out).eval()
    assert rel_err(logits(llama4.load(out)), hf_text_logits(theirs, IDS)) < {"int8": 0.02, "int4-g64": 0.05}[scheme]


def test_fp8_linear_matches_compressed_tensors_forward(ckpt, tmp_path, one_thread):
    """W8A8 with dynamic per-token activations, as compressed-tensors runs a [B, T, D] input.
    (For a 2-D input its CPU emulation scales the whole tensor at once, so the experts inside
    transformers' per-expert modules do not compute per-token: we do not compare those.)"""
    from transformers import Llama4ForCausalLM

    out = quantize_checkpoint(ckpt[0], tmp_path / "q", "fp8", "all")
    theirs = Llama4ForCausalLM.from_pretrained(out).eval()
    hf_text_logits(theirs, IDS)  # compressed-tensors decompresses on the first forward
    ours = llama4.load(out)
    x = torch.randn(1, 7, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours.layers[0].attention.wq(x), theirs.model.layers[0].self_attn.q_proj(x),
                                   rtol=1e-5, atol=1e-5)


def test_compressed_tensors_fp8_built_by_the_package(ckpt, tmp_path, one_thread):
    """The official Maverick FP8 layout made by compressed-tensors' own model path: transformers'
    per-expert modules, FP8_DYNAMIC scheme, observers' scales, ModelCompressor.compress_model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers.quantizers.base import SequentialLlama4TextExperts

    src, hf = ckpt
    model = hf_model(small_text(**CFG), seed=5, std=0.02)
    tc = model.config
    for layer in model.model.layers:
        ff = layer.feed_forward
        if not hasattr(ff, "experts"):
            continue
        seq = SequentialLlama4TextExperts(tc)
        F = tc.intermediate_size
        with torch.no_grad():
            for e, mlp in enumerate(seq):
                mlp.gate_proj.weight.copy_(ff.experts.gate_up_proj[e, :, :F].t())
                mlp.up_proj.weight.copy_(ff.experts.gate_up_proj[e, :, F:].t())
                mlp.down_proj.weight.copy_(ff.experts.down_proj[e].t())
        ff.experts = seq
    ignore = ["lm_head", "re:.*router$"]
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
                            ignore=ignore, quantization_status="frozen")
    apply_quantization_config(model, qc)
    with torch.no_grad():  # static min-max weight observer, one scale per output channel
        for name, mod in model.named_modules():
            if hasattr(mod, "weight_scale"):
                mod.weight_scale.copy_((mod.weight.abs().amax(1, keepdim=True) / 448).to(mod.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = tmp_path / "ct"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"] = compressor.quantization_config.model_dump(mode="json") | {"quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(d))

    keys = load_file(out / "model.safetensors")
    assert keys["model.layers.1.feed_forward.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    ours = llama4.load(out)
    assert isinstance(ours.layers[1].feed_forward.experts, QuantExperts)
    assert isinstance(ours.layers[1].feed_forward.router, torch.nn.Linear)  # ignored: stays float
    # Against a dequantized fp32 copy (weights = fp8 values x scales, activations unrounded): the
    # difference is the per-token activation rounding of W8A8 only.
    deq = llama4.load(src)
    with torch.no_grad():
        for i, layer in enumerate(deq.layers):
            for name, p in layer.named_parameters():
                if p.ndim == 2 and "norm" not in name and "router" not in name:
                    p.copy_(dequantize_weight(*quantize_weight(p, llama4.model.quant.QuantScheme("fp8"))))
                elif p.ndim == 3:
                    for e in range(p.shape[0]):
                        p[e] = dequantize_weight(*quantize_weight(p[e].t(), llama4.model.quant.QuantScheme("fp8"))).t()
    assert rel_err(logits(ours), logits(deq)) < 0.1
    assert (logits(ours).argmax(-1) == logits(deq).argmax(-1)).float().mean() > 0.9


def test_fbgemm_fp8_fused_layout(ckpt, tmp_path, one_thread):
    src, _ = ckpt
    sd = load_file(src / "model.safetensors")
    out = {}
    fp8 = llama4.model.quant.QuantScheme("fp8")
    deq = dict(sd)
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            qs = [quantize_weight(v[e].t(), fp8) for e in range(v.shape[0])]
            out[k] = torch.stack([q.t() for q, _ in qs]).contiguous()  # [E, D, 2F] / [E, F, D]
            s = torch.stack([s for _, s in qs])  # [E, N, 1]
            out[k + "_scale"] = s.transpose(1, 2).contiguous() if k.endswith("gate_up_proj") else s
            deq[k] = torch.stack([dequantize_weight(q, s).t() for q, s in qs])
        elif k.endswith(("q_proj.weight", "o_proj.weight")):
            q, s = quantize_weight(v, fp8)
            out[k], out[k[:-len("weight")] + "weight_scale"] = q, s
            deq[k] = dequantize_weight(q, s)
        else:
            out[k] = v
    (tmp_path / "fb").mkdir()
    (tmp_path / "deq").mkdir()
    save_file(out, str(tmp_path / "fb" / "model.safetensors"))
    save_file(deq, str(tmp_path / "deq" / "model.safetensors"))
    d = json.loads((src / "config.json").read_text())
    (tmp_path / "deq" / "config.json").write_text(json.dumps(d))
    d["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                "modules_to_not_convert": ["k_proj", "v_proj"]}
    (tmp_path / "fb" / "config.json").write_text(json.dumps(d))
    ours = llama4.load(tmp_path / "fb")
    assert isinstance(ours.layers[1].feed_forward.experts, QuantExperts)
    assert isinstance(ours.layers[0].attention.wq, QuantLinear)
    assert isinstance(ours.layers[0].attention.wk, torch.nn.Linear)
    ref = llama4.load(tmp_path / "deq")
    assert rel_err(logits(ours), logits(ref)) < 0.1


def test_unknown_quant_method_refused_by_name(ckpt, tmp_path):
    src, _ = ckpt
    dst = tmp_path / "awq"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="'awq' is not supported"):
        llama4.load(dst)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "x", "int8")


PEAK = """
import os, sys, threading, time, torch, llama4
torch.set_num_threads(1)
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], []
def sample():  # the high-water mark of this load alone (ru_maxrss would include import-time peaks)
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
t = threading.Thread(target=sample)
t.start()
m = llama4.load(sys.argv[1], quantize=sys.argv[2] if sys.argv[2] != "none" else None)
done.append(1)
t.join()
print(max(peak[0], rss()) - base)
"""


def test_quantize_while_loading_never_holds_the_float_model(tmp_path):
    """Peak RSS of load(quantize='int8') on a 218 MB fp32 checkpoint (experts 96%) stays far below the
    float load: the quantized model (~60 MB) plus one 34 MB tensor being quantized."""
    cfg = small_text(hidden_size=256, intermediate_size=1024, num_local_experts=16, num_hidden_layers=4,
                     head_dim=32, vocab_size=512)
    torch.manual_seed(0)
    model = llama4.Llama4(cfg).init_weights(seed=0)
    llama4.save(model, tmp_path / "big")
    size = sum(p.numel() * 4 for p in model.parameters())
    del model
    peak = {}
    for q in ("none", "int8"):
        r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big"), q], capture_output=True, text=True,
                           check=True)
        peak[q] = int(r.stdout.split()[-1])
    assert peak["none"] > 0.9 * size
    fixed = peak["none"] - size  # reading machinery, thread pools: the same for both loads
    quantized = quantized_nbytes(llama4.load(tmp_path / "big", quantize="int8"))
    largest = 16 * 256 * 2048 * 4  # one layer's fp32 gate_up_proj, read whole then quantized
    # glibc may keep one freed tensor-sized block mapped, hence 2 x largest
    assert peak["int8"] - fixed < quantized + 2 * largest, (peak, size, quantized)
    assert peak["int8"] - fixed < 0.6 * size
