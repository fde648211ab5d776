"""Configs: presets, HF config.json in both spellings, parameter accounting, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llama4
from llama4.config import config_from_hf, config_to_hf
from llama4.accounting import kv_cache_bytes

# Copies of the published configs (shared/reference/), kept with the tests so they always run.
DATA = Path(__file__).resolve().parent / "fixtures"


def ref_config(name):
    return json.loads((DATA / f"{name}-config.json").read_text())


@pytest.mark.parametrize("name,total,active", [
    ("scout", 108_641_793_536, 17_172_894_720),
    ("maverick", 401_583_781_376, 17_184_691_200),
])
def test_exact_parameter_counts(name, total, active):
    assert llama4.parameter_counts(llama4.preset(name)) == {"total": total, "active": active}
    published = config_from_hf(ref_config(name))
    assert llama4.parameter_counts(published) == {"total": total, "active": active}


def test_behemoth_projection():
    c = llama4.parameter_counts(llama4.preset("behemoth"))
    assert abs(c["total"] / 2e12 - 1) <= 0.02
    assert abs(c["active"] / 288e9 - 1) <= 0.02


def test_parameter_counts_match_a_real_model():
    cfg = llama4.preset("tiny")
    model = llama4.Llama4(cfg)
    assert llama4.parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_published_scout_config_fields():
    cfg = config_from_hf(ref_config("scout"))
    t = cfg.text
    assert t.attn_temperature_tuning is True  # published as the int 4
    assert [i for i in range(48) if not t.uses_rope(i)] == list(range(3, 48, 4))
    assert t.moe_layers == list(range(48)) and t.use_qk_norm
    assert t.rope_scaling["high_freq_factor"] == t.rope_scaling["low_freq_factor"] == 1.0
    assert cfg.vision.image_size == 336 and cfg.vision.tokens_per_tile == 144


def test_published_maverick_config_fields():
    t = config_from_hf(ref_config("maverick")).text
    assert t.moe_layers == list(range(1, 48, 2)) and not t.use_qk_norm and t.rope_scaling is None
    assert t.num_local_experts == 128


@pytest.mark.parametrize("spelling", [4, 5])
@pytest.mark.parametrize("name", ["tiny", "scout", "maverick", "behemoth"])
def test_hf_round_trip(name, spelling):
    cfg = llama4.preset(name)
    back = config_from_hf(json.loads(json.dumps(config_to_hf(cfg, spelling))))
    assert back.text == cfg.text and back.vision == cfg.vision


def test_text_only_config_round_trip():
    cfg = llama4.preset("tiny")
    cfg.vision = None
    d = config_to_hf(cfg)
    assert d["architectures"] == ["Llama4ForCausalLM"] and "text_config" not in d
    assert config_from_hf(d).text == cfg.text


def test_transformers_reads_what_we_write():
    from transformers import Llama4Config

    d = config_to_hf(llama4.preset("scout"), spelling=5)
    hf = Llama4Config(**{k: v for k, v in d.items() if k != "architectures"})
    assert hf.text_config.no_rope_layers == llama4.preset("scout").text.no_rope_layers
    assert hf.text_config.moe_layers == list(range(48))


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.update(layer_types=["full_attention"] * 48), "layer_types contradicts"),
    (lambda t: t.update(rope_parameters={"rope_type": "default", "rope_theta": 1.0}), "contradicts"),
    (lambda t: t.update(router_jitter_noise=0.1), "router_jitter_noise"),
    (lambda t: t.update(num_key_value_heads=7), "multiple of"),
    (lambda t: t.update(no_rope_layers=[1, 0]), "no_rope_layers has 2 entries"),
    (lambda t: t.update(moe_layers=[99]), "out of range"),
    (lambda t: t.update(rope_scaling={"rope_type": "yarn", "factor": 2}), "unsupported"),
])
def test_bad_config_errors(mutate, message):
    d = ref_config("scout")
    mutate(d["text_config"])
    with pytest.raises(ValueError, match=message):
        config_from_hf(d)


def test_not_a_llama4_config():
    with pytest.raises(ValueError, match="not a Llama 4 config"):
        config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama4.load_config(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama5'"):
        llama4.preset("llama5")


def test_kv_cache_local_layers_bounded():
    cfg = llama4.preset("scout")
    small, huge = kv_cache_bytes(cfg, 8192), kv_cache_bytes(cfg, 10_485_760)
    assert small["local"] == huge["local"]  # one chunk, whatever the context
    assert huge["global"] == small["global"] * 1280  # linear in context
    # 12 global layers x 8 kv heads x 128 dims x (k + v) x 2 bytes per token
    assert huge["global"] == 10_485_760 * 12 * 8 * 128 * 2 * 2
