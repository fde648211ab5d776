"""Config values are type- and range-checked field by field; published forms load; unknown keys warn once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import llama4
from llama4.config import config_from_hf

DATA = Path(__file__).resolve().parent / "fixtures"


def published(name: str) -> dict:
    return json.loads((DATA / f"{name}-config.json").read_text())


def _set(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


# (where in config.json, hostile value, what the error must say besides the field and value)
HOSTILE = [
    ("text_config.no_rope_layers", "1110", "list of 0/1 flags"),  # used to read as all-RoPE
    ("text_config.no_rope_layers", [1, 2] * 24, "list of 0/1 flags"),
    ("text_config.use_qk_norm", "false", "true or false"),  # bool("false") is True
    ("text_config.attn_temperature_tuning", "false", "true/false or an integer"),
    ("text_config.rms_norm_eps", -1e-5, "> 0"),  # NaN logits
    ("text_config.rope_theta", -500000.0, "> 0"),
    ("text_config.rope_scaling.factor", 0, "> 0"),
    ("text_config.rope_scaling.original_max_position_embeddings", "8192", "positive integer"),
    ("text_config.hidden_size", "5120", "positive integer"),  # used to raise TypeError deep inside
    ("text_config.num_attention_heads", 40.0, "positive integer"),
    ("text_config.head_dim", "128", "positive integer"),
    ("text_config.max_position_embeddings", 0, "positive integer"),
    ("text_config.attention_chunk_size", 0, "positive integer, or null"),
    ("text_config.num_local_experts", -1, "integer >= 0"),
    ("text_config.eos_token_id", "200001", "token id"),
    ("text_config.floor_scale", float("inf"), "finite number"),
    ("text_config.moe_layers", "0,1", "list of integers"),
    ("text_config", None, "text_config must be an object"),  # used to raise AttributeError
    ("text_config", [1, 2], "text_config must be an object"),
    ("vision_config", "none", "vision_config must be an object"),
    ("vision_config.patch_size", 0, "positive integer"),
    ("vision_config.hidden_size", "1408", "positive integer"),
    ("vision_config.pixel_shuffle_ratio", 0, "(0, 1]"),
    ("vision_config.norm_eps", -1, "> 0"),
    ("image_token_index", "200092", "integer >= 0"),
    ("tie_word_embeddings", "false", "true or false"),
]


@pytest.mark.parametrize("path,value,expect", HOSTILE, ids=[f"{p}={v!r}"[:60] for p, v, _ in HOSTILE])
def test_hostile_field_values_name_field_value_and_expectation(path, value, expect):
    d = published("scout")
    _set(path, value)(d)
    with pytest.raises(ValueError) as e:
        config_from_hf(d)
    msg = str(e.value)
    field = path.rsplit(".", 1)[-1]
    assert expect in msg, msg
    if isinstance(value, (dict, list)) or value is None:
        assert field in msg, msg
    else:
        assert f"{field}={value!r}" in msg, msg


def test_text_only_config_checked_the_same_way():
    cfg = llama4.preset("tiny")
    cfg.vision = None
    d = llama4.config.config_to_hf(cfg)
    d["use_qk_norm"] = "false"
    with pytest.raises(ValueError, match=r"use_qk_norm='false' is invalid"):
        config_from_hf(d)


def test_dataclasses_check_their_fields_too():
    with pytest.raises(ValueError, match=r"rms_norm_eps=0 is invalid"):
        llama4.TextConfig(rms_norm_eps=0)
    with pytest.raises(ValueError, match=r"patch_size=0 is invalid"):
        llama4.VisionConfig(patch_size=0)


def test_published_forms_stay_accepted():
    from transformers import Llama4TextConfig

    scout = config_from_hf(published("scout")).text
    assert scout.attn_temperature_tuning is True  # the int 4
    base = config_from_hf(published("scout-base"))
    # `no_rope_layers: []` is transformers' default pattern: NoPE on layers 3, 7, 11, ... (0-based).
    assert base.text.no_rope_layers == Llama4TextConfig(no_rope_layers=[], num_hidden_layers=48).no_rope_layers
    assert [i for i in range(48) if not base.text.uses_rope(i)] == list(range(3, 48, 4))
    assert base.text.max_position_embeddings == 262144 and base.text.rope_scaling["factor"] == 8.0
    d = published("scout")
    d["text_config"]["attention_chunk_size"] = None  # Llama Guard 4, EAGLE heads
    t = config_from_hf(d).text
    assert t.attention_chunk_size is None and not any(t.is_chunked(i) for i in range(48))
    d["text_config"]["attn_temperature_tuning"] = 0
    assert config_from_hf(d).text.attn_temperature_tuning is False


def test_unknown_keys_load_with_one_warning_at_every_level(caplog):
    with caplog.at_level(logging.WARNING, logger="llama4"):
        cfg = config_from_hf(published("scout-finetune"), "ft/config.json")
    assert cfg.text == config_from_hf(published("scout")).text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    for key in ("unsloth_version", "text_config.unsloth_fixed", "vision_config.unsloth_fixed"):
        assert key in msg, msg
    # HF's own bookkeeping fields (use_cache, _name_or_path, pretraining_tp, ...) are known: not listed.
    for key in ("use_cache", "_name_or_path", "pretraining_tp", "torch_dtype"):
        assert key not in msg, msg


def test_no_warning_for_a_clean_published_config(caplog):
    with caplog.at_level(logging.WARNING, logger="llama4"):
        config_from_hf(published("maverick"))
    assert not caplog.records


@pytest.mark.parametrize("path,value", [
    ("text_config.router_jitter_noise", 0.1),
    ("text_config.attention_dropout", 0.1),
    ("vision_config.projector_dropout", 0.2),
    ("vision_config.vision_feature_layer", -2),
    ("vision_config.vision_feature_select_strategy", "full"),
])
def test_keys_that_change_the_computation_are_refused_by_name(path, value):
    d = published("scout")
    _set(path, value)(d)
    with pytest.raises(ValueError, match=rf"{path.rsplit('.', 1)[-1]}={value!r} is not supported"):
        config_from_hf(d)


def test_inspect_refuses_a_bad_config_instead_of_printing_nan(tmp_path, capsys):
    from llama4.cli import main

    d = published("scout")
    d["text_config"]["rms_norm_eps"] = -1.0
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert main(["inspect", str(tmp_path)]) == 2
    assert "rms_norm_eps=-1.0 is invalid" in capsys.readouterr().err
