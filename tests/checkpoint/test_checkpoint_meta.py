"""Meta's original format (params.json + consolidated.NN.pth): parity with llama-models' own Transformer,
sharded the way Meta shards, and clear errors on bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import llama4
from conftest import rel_err
from llama4.checkpoint.meta import config_from_params

VISION_ARGS = dict(image_size=dict(height=56, width=56), patch_size=dict(height=14, width=14), dim=32, n_layers=2,
                   n_heads=4, mlp_ratio=4.0, output_dim=48, pixel_shuffle_ratio=0.5)
# Every Llama 4 feature at a size where it shows in 40 tokens: chunk 8, temperature tuning from position 4.
BASE = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, ffn_dim_multiplier=1.2,
            ffn_exp=2.0, norm_eps=1e-5, attention_chunk_size=8, rope_theta=500000.0, nope_layer_interval=2,
            attn_temperature_tuning=True, floor_scale=4.0, attn_scale=0.5)
CASES = {
    # Scout: MoE everywhere, QK-norm, scaled RoPE with llama-models' defaults (16, 1), vision
    "scout_like": dict(BASE, use_scaled_rope=True, use_qk_norm=True, vision_args=VISION_ARGS,
                       moe_args=dict(num_experts=4, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                                     interleave_moe_layer_step=1)),
    # Maverick: MoE every second layer (dense FFN between), no QK-norm, no scaling
    "maverick_like": dict(BASE, use_qk_norm=False, nope_layer_interval=4,
                          moe_args=dict(num_experts=8, interleave_moe_layer_step=2)),
    # explicit llama3 factors, top-2, no auto-scaling of F
    "llama3_top2": dict(BASE, use_scaled_rope=True, rope_scaling_factor=8.0, rope_high_freq_factor=4.0,
                        moe_args=dict(num_experts=4, top_k=2, auto_scale_F=False)),
    "dense_no_chunk": dict(BASE, attention_chunk_size=None, nope_layer_interval=None),
}


# Meta's published tensor names -----------------------------------------------------------------

def published_names(sd: dict[str, torch.Tensor], moe_layers: set[int]) -> dict[str, torch.Tensor]:
    """llama-models' module state_dict -> the names and fusions of the published consolidated files
    (the inverse of llama-models' load hooks; `test_published_names_match_llama_models_hooks` checks it)."""
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = t
            continue
        i, rest = int(parts[1]), ".".join(parts[2:])
        L = f"layers.{i}."
        if rest == "attention.wq.weight":
            k, v = sd[L + "attention.wk.weight"], sd[L + "attention.wv.weight"]
            out[L + "attention.wqkv.weight"] = torch.cat([t, k, v])
        elif rest in ("attention.wk.weight", "attention.wv.weight", "feed_forward.w3.weight"):
            continue  # fused with wq / w1
        elif rest == "attention_norm.weight":
            out[L + "attention.wqkv.layer_norm_weight"] = t
        elif rest == "ffn_norm.weight":
            out[L + ("feed_forward.norm.weight" if i in moe_layers else "feed_forward.mlp.layer_norm_weight")] = t
        elif rest == "feed_forward.w1.weight":
            out[L + "feed_forward.mlp.fc1_weight"] = torch.cat([t, sd[L + "feed_forward.w3.weight"]])
        elif rest == "feed_forward.w2.weight":
            out[L + "feed_forward.mlp.fc2_weight"] = t
        elif rest.startswith("feed_forward.experts.w"):
            name = {"w1": "moe_w_in_eD_F", "w3": "moe_w_swiglu_eD_F", "w2": "moe_w_out_eF_D"}[parts[-1]]
            out[L + "feed_forward.experts." + name] = t.flatten(0, 1)  # published files are [E*D, F] / [E*F, D]
        elif rest.startswith("feed_forward.shared_expert."):
            name = {"w1": "w_in_shared_FD", "w3": "w_swiglu_FD", "w2": "w_out_shared_DF"}[parts[-2]]
            out[L + f"feed_forward.{name}.weight"] = t
        else:
            out[key] = t
    return out


def moe_layer_ids(params: dict) -> set[int]:
    moe = params.get("moe_args")
    step = moe.get("interleave_moe_layer_step", 1) if moe else 0
    return {i for i in range(params["n_layers"]) if step and (i + 1) % step == 0}


def write_meta(path: Path, params: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank, sd in enumerate(shards):
        torch.save(sd, path / f"consolidated.{rank:02d}.pth")
    return path


def ours_to_published(model: llama4.Llama4) -> dict[str, torch.Tensor]:
    """Our parameters in llama-models' module names, then published names: a Meta checkpoint without fairscale."""
    sd, out = model.state_dict(), {}
    cfg = model.config.text
    buffers = {n for n, _ in model.named_buffers()}  # routing bias: no Meta key
    for name, t in sd.items():
        if name in buffers:
            continue
        name = name.replace("feed_forward.router.weight", "feed_forward.router_DE")
        if name.endswith("router_DE"):
            t = t.T
        elif name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=-1)
            out[name.replace("gate_up_proj", "w1")], out[name.replace("gate_up_proj", "w3")] = gate, up
            continue
        elif name.endswith("experts.down_proj"):
            name = name.replace("down_proj", "w2")
        out[name] = t.contiguous()
    return published_names(out, set(cfg.moe_layers))


def tiny_meta_dir(path: Path, case: str = "maverick_like", seed: int = 0) -> tuple[Path, llama4.Llama4]:
    """A one-shard Meta checkpoint written from one of our random models (no fairscale needed)."""
    params = {k: v for k, v in CASES[case].items() if k != "vision_args"}
    model = llama4.Llama4(config_from_params(params)).init_weights(std=0.08, seed=seed).eval()
    return write_meta(path, params, [ours_to_published(model)]), model


# llama-models as the oracle ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    """A one-process gloo group with fairscale's model parallelism of size 1, as llama-models needs."""
    pytest.importorskip("fairscale")
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/rendezvous",
                                rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("a multi-process group is already initialised")
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def meta_transformer(params: dict, seed: int = 0, std: float = 0.08):
    """llama-models' own Transformer on CPU in fp32, with weights large enough for mistakes to show."""
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.model import Transformer

    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # its KV caches are allocated with .cuda()
    try:
        model = Transformer(ModelArgs(**params, max_seq_len=64, max_batch_size=2)).float()
    finally:
        torch.Tensor.cuda = cuda
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def meta_logits(meta, ids, image_embedding=None):
    from llama_models.llama4.datatypes import TransformerInput

    with torch.inference_mode():
        return meta(TransformerInput(tokens=ids, tokens_position=0, image_embedding=image_embedding)).logits


def meta_shards(published: dict[str, torch.Tensor], params: dict, n: int) -> list[dict[str, torch.Tensor]]:
    """Split with Meta's own resharding code (llama_models.checkpoint), then flatten the experts as published."""
    from llama_models.checkpoint import convert_moe_weights, reshard_mp

    moe = params.get("moe_args")
    full = convert_moe_weights(dict(published), moe["num_experts"]) if moe else dict(published)
    shards = [reshard_mp([full], size=n, rank=r) for r in range(n)]
    return [{k: (v.flatten(0, 1) if ".moe_w_" in k else v).contiguous() for k, v in s.items()} for s in shards]


def with_extras(sd: dict) -> dict:
    """Keys the published files carry besides weights, which a loader must skip."""
    return {**sd, "rope.freqs": torch.ones(8), "layers.0.attention.wqkv._extra_state": io.BytesIO(b"te")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_llama_models(case, model_parallel, tmp_path):
    params = CASES[case]
    meta = meta_transformer(params, seed=1)
    published = published_names(meta.state_dict(), moe_layer_ids(params))
    model = llama4.load(write_meta(tmp_path / case, params, [with_extras(published)]))
    ids = torch.randint(0, params["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    ref = meta_logits(meta, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("case", ["scout_like", "maverick_like"])
def test_published_names_match_llama_models_hooks(case, model_parallel):
    """The test's writer produces exactly what llama-models' load hooks turn back into its modules."""
    params = CASES[case]
    meta = meta_transformer(params, seed=2)
    published = published_names(meta.state_dict(), moe_layer_ids(params))
    fresh = meta_transformer(params, seed=3)
    fresh.load_state_dict(with_extras(published), strict=True)
    for key, t in meta.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], t), key


def test_two_shards_and_vision_match_llama_models(model_parallel, tmp_path):
    from llama_models.llama4.datatypes import MaskedEmbedding

    params = CASES["scout_like"]
    meta = meta_transformer(params, seed=4)
    published = published_names(meta.state_dict(), moe_layer_ids(params))
    shards = meta_shards(published, params, 2)
    assert shards[0]["layers.0.feed_forward.experts.moe_w_in_eD_F"].shape[-1] * 2 == \
        published["layers.0.feed_forward.experts.moe_w_in_eD_F"].shape[-1]
    one = llama4.load(write_meta(tmp_path / "one", params, [published]))
    two = llama4.load(write_meta(tmp_path / "two", params, [with_extras(s) for s in shards]))
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name

    # Early fusion end to end: two tiles whose features fill the <|patch|> slots.
    P = two.config.vision.tokens_per_tile
    patch = 7  # a small vocabulary has no room for the real <|patch|> id
    two.config.image_token_index = patch
    ids = torch.randint(8, params["vocab_size"], (1, 2 * P + 10), generator=torch.Generator().manual_seed(1))
    ids[0, 3:3 + 2 * P] = patch
    tiles = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        mask = (ids == patch).unsqueeze(-1)
        h_ref = torch.zeros(1, ids.shape[1], params["dim"])
        embedding = meta.vision_embeddings([[tiles]], mask, h_ref)
        ref = meta_logits(meta, ids, MaskedEmbedding(embedding=embedding, mask=mask))
        ours = two(ids, tiles)
    assert rel_err(ours, ref) <= 1e-5


def test_missing_last_shard_and_replicas_that_differ(model_parallel, tmp_path):
    params = CASES["maverick_like"]
    published = published_names(meta_transformer(params).state_dict(), moe_layer_ids(params))
    shards = meta_shards(published, params, 2)
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*params\.json implies.*shards missing"):
        llama4.load(write_meta(tmp_path / "one_of_two", params, shards[:1]))
    norm = "layers.2.feed_forward.mlp.layer_norm_weight"
    shards[1][norm] = shards[1][norm] + 1
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: replicated tensor "
                                         r"'layers\.2\.feed_forward\.mlp\.layer_norm_weight' differs"):
        llama4.load(write_meta(tmp_path / "two", params, shards))


# Without llama-models: our model written in Meta's layout ------------------------------------------

def test_round_trip_from_our_model(tmp_path):
    path, model = tiny_meta_dir(tmp_path / "c", seed=5)
    loaded = llama4.load(path)
    assert loaded.config.text == model.config.text
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_unnumbered_single_file(tmp_path):
    path, model = tiny_meta_dir(tmp_path / "c", seed=6)
    (path / "consolidated.00.pth").rename(path / "consolidated.pth")
    assert torch.equal(llama4.load(path).output.weight, model.output.weight)


def test_vocab_size_from_the_embedding_when_params_omit_it(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    params = json.loads((path / "params.json").read_text())
    params["vocab_size"] = -1  # as llama-models' ModelArgs default; it then asks the tokenizer
    (path / "params.json").write_text(json.dumps(params))
    assert llama4.load(path).config.text.vocab_size == 512


def test_dtype_follows_checkpoint_unless_given(tmp_path):
    params = {k: v for k, v in CASES["maverick_like"].items()}
    model = llama4.Llama4(config_from_params(params)).init_weights(std=0.08, seed=0)
    sd = {k: v.to(torch.bfloat16) for k, v in ours_to_published(model).items()}
    path = write_meta(tmp_path / "c", params, [sd])
    assert llama4.load(path).output.weight.dtype == torch.bfloat16
    assert llama4.load(path, dtype=torch.float32).output.weight.dtype == torch.float32


def test_scout_and_maverick_params_give_the_presets():
    scout = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
                 ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                 nope_layer_interval=4, use_qk_norm=True, attn_temperature_tuning=True, attention_chunk_size=8192,
                 moe_args=dict(num_experts=16, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                               interleave_moe_layer_step=1),
                 vision_args=dict(image_size=dict(height=336, width=336), patch_size=dict(height=14, width=14),
                                  dim=1408, n_layers=34, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                                  pixel_shuffle_ratio=0.5))
    cfg = config_from_params({"model": scout})
    ref = llama4.preset("scout")
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "intermediate_size_mlp", "num_local_experts", "moe_layers", "no_rope_layers",
              "use_qk_norm", "attention_chunk_size", "rope_scaling", "floor_scale", "attn_scale"):
        assert getattr(cfg.text, f) == getattr(ref.text, f), f
    assert llama4.parameter_counts(cfg) == llama4.parameter_counts(ref)
    maverick = dict(scout, use_scaled_rope=False, use_qk_norm=False,
                    moe_args=dict(num_experts=128, interleave_moe_layer_step=2))
    cfg = config_from_params(maverick)
    assert cfg.text.rope_scaling is None and cfg.text.moe_layers == list(range(1, 48, 2))
    assert llama4.parameter_counts(cfg) == llama4.parameter_counts(llama4.preset("maverick"))


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("dim"), r"params\.json: required fields \['dim'\]"),
    (lambda p: p.pop("ffn_exp"), r"params\.json: MoE models need 'ffn_exp'"),
    (lambda p: p.update(moe_args=4), r"moe_args=4 is invalid: expected an object, or null"),
    # Typed field by field before any arithmetic (a string ffn_exp used to reach torch as a giant size).
    (lambda p: p.update(ffn_exp="2"), r"params\.json: ffn_exp='2' is invalid: expected a finite number > 0"),
    (lambda p: p.update(dim="64"), r"dim='64' is invalid: expected a positive integer"),
    (lambda p: p.update(norm_eps=-1e-5), r"norm_eps=-1e-05 is invalid"),
    (lambda p: p.update(use_qk_norm="false"), r"use_qk_norm='false' is invalid: expected true or false"),
    (lambda p: p.update(nope_layer_interval=0), r"nope_layer_interval=0 is invalid"),
    (lambda p: p["moe_args"].update(num_experts="8"), r"moe_args: num_experts='8' is invalid"),
    (lambda p: p.update(rope_theta=float("nan")), r"rope_theta=nan is invalid"),
    (lambda p: p.update(head_dim=32), r"head_dim=32 contradicts dim // n_heads = 16"),
    (lambda p: p.update(quantization_args={"scheme": "int4_weight_int8_dynamic_activation"}), "not supported"),
    (lambda p: p.update(dim=96), r"'tok_embeddings\.weight' .* gives shape \[512, 64\] but params\.json implies "
                                 r"\[512, 96\]"),
])
def test_bad_params(change, message, tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    params = json.loads((path / "params.json").read_text())
    change(params)
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=message):
        llama4.load(path)


def test_params_not_json(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    (path / "params.json").write_text("{dim: 1")
    with pytest.raises(ValueError, match=r"params\.json: not valid JSON"):
        llama4.load(path)


def test_missing_and_gapped_shards(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    (path / "consolidated.00.pth").rename(path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.00\.pth', 'consolidated\.01\.pth'\] are missing"):
        llama4.load(path)
    (path / "consolidated.02.pth").unlink()
    with pytest.raises(FileNotFoundError, match="no consolidated"):
        llama4.load(path)


def _edit_shard(path: Path, edit) -> None:
    f = path / "consolidated.00.pth"
    sd = dict(torch.load(f, weights_only=True))
    edit(sd)
    torch.save(sd, f)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("layers.1.feed_forward.experts.moe_w_out_eF_D"),
     r"1 tensors missing .*'layers\.1\.feed_forward\.experts\.moe_w_out_eF_D'"),
    (lambda sd: sd.update({"layers.0.attention.bogus": torch.zeros(1)}), r"unexpected tensors.*attention\.bogus"),
    (lambda sd: sd.update({"layers.0.attention.wo.weight": torch.zeros(64, 32)}),
     r"consolidated\.00\.pth: tensor 'layers\.0\.attention\.wo\.weight' .*\[64, 32\] but params\.json implies "
     r"\[64, 64\]"),
    (lambda sd: sd.update({"layers.0.attention.wqkv.weight": torch.zeros(100, 64)}),
     r"'layers\.0\.attention\.wqkv\.weight': each rank's slice has 100 rows, expected q\|k\|v"),
    (lambda sd: sd.update({"norm.weight": "not a tensor"}), r"'norm\.weight' is a str, expected a tensor"),
])
def test_bad_tensors(edit, message, tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    _edit_shard(path, edit)
    with pytest.raises(ValueError, match=message):
        llama4.load(path)


def test_shards_with_different_keys(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    sd = dict(torch.load(path / "consolidated.00.pth", weights_only=True))
    sd.pop("norm.weight")
    torch.save(sd, path / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: its tensors differ .*'norm\.weight'"):
        llama4.load(path)


def test_not_a_checkpoint(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    (path / "consolidated.00.pth").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: not a readable PyTorch checkpoint"):
        llama4.load(path)


def test_inspect_reads_meta_directories(tmp_path, capsys):
    from llama4.cli import main

    path, model = tiny_meta_dir(tmp_path / "meta")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    t = model.config.text
    assert f"{t.num_hidden_layers}: " in out and f"{len(t.moe_layers)} MoE layers" in out


class _Payload:
    """Unpickling this creates a file: proof that code in the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_in_a_meta_shard_never_runs(tmp_path):
    path, _ = tiny_meta_dir(tmp_path / "c")
    marker = tmp_path / "pwned"
    sd = torch.load(path / "consolidated.00.pth", weights_only=True)
    sd["payload"] = _Payload(str(marker))
    torch.save(sd, path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: not a readable PyTorch checkpoint"):
        llama4.load(path)
    assert not marker.exists()
