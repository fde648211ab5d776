"""Published unquantized layouts load and compute as transformers does: base and Instruct Scout,
Maverick and Llama Guard 4, each as the published `config.json` spells it (transformers 4.x) and as
transformers 5.x re-saves it.

Each case starts from the published file (tests/fixtures/*-config.json), keeps every field the
publisher wrote and shrinks only the sizes, builds transformers' model from that very file, and saves
its random weights beside it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import llama4
from conftest import rel_err
from llama4.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures"
N_LAYERS = 8

# The base Scout's published text_config differs from the Instruct one in exactly these fields.
BASE_SCOUT = {"no_rope_layers": [], "max_position_embeddings": 262144,
              "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
# Llama Guard 4 12B: Scout with the routed experts pruned and the shared expert kept as every layer's
# dense FFN (so `intermediate_size_mlp` is the shared expert's width), and no chunked attention.
GUARD4 = {"moe_layers": [], "intermediate_size_mlp": 8192, "attention_chunk_size": None,
          "max_position_embeddings": 163840}


def published(name: str) -> dict:
    """A published config.json with only the sizes shrunk (the layer pattern shrinks with the depth)."""
    src = "maverick" if name == "maverick" else "scout"
    d = json.loads((FIXTURES / f"{src}-config.json").read_text())
    t = d["text_config"]
    if name == "scout_base":
        t.update(copy.deepcopy(BASE_SCOUT))
    if name == "guard4":
        t.update(GUARD4)
    t.update(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=N_LAYERS, num_local_experts=4 if src == "scout" else 8,
             intermediate_size=96, intermediate_size_mlp=96 if name == "guard4" else 128,
             floor_scale=8, bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    if t.get("attention_chunk_size"):
        t["attention_chunk_size"] = 32
    if t["rope_scaling"]:
        t["rope_scaling"]["original_max_position_embeddings"] = 64
    if t["no_rope_layers"]:
        t["no_rope_layers"] = t["no_rope_layers"][:N_LAYERS]
    if t["moe_layers"]:
        step = t["interleave_moe_layer_step"]
        t["moe_layers"] = list(range(step - 1, N_LAYERS, step))
    d["vision_config"].update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64)
    d.update(image_token_index=500, boi_token_index=502, eoi_token_index=503)
    return d


CASES = ["scout_instruct", "scout_base", "maverick", "guard4"]


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    name = request.param
    root = tmp_path_factory.mktemp(name)
    d = published(name)
    spec = root / "published"
    spec.mkdir()
    # transformers 5.x refuses the published int `attn_temperature_tuning: 4`; it builds from a bool.
    (spec / "config.json").write_text(json.dumps(
        {**d, "text_config": {**d["text_config"], "attn_temperature_tuning": True}}, indent=2))
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(Llama4Config.from_pretrained(spec)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in pname and p.ndim == 1 else torch.randn_like(p) * 0.08)
    v5 = root / "v5"
    hf.save_pretrained(v5)  # transformers 5.x spelling: rope_parameters, layer_types
    hf.save_pretrained(spec)
    (spec / "config.json").write_text(json.dumps(d, indent=2))  # ... and the published 4.x file as shipped
    return name, hf, spec, v5


@pytest.mark.parametrize("layout", ["published", "v5"])
def test_published_layout_logits_match_transformers(case, layout):
    name, hf, spec, v5 = case
    path = spec if layout == "published" else v5
    if layout == "v5":
        assert "rope_parameters" in json.loads((v5 / "config.json").read_text())["text_config"]
    model = llama4.load(path, dtype=torch.float32)
    t = model.config.text
    if name == "scout_base":  # [] means transformers' default pattern: NoPE on every 4th layer
        assert t.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
        assert t.rope_scaling["high_freq_factor"] == 4.0
    if name == "guard4":
        assert t.moe_layers == [] and t.attention_chunk_size is None
        assert not any(t.is_chunked(i) for i in range(t.num_hidden_layers))
        assert model.vision is not None
    ids = torch.randint(3, 400, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.language_model(input_ids=ids).logits
        ours = model(ids)
    assert rel_err(ours, ref) <= 1e-4


def test_guard4_vision_matches_transformers(case):
    name, hf, spec, _ = case
    if name != "guard4":
        pytest.skip("vision checked once, on the dense Llama Guard 4 layout")
    model = llama4.load(spec, dtype=torch.float32)
    pixels = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = hf.multi_modal_projector(hf.vision_model(pixels).last_hidden_state)
        assert rel_err(model.vision(pixels), ref) <= 1e-5


def test_inspect_published_layouts(case, capsys):
    name, _, spec, v5 = case
    for path in (spec, v5):
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        if name == "guard4":
            assert "0 MoE layers" in out and "8 global" in out


def test_guard4_preset_is_12b_as_transformers_counts():
    """The `guard4` preset at full size: counted by transformers on the meta device, as published (12B)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llama4.config import config_to_hf

    cfg = llama4.preset("guard4")
    d = config_to_hf(cfg, spelling=5)
    d.pop("architectures")
    with torch.device("meta"):
        hf = Llama4ForConditionalGeneration(Llama4Config(**d))
    total = sum(p.numel() for p in hf.parameters())
    assert llama4.parameter_counts(cfg)["total"] == total
    assert 11.9e9 < total < 12.1e9
