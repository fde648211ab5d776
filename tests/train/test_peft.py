"""LoRA adapters in PEFT's format: PEFT reads ours and computes our logits; we read PEFT's."""

from __future__ import annotations

import json

import pytest
import torch

import llama4
from conftest import hf_model, rel_err, save_hf, small_text
from llama4.train.lora import add_lora, apply_adapter, merge_adapter, save_adapter

peft = pytest.importorskip("peft")


def mm_config():
    cfg = llama4.preset("tiny").replace(vocab_size=1024, attention_chunk_size=32, floor_scale=8, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=[2])
    cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index = 1000, 1001, 1002
    return cfg


CONFIGS = {"text": lambda: small_text(interleave_moe_layer_step=2), "multimodal": mm_config}


def lively(model):
    """Adapters with B != 0 (fresh ones start at the base model exactly, which would test nothing)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def text_logits(model, ids):
    lm = getattr(model, "language_model", None)
    with torch.no_grad():
        if lm is None:  # PeftModel over a multimodal model: go through its language model
            return model(input_ids=ids).logits
        return lm(input_ids=ids).logits


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_peft_reads_our_adapter(which, tmp_path):
    from peft import PeftModel

    cfg = CONFIGS[which]()
    base = save_hf(hf_model(cfg, seed=1), tmp_path / "base")
    ours = llama4.load(base)
    add_lora(ours, rank=4, alpha=8.0, targets=["attention", "experts"])
    lively(ours)
    adapter = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert conf["target_parameters"] == ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
    assert conf["base_model_name_or_path"] == str(base)

    hf = hf_model(cfg, seed=1)
    wrapped = PeftModel.from_pretrained(hf, str(adapter)).eval()
    ids = torch.randint(3, 500, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        base_logits = text_logits(hf_model(cfg, seed=1), ids)
        ref = wrapped.base_model.model.language_model(input_ids=ids).logits if which == "multimodal" \
            else wrapped(input_ids=ids).logits
    assert rel_err(ref, base_logits) > 1e-3  # the adapter changes the model, in PEFT too
    assert rel_err(got, ref) <= 1e-4


def test_we_read_an_adapter_trained_with_peft(tmp_path):
    """PEFT's own layout (q/v only plus down_proj, nothing else) applied without merging, then merged."""
    from peft import LoraConfig, get_peft_model

    cfg = small_text(interleave_moe_layer_step=1)
    base = save_hf(hf_model(cfg, seed=2), tmp_path / "base")
    hf = get_peft_model(hf_model(cfg, seed=2), LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], target_parameters=["feed_forward.experts.down_proj"],
        init_lora_weights=False)).eval()
    hf.save_pretrained(tmp_path / "peft")
    ids = torch.randint(3, 500, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    model = apply_adapter(llama4.load(base), tmp_path / "peft")
    adapted = {k for k in model.lora_config["select"]}
    assert {k.rsplit(".", 2)[-2] for k in adapted if "attention" in k} == {"wq", "wv"}
    assert not any("gate_up_proj" in k for k in adapted)
    with torch.no_grad():
        assert rel_err(model(ids), ref) <= 1e-4
    merged = llama4.load(merge_adapter(base, tmp_path / "peft", tmp_path / "merged"))
    with torch.no_grad():
        assert rel_err(merged(ids), ref) <= 1e-4


def test_bad_adapters_are_refused(tmp_path):
    cfg = small_text()
    model = llama4.Llama4(cfg).init_weights(seed=0)
    add_lora(model, rank=2, alpha=4.0, targets=["attention"])
    adapter = save_adapter(model, tmp_path / "a")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        apply_adapter(llama4.Llama4(cfg).init_weights(seed=0), adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        apply_adapter(llama4.Llama4(cfg).init_weights(seed=0), adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**conf, "r": 3}))
    with pytest.raises(ValueError, match="r=3"):
        apply_adapter(llama4.Llama4(cfg).init_weights(seed=0), adapter)
