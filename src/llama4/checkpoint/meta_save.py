"""Writing Meta's original format (`params.json` + `consolidated.NN.pth`): the inverse of `meta.py`.

The tensors are written under the published names and fusions (`attention.wqkv`, `mlp.fc1_weight`,
flattened experts), split over `model_parallel` ranks exactly as `meta.py` (after llama-models'
`reshard_mp`) joins them, so `load_meta` reads every file back bit for bit.

`params.json` has no field for the FFN widths: llama-models derives them from `multiple_of`,
`ffn_dim_multiplier` and `ffn_exp`. The published values are tried first (so a Meta checkpoint
converted to HF and back gets its own params.json again), then exact values are solved for. A
config that llama-models' ModelArgs cannot express (a NoPE pattern that is not every k-th layer,
attention biases, other RoPE scaling) is refused by name, and the written params.json is read back
with `config_from_params` and compared field by field before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch

from ..config import Llama4Config
from .atomic import write_checkpoint
from .keymap import compile_template
from .meta import TEXT_RULES, VISION_RULES, config_from_params, dense_hidden, expert_hidden

log = logging.getLogger("llama4")

# Fields llama-models' params.json does not carry (or that do not change what the model computes).
_UNCHECKED = {"max_position_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings"}


def _nope_interval(t, where: str) -> int | None:
    n = t.num_hidden_layers
    if all(t.no_rope_layers):
        return None
    for k in range(1, n + 1):
        if t.no_rope_layers == [int((i + 1) % k != 0) for i in range(n)]:
            return k
    raise ValueError(f"{where}: no_rope_layers={t.no_rope_layers} is not 'NoPE on every k-th layer', the only "
                     f"pattern Meta's params.json (nope_layer_interval) can express")


def _moe_step(t, where: str) -> int:
    n = t.num_hidden_layers
    for step in range(1, n + 1):
        if t.moe_layers == list(range(step - 1, n, step)):
            return step
    raise ValueError(f"{where}: moe_layers={t.moe_layers} is not 'every k-th layer', the only pattern Meta's "
                     f"moe_args.interleave_moe_layer_step can express")


def _ffn_args(t, moe: bool, where: str) -> dict:
    """multiple_of / ffn_dim_multiplier / ffn_exp (/ auto_scale_F) that make llama-models size the dense FFN
    and the experts exactly as `t` does."""
    D, dense_ok = t.hidden_size, t.intermediate_size_mlp
    has_dense = not moe or len(t.moe_layers) < t.num_hidden_layers
    candidates = []
    for m in (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2):
        for fdm in (1.2, 1.3, 1.0, 1.5, 2.0, None):
            for exp in (4.0, 2.0, 1.0, 3.0, 8.0):
                for auto in (True, False):
                    candidates.append(dict(multiple_of=m, ffn_dim_multiplier=fdm, ffn_exp=exp, auto_scale_F=auto))
    # Exact fallback with multiple_of=1: fdm from the dense width, then ffn_exp for the experts' width.
    base = int(2 * int(4 * D) / 3)
    fdm = (dense_ok + 0.5) / base if has_dense else 1.0
    if moe:
        target = t.intermediate_size
        for x in range(max(1, int(target / fdm) - 2), int(target / fdm) + 4):
            if int(fdm * x) == target:
                y = -(-3 * x // 2)
                candidates.append(dict(multiple_of=1, ffn_dim_multiplier=fdm, ffn_exp=(y + 0.5) / D,
                                       auto_scale_F=False))
    else:
        candidates.append(dict(multiple_of=1, ffn_dim_multiplier=fdm))
    for c in candidates:
        p = dict(dim=D, **c)
        if has_dense and dense_hidden(p) != dense_ok:
            continue
        if moe and (p.get("ffn_dim_multiplier") is None or
                    expert_hidden(p, dict(capacity_factor=1.0, auto_scale_F=c["auto_scale_F"]), where)
                    != t.intermediate_size):
            continue
        if not moe:
            c = {k: v for k, v in c.items() if k in ("multiple_of", "ffn_dim_multiplier")}
        return c
    raise ValueError(f"{where}: no multiple_of / ffn_dim_multiplier / ffn_exp make llama-models size the FFN "
                     f"as intermediate_size_mlp={t.intermediate_size_mlp}, intermediate_size={t.intermediate_size}")


def params_from_config(cfg: Llama4Config, where: str = "model") -> dict:
    """Meta's params.json (llama-models' ModelArgs) for `cfg`; refuses what ModelArgs cannot express."""
    t = cfg.text
    if t.attention_bias:
        raise ValueError(f"{where}: attention_bias=True: llama-models' attention has no biases")
    if t.hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act={t.hidden_act!r}: llama-models' FFN is SwiGLU (silu)")
    if t.head_dim * t.num_attention_heads != t.hidden_size:
        raise ValueError(f"{where}: head_dim={t.head_dim} x {t.num_attention_heads} heads != hidden_size="
                         f"{t.hidden_size}: llama-models' attention always uses dim // n_heads")
    moe = t.num_local_experts > 0 and bool(t.moe_layers)
    p = dict(dim=t.hidden_size, n_layers=t.num_hidden_layers, n_heads=t.num_attention_heads,
             n_kv_heads=t.num_key_value_heads, vocab_size=t.vocab_size, **_ffn_args(t, moe, where),
             norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, use_scaled_rope=t.rope_scaling is not None,
             nope_layer_interval=_nope_interval(t, where), use_qk_norm=t.use_qk_norm,
             attn_temperature_tuning=t.attn_temperature_tuning, floor_scale=t.floor_scale, attn_scale=t.attn_scale,
             attention_chunk_size=t.attention_chunk_size)
    if p["nope_layer_interval"] is None:
        p.pop("nope_layer_interval")
    auto = p.pop("auto_scale_F", None)
    if moe:
        p["moe_args"] = dict(num_experts=t.num_local_experts, capacity_factor=1.0, auto_scale_F=bool(auto),
                             top_k=t.num_experts_per_tok, interleave_moe_layer_step=_moe_step(t, where))
    else:
        p.pop("ffn_exp", None)
    rs = t.rope_scaling
    if rs is not None:
        if rs.get("rope_type") != "llama3" or rs.get("low_freq_factor", 1.0) != 1.0 or \
                rs.get("original_max_position_embeddings", 8192) != 8192:
            raise ValueError(f"{where}: rope_scaling={rs}: llama-models only has llama3 scaling with "
                             f"low_freq_factor 1 and original_max_position_embeddings 8192")
        p["rope_scaling_factor"], p["rope_high_freq_factor"] = rs["factor"], rs["high_freq_factor"]
    if cfg.vision is not None:
        v = cfg.vision
        if v.multi_modal_projector_bias:
            raise ValueError(f"{where}: multi_modal_projector_bias=True: Meta's vision projection has no bias")
        p["vision_args"] = dict(image_size=dict(height=v.image_size, width=v.image_size),
                                patch_size=dict(height=v.patch_size, width=v.patch_size), dim=v.hidden_size,
                                n_layers=v.num_hidden_layers, n_heads=v.num_attention_heads,
                                mlp_ratio=v.intermediate_size / v.hidden_size, output_dim=v.projector_output_dim,
                                pixel_shuffle_ratio=v.pixel_shuffle_ratio)
    _check_round_trip(cfg, p, where)
    return p


def _check_round_trip(cfg: Llama4Config, p: dict, where: str) -> None:
    back = config_from_params(p, where, vocab_size=cfg.text.vocab_size)
    t, b = cfg.text, back.text
    skip = set(_UNCHECKED)
    if not (t.num_local_experts and t.moe_layers):
        skip |= {"intermediate_size", "num_local_experts", "num_experts_per_tok", "interleave_moe_layer_step"}
    if len(t.moe_layers) == t.num_hidden_layers:
        skip.add("intermediate_size_mlp")  # no dense layer uses it
    if all(t.no_rope_layers):
        skip.add("no_rope_layer_interval")
    diff = [f"{f.name}: {getattr(t, f.name)!r} -> {getattr(b, f.name)!r}" for f in fields(t)
            if f.name not in skip and getattr(t, f.name) != getattr(b, f.name)]
    if cfg.vision is not None:
        v, bv = cfg.vision, back.vision
        diff += [f"vision.{f.name}: {getattr(v, f.name)!r} -> {getattr(bv, f.name)!r}" for f in fields(v)
                 if f.name != "initializer_range" and getattr(v, f.name) != getattr(bv, f.name)]
    if diff:
        raise ValueError(f"{where}: Meta's params.json cannot express this config exactly; llama-models would "
                         f"build a different model ({'; '.join(diff)})")


def _rules(model) -> list[tuple[str, str, str]]:
    """(our parameter, Meta key, kind) under the published names, one per part of every parameter."""
    cfg = model.config
    moe_layers = set(cfg.text.moe_layers) if cfg.text.num_local_experts else set()
    rules = TEXT_RULES + (VISION_RULES if cfg.vision is not None else [])
    compiled = [(compile_template(o), m, k) for o, m, k in rules]
    buffers = {name for name, _ in model.named_buffers()}
    plan = []
    for name in model.state_dict():
        if name in buffers:
            continue
        slots: dict[bool, tuple[str, str]] = {}
        for pattern, meta, kind in compiled:
            m = pattern.fullmatch(name)
            if not m:
                continue
            key = meta.format(**m.groupdict())
            if name.startswith("layers.") and name.endswith("ffn_norm.weight"):  # MoE layers and dense layers name their FFN norm differently
                if key.endswith("feed_forward.norm.weight") != (int(m["i"]) in moe_layers):
                    continue
            slots.setdefault(kind == "eDF_up", (key, kind))  # the first rule is the published name
        assert slots, f"no Meta rule for parameter {name}"
        plan += [(name, key, kind) for key, kind in slots.values()]
    return plan


def _split(t: torch.Tensor, kind: str, n: int, dim: int, what: str) -> list[torch.Tensor]:
    if t.shape[dim] % n:
        raise ValueError(f"{what}: dim {dim} of shape {list(t.shape)} does not split over {n} model-parallel ranks")
    return list(t.chunk(n, dim))


def meta_shards(model, model_parallel: int = 1) -> list[dict[str, torch.Tensor]]:
    """Each rank's `consolidated.NN.pth` contents: the inverse of `meta.load_meta`'s assembly."""
    n, cfg = model_parallel, model.config.text
    sd = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    qkv: dict[str, dict[str, list[torch.Tensor]]] = {}
    fc1: dict[str, dict[str, list[torch.Tensor]]] = {}
    E, D = cfg.num_local_experts, cfg.hidden_size
    for ours, key, kind in _rules(model):
        t = sd[ours].detach()
        if kind in ("rep", "rep_T"):
            parts = [(t.T if kind == "rep_T" else t).contiguous()] * n
        elif kind in ("col", "row"):
            parts = _split(t, kind, n, 0 if kind == "col" else -1, ours)
        elif kind in ("q", "k", "v"):
            if cfg.num_key_value_heads % n:
                raise ValueError(f"{n} model-parallel ranks do not divide num_key_value_heads="
                                 f"{cfg.num_key_value_heads}")
            qkv.setdefault(key, {})[kind] = _split(t, kind, n, 0, ours)
            continue
        elif kind in ("gate", "up"):
            fc1.setdefault(key, {})[kind] = _split(t, kind, n, 0, ours)
            continue
        elif kind in ("eDF_gate", "eDF_up"):
            half = t.chunk(2, dim=-1)[kind == "eDF_up"]
            parts = [x.reshape(E * D, -1) for x in _split(half, kind, n, -1, ours)]
        elif kind == "eFD":
            parts = [x.reshape(-1, D) for x in _split(t, kind, n, 1, ours)]
        else:
            raise AssertionError(kind)
        for r in range(n):
            shards[r][key] = parts[r].contiguous()
    for key, d in qkv.items():
        for r in range(n):
            shards[r][key] = torch.cat([d["q"][r], d["k"][r], d["v"][r]]).contiguous()
    for key, d in fc1.items():
        for r in range(n):
            shards[r][key] = torch.cat([d["gate"][r], d["up"][r]]).contiguous()
    return shards


def save_meta(model, path: str | os.PathLike, *, model_parallel: int = 1) -> Path:
    """Write `model` in Meta's original layout, split over `model_parallel` ranks, atomically."""
    from .hf import ROUTING_BIAS
    from .side_files import resolve_tokenizer

    if model_parallel < 1:
        raise ValueError(f"model_parallel={model_parallel}: expected >= 1")
    biased = [k for k, v in model.state_dict().items() if ROUTING_BIAS.fullmatch(k) and v.any()]
    if biased:
        raise ValueError(f"the model carries a routing bias ({biased[0]}, ...) that Meta's format has no field "
                         f"for; llama-models would route differently. Fold it or train without it first")
    params = params_from_config(model.config)
    files = {"params.json": (json.dumps(params, indent=2) + "\n").encode()}
    for r, shard in enumerate(meta_shards(model, model_parallel)):
        files[f"consolidated.{r:02d}.pth"] = lambda f, s=shard: torch.save(s, f)
    tok = resolve_tokenizer(model, None)
    if tok is not None and tok.path.suffix == ".model":
        files["tokenizer.model"] = Path(tok.path).read_bytes()  # Meta ships the tiktoken ranks
    write_checkpoint(path, files, supersedes=lambda name: name == "params.json" or name.endswith(".pth"))
    log.info("%s: wrote Meta checkpoint (%d model-parallel shard(s))", path, model_parallel)
    return Path(path)
