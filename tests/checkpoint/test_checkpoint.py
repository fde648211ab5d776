"""HF checkpoints: streamed loading, bit-exact round trips, shards, transformers reading our saves,
and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import llama4
from llama4.checkpoint import KeyMap
from llama4.checkpoint.hf import ROUTING_BIAS
from conftest import hf_model, hf_text_logits, rel_err, save_hf, small_text


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    cfg = small_text(interleave_moe_layer_step=2)
    hf = hf_model(cfg, seed=5)
    return save_hf(hf, tmp_path_factory.mktemp("ck") / "text"), hf


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory):
    cfg = llama4.preset("tiny").replace(vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=[2])
    hf = hf_model(cfg, seed=6)
    return save_hf(hf, tmp_path_factory.mktemp("ck") / "mm"), hf


@pytest.mark.parametrize("which", ["text_ckpt", "mm_ckpt"])
def test_round_trip_bit_exact(which, request, tmp_path):
    src, _ = request.getfixturevalue(which)
    model = llama4.load(src)
    llama4.save(model, tmp_path / "out")
    a, b = tensors(src), tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sharded_save_and_load(text_ckpt, tmp_path):
    src, hf = text_ckpt
    model = llama4.load(src)
    out = llama4.save(model, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    again = llama4.load(out)
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_transformers_loads_our_save(text_ckpt, tmp_path):
    from transformers import Llama4ForCausalLM

    src, hf = text_ckpt
    llama4.save(llama4.load(src), tmp_path / "ours", max_shard_size="200KB")
    theirs = Llama4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 512, (2, 70))
    assert rel_err(hf_text_logits(theirs, ids), hf_text_logits(hf, ids)) == 0.0


def test_transformers_loads_our_multimodal_save(mm_ckpt, tmp_path):
    from transformers import Llama4ForConditionalGeneration

    src, hf = mm_ckpt
    llama4.save(llama4.load(src), tmp_path / "ours", config_spelling=5)
    theirs = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(theirs.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


def test_key_map_both_directions():
    km = KeyMap(multimodal=True)
    assert km.to_hf("layers.7.feed_forward.experts.gate_up_proj") == \
        "language_model.model.layers.7.feed_forward.experts.gate_up_proj"
    assert km.from_hf("vision_model.model.layers.3.mlp.fc2.bias") == "vision.layers.3.fc2.bias"
    assert km.from_hf("language_model.model.layers.x.self_attn.q_proj.weight") is None
    model = llama4.Llama4(llama4.preset("tiny"))
    for name in model.state_dict():
        if ROUTING_BIAS.fullmatch(name):  # no HF key: saved as expert_bias.json
            continue
        assert km.from_hf(km.to_hf(name)) == name


def test_save_keeps_existing_checkpoint_on_failure(text_ckpt, tmp_path, monkeypatch):
    src, _ = text_ckpt
    model = llama4.load(src)
    target = tmp_path / "keep"
    llama4.save(model, target)
    (target / "tokenizer.json").write_text("{}")
    before = tensors(target)

    import llama4.checkpoint.hf as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        llama4.save(model, target)
    after = tensors(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep")]  # no temp dirs left
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == [".llama4-save.json"]
    monkeypatch.undo()
    llama4.save(model, target)  # a successful re-save keeps side files it does not write
    assert (target / "tokenizer.json").exists()


# Broken checkpoints -------------------------------------------------------------------------------

@pytest.fixture
def broken(text_ckpt, tmp_path):
    dst = tmp_path / "broken"
    llama4.save(llama4.load(text_ckpt[0]), dst, max_shard_size="150KB")
    return dst


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama4.load(tmp_path / "nope")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama4.load(broken)


def test_missing_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        llama4.load(broken)


def test_truncated_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        llama4.load(broken)


def test_garbage_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=shard.name):
        llama4.load(broken)


def _rewrite(path, edit):
    """Load every tensor, apply `edit(dict)`, write one file with no index."""
    t = tensors(path)
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.index.json")):
        f.unlink()
    edit(t)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key(broken):
    _rewrite(broken, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model.layers.1.self_attn.k_proj.weight"):
        llama4.load(broken)


def test_unexpected_key(broken):
    _rewrite(broken, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected.*model.layers.9.extra.weight"):
        llama4.load(broken)


def test_shape_mismatch(broken):
    _rewrite(broken, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model.norm.weight.*\[65\].*\[64\]"):
        llama4.load(broken)


def test_config_contradicts_weights(broken):
    f = broken / "config.json"
    d = json.loads(f.read_text())
    d["num_local_experts"] = 8
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"router.weight.*\[4, 64\].*\[8, 64\]"):
        llama4.load(broken)


def test_index_points_to_wrong_shard(broken):
    index = broken / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    key = "model.norm.weight"
    shards = sorted(set(d["weight_map"].values()))
    d["weight_map"][key] = next(s for s in shards if s != d["weight_map"][key])
    index.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not where the index says"):
        llama4.load(broken)


def test_no_weights(tmp_path, text_ckpt):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(text_ckpt[0] / "config.json", d)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        llama4.load(d)


def test_expert_bias_survives_save_and_load(text_ckpt, tmp_path):
    """Loss-free balancing's routing bias has no HF field: save writes expert_bias.json, load applies it."""
    model = llama4.load(text_ckpt[0])
    moe_layers = [l.feed_forward for l in model.layers if hasattr(l.feed_forward, "expert_bias")]
    moe_layers[0].expert_bias = torch.tensor([5.0, 0.0, 0.0, -5.0])
    llama4.save(model, tmp_path / "b")
    again = llama4.load(tmp_path / "b")
    got = [l.feed_forward.expert_bias for l in again.layers if hasattr(l.feed_forward, "expert_bias")]
    assert torch.equal(got[0], torch.tensor([5.0, 0.0, 0.0, -5.0])) and not got[1].any()
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    moe_layers[0].expert_bias.zero_()
    llama4.save(model, tmp_path / "b")  # a save without biases removes the stale file
    assert not (tmp_path / "b" / "expert_bias.json").exists()
