"""`llama4 convert`: Meta <-> HF round trips bit for bit, and the GGUF export (contents and refusals).
The llama.cpp token-for-token check is tests/checkpoint/test_gguf_llamacpp.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llama4
from conftest import small_text
from llama4.checkpoint.meta import config_from_params
from llama4.checkpoint.meta_save import params_from_config, save_meta
from llama4.cli import main
from test_checkpoint_meta import CASES, ours_to_published, write_meta

gguf = pytest.importorskip("gguf")


def read_shards(path: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(path.glob("consolidated.*.pth"))
    return [torch.load(f, weights_only=True) for f in files]


def assert_same_shards(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys(), sorted(sa.keys() ^ sb.keys())[:5]
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# Meta -> HF -> Meta ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_hf_meta_is_bit_exact(case, tmp_path):
    """The published one-shard layout (the test writer's names and fusions) comes back byte-identical."""
    params = {k: v for k, v in CASES[case].items() if k != "vision_args"}
    model = llama4.Llama4(config_from_params(params)).init_weights(std=0.08, seed=3)
    src = write_meta(tmp_path / "meta", params, [{k: v.to(torch.bfloat16) for k, v in ours_to_published(model).items()}])
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta"]) == 0
    assert_same_shards(read_shards(src), read_shards(tmp_path / "back"))
    # params.json may spell the FFN widths with other (equivalent) multiple_of / ffn_exp values.
    back = json.loads((tmp_path / "back" / "params.json").read_text())
    a, b = vars(config_from_params(back).text), vars(config_from_params(params).text)
    if len(a["moe_layers"]) == a["num_hidden_layers"]:  # no dense layer: its width is not in the model
        a.pop("intermediate_size_mlp"), b.pop("intermediate_size_mlp")
    assert a == b


def test_two_ranks_as_llama_models_reshards_them(tmp_path):
    """Two model-parallel shards split by llama-models' own `reshard_mp` round-trip through HF unchanged."""
    pytest.importorskip("llama_models")
    from test_checkpoint_meta import meta_shards

    params = {k: v for k, v in CASES["scout_like"].items() if k != "vision_args"}
    model = llama4.Llama4(config_from_params(params)).init_weights(std=0.08, seed=4)
    shards = meta_shards(ours_to_published(model), params, 2)
    src = write_meta(tmp_path / "meta", params, shards)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta", "--model-parallel", "2"]) == 0
    assert_same_shards(read_shards(src), read_shards(tmp_path / "back"))


@pytest.mark.parametrize("ranks", [1, 2])
def test_hf_meta_hf_with_vision(ranks, tmp_path):
    model = llama4.Llama4(config_from_params(CASES["scout_like"])).init_weights(std=0.08, seed=5).eval()
    save_meta(model, tmp_path / "meta", model_parallel=ranks)
    back = llama4.load(tmp_path / "meta")
    assert back.config.vision == model.config.vision
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_params_for_a_published_preset_are_meta_s():
    """Scout's config gives params.json values llama-models sizes exactly as Meta's (the published widths)."""
    cfg = llama4.preset("scout")
    p = params_from_config(cfg)
    assert (p["dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], p["nope_layer_interval"]) == (5120, 48, 40, 8, 4)
    assert p["moe_args"]["num_experts"] == 16 and p["attention_chunk_size"] == 8192
    assert config_from_params(p, vocab_size=202048).text.intermediate_size == cfg.text.intermediate_size


@pytest.mark.parametrize("change, message", [
    (dict(no_rope_layers=[1, 0, 0, 1]), r"no_rope_layers=\[1, 0, 0, 1\] is not 'NoPE on every k-th layer'"),
    (dict(attention_bias=True), r"attention_bias=True: llama-models' attention has no biases"),
    (dict(moe_layers=[0, 3]), r"moe_layers=\[0, 3\] is not 'every k-th layer'"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)), r"rope_scaling=.*llama-models only has llama3"),
])
def test_meta_export_refuses_what_params_json_cannot_say(change, message, tmp_path):
    model = llama4.Llama4(small_text(**change))
    with pytest.raises(ValueError, match=message):
        save_meta(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_meta_export_refuses_a_routing_bias(tmp_path):
    model = llama4.Llama4(small_text()).init_weights(seed=0)
    model.layers[1].feed_forward.expert_bias[0] = 0.5
    with pytest.raises(ValueError, match=r"routing bias \(layers\.1\.feed_forward\.expert_bias.*llama-models would "
                                         r"route differently"):
        save_meta(model, tmp_path / "m")


# GGUF -----------------------------------------------------------------------------------------------

def llamacpp_compatible(**overrides) -> llama4.Llama4Config:
    """A tiny config inside what llama.cpp's llama4 architecture hard-codes (chunk / floor 8192, scale 0.1)."""
    base = dict(attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, num_hidden_layers=4,
                interleave_moe_layer_step=2, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0, original_max_position_embeddings=8192))
    return small_text(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """A small BPE trained with `llama4 tokenizer train`: llama.cpp's converter does not know its hash."""
    from llama4.text.bpe import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. Llamas live in the Andes; they eat grass.\n" * 200)
    return llama4.Tokenizer(train_tokenizer([corpus], 400, d / "tok"))


def tiny_for_gguf(tok, seed=0, **overrides) -> llama4.Llama4:
    sp = tok.special_tokens
    cfg = llamacpp_compatible(vocab_size=tok.vocab_size, bos_token_id=sp["<|begin_of_text|>"],
                              eos_token_id=[sp["<|eot|>"]], pad_token_id=sp["<|finetune_right_pad|>"], **overrides)
    return llama4.Llama4(cfg).init_weights(std=0.08, seed=seed).eval()


def gguf_fields(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def test_gguf_holds_our_weights_and_tokenizer(trained_tokenizer, tmp_path):
    model = tiny_for_gguf(trained_tokenizer)
    llama4.save(model, tmp_path / "hf", tokenizer=trained_tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(out), "--to", "gguf"]) == 0
    fields, tensors = gguf_fields(out)
    t = model.config.text
    assert fields["general.architecture"] == "llama4"
    assert fields["llama4.expert_count"] == 4 and fields["llama4.interleave_moe_layer_step"] == 2
    assert fields["llama4.expert_feed_forward_length"] == t.intermediate_size
    assert fields["llama4.feed_forward_length"] == t.intermediate_size_mlp
    assert fields["tokenizer.ggml.pre"] == "llama4" and fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == t.vocab_size
    assert fields["tokenizer.ggml.bos_token_id"] == t.bos_token_id
    assert len(fields["tokenizer.ggml.merges"]) > 0
    sd = model.state_dict()
    as_torch = lambda name: torch.from_numpy(tensors[name].data.copy()).reshape(  # noqa: E731
        list(reversed([int(n) for n in tensors[name].shape])))
    assert torch.equal(as_torch("blk.0.attn_q.weight"), sd["layers.0.attention.wq.weight"])
    gate, up = sd["layers.1.feed_forward.experts.gate_up_proj"].chunk(2, dim=-1)
    assert torch.equal(as_torch("blk.1.ffn_up_exps.weight"), up.transpose(1, 2))
    assert torch.equal(as_torch("blk.1.ffn_down_exps.weight"), sd["layers.1.feed_forward.experts.down_proj"].transpose(1, 2))
    assert torch.equal(as_torch("blk.1.ffn_gate_inp.weight"), sd["layers.1.feed_forward.router.weight"])
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # layer 0 is dense
    assert tensors["rope_freqs.weight"].data.shape == (t.head_dim // 2,)


def test_gguf_q8_0_keeps_norms_and_router_in_f32(trained_tokenizer, tmp_path):
    model = tiny_for_gguf(trained_tokenizer)
    from llama4.checkpoint.gguf import export_gguf

    export_gguf(model, tmp_path / "q.gguf", outtype="q8_0", tokenizer=trained_tokenizer)
    _, tensors = gguf_fields(tmp_path / "q.gguf")
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    deq = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, Q.Q8_0)
    ref = model.state_dict()["layers.0.attention.wq.weight"].numpy()
    assert abs(deq - ref).max() <= abs(ref).max() / 127


@pytest.mark.parametrize("change, message", [
    (dict(attention_chunk_size=32), r"attention_chunk_size=32 \(llama\.cpp's llama4 hard-codes 8192\)"),
    (dict(attention_chunk_size=None), r"attention_chunk_size=None"),
    (dict(floor_scale=8), r"floor_scale=8 \(llama\.cpp's llama4 hard-codes 8192\)"),
    (dict(attn_scale=0.5), r"attn_scale=0\.5 \(llama\.cpp's llama4 hard-codes 0\.1\)"),
    (dict(attn_temperature_tuning=False), r"attn_temperature_tuning=False"),
    (dict(no_rope_layer_interval=2), r"no_rope_layers=\[1, 0, 1, 0\] \(llama\.cpp hard-codes NoPE on every 4th"),
    (dict(num_local_experts=0, moe_layers=[]), r"a dense model"),
    (dict(use_qk_norm=False), r"use_qk_norm=False with 4 experts"),
])
def test_gguf_export_refuses_what_llamacpp_hard_codes(change, message, trained_tokenizer, tmp_path):
    model = tiny_for_gguf(trained_tokenizer, **change)
    llama4.save(model, tmp_path / "hf", tokenizer=trained_tokenizer)
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=message):
        llama4.checkpoint.gguf.export_gguf(model, out)
    assert main(["convert", str(tmp_path / "hf"), str(out), "--to", "gguf"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_gguf_export_refuses_a_routing_bias_unless_allowed(trained_tokenizer, tmp_path, caplog):
    from llama4.checkpoint.gguf import export_gguf

    model = tiny_for_gguf(trained_tokenizer)
    model.layers[1].feed_forward.expert_bias[2] = 0.3
    with pytest.raises(ValueError, match=r"routing bias in layers \[1\].*would route differently"):
        export_gguf(model, tmp_path / "m.gguf")
    export_gguf(model, tmp_path / "m.gguf", tokenizer=trained_tokenizer, allow_routing_bias=True)
    assert "WILL COMPUTE A DIFFERENT MODEL" in caplog.text


def test_convert_flags_that_do_not_apply(tmp_path, capsys):
    llama4.save(llama4.Llama4(small_text()), tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "o"), "--to", "hf", "--model-parallel", "2"]) == 2
    assert "--model-parallel applies to --to meta only" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "o"), "--to", "meta", "--outtype", "q8_0"]) == 2
    assert "--outtype applies to --to gguf only" in capsys.readouterr().err


def test_convert_refuses_a_quantized_checkpoint(tmp_path, capsys):
    llama4.save(llama4.Llama4(small_text()).init_weights(seed=0), tmp_path / "hf")
    assert main(["quantize", "--scheme", "int8", str(tmp_path / "hf"), str(tmp_path / "q")]) == 0
    capsys.readouterr()
    for to, out in (("gguf", "x.gguf"), ("meta", "m"), ("hf", "h")):
        assert main(["convert", str(tmp_path / "q"), str(tmp_path / out), "--to", to]) == 2
        assert "a quantized checkpoint (it loads as QuantExperts" in capsys.readouterr().err
        assert not (tmp_path / out).exists()
