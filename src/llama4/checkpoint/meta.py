"""Meta's original checkpoint format: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Meta's names differ from ours, several tensors are fused (`attention.wqkv` = q|k|v, the dense FFN's
`mlp.fc1_weight` = gate|up), and the experts are stored flattened (`moe_w_in_eD_F` is [E*D, F]).
Each rank's file holds its slice of every sharded tensor: column-parallel weights on dim 0,
row-parallel ones on the last dim, experts on their F dim; norms and the router are replicated.
Fused tensors are fused *per rank*, so each rank's slice is split before the ranks are joined.
These rules follow llama-models (`llama_models/checkpoint.py:reshard_mp` and the load hooks in
`llama_models/llama4/`), which is what reads these files at Meta.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import torch

from ..config import Llama4Config, TextConfig, VisionConfig
from ..config_checks import (BOOL, BOOL_OR_INT, DICT, NUMBER, POS_INT, POS_NUMBER, RATIO, Rule, check_fields,
                             is_int, optional)
from ..model import Llama4
from .keymap import compile_template

log = logging.getLogger("llama4")

# (our parameter, Meta's key, how the ranks split it). Rules that fill the same parameter are
# alternatives, tried in order: the published files use the fused names, llama-models' own
# `state_dict()` the plain ones. `{i}` is a layer index, `{p}` is `weight` or `bias`.
#   rep: replicated on every rank        col: split on dim 0        row: split on the last dim
#   rep_T: replicated, stored transposed (the router is [D, E])
#   q / k / v: a part of the per-rank fused wqkv     gate / up: a half of the per-rank fused fc1
#   eDF_gate / eDF_up: experts [E, D, F/ranks] filling the gate or up half of our [E, D, 2F]
#   eFD: experts [E, F/ranks, D]
_L = "layers.{i}."
_FF = _L + "feed_forward."
TEXT_RULES = [
    ("tok_embeddings.weight", "tok_embeddings.weight", "col"),  # vocab-parallel: split on the vocab
    ("norm.weight", "norm.weight", "rep"),
    ("output.weight", "output.weight", "col"),
    (_L + "attention_norm.weight", _L + "attention.wqkv.layer_norm_weight", "rep"),
    (_L + "attention_norm.weight", _L + "attention_norm.weight", "rep"),
    (_L + "attention.wq.weight", _L + "attention.wqkv.weight", "q"),
    (_L + "attention.wk.weight", _L + "attention.wqkv.weight", "k"),
    (_L + "attention.wv.weight", _L + "attention.wqkv.weight", "v"),
    (_L + "attention.wq.weight", _L + "attention.wq.weight", "col"),
    (_L + "attention.wk.weight", _L + "attention.wk.weight", "col"),
    (_L + "attention.wv.weight", _L + "attention.wv.weight", "col"),
    (_L + "attention.wo.weight", _L + "attention.wo.weight", "row"),
    (_L + "ffn_norm.weight", _FF + "norm.weight", "rep"),  # MoE layers
    (_L + "ffn_norm.weight", _FF + "mlp.layer_norm_weight", "rep"),  # dense layers
    (_L + "ffn_norm.weight", _L + "ffn_norm.weight", "rep"),
    # MoE
    (_FF + "router.weight", _FF + "router_DE", "rep_T"),
    (_FF + "experts.gate_up_proj", _FF + "experts.moe_w_in_eD_F", "eDF_gate"),
    (_FF + "experts.gate_up_proj", _FF + "experts.moe_w_swiglu_eD_F", "eDF_up"),
    (_FF + "experts.down_proj", _FF + "experts.moe_w_out_eF_D", "eFD"),
    (_FF + "experts.gate_up_proj", _FF + "experts.w1", "eDF_gate"),
    (_FF + "experts.gate_up_proj", _FF + "experts.w3", "eDF_up"),
    (_FF + "experts.down_proj", _FF + "experts.w2", "eFD"),
    (_FF + "shared_expert.w1.weight", _FF + "w_in_shared_FD.weight", "col"),
    (_FF + "shared_expert.w3.weight", _FF + "w_swiglu_FD.weight", "col"),
    (_FF + "shared_expert.w2.weight", _FF + "w_out_shared_DF.weight", "row"),
    (_FF + "shared_expert.w1.weight", _FF + "shared_expert.w1.weight", "col"),
    (_FF + "shared_expert.w3.weight", _FF + "shared_expert.w3.weight", "col"),
    (_FF + "shared_expert.w2.weight", _FF + "shared_expert.w2.weight", "row"),
    # dense FFN
    (_FF + "w1.weight", _FF + "mlp.fc1_weight", "gate"),
    (_FF + "w3.weight", _FF + "mlp.fc1_weight", "up"),
    (_FF + "w2.weight", _FF + "mlp.fc2_weight", "row"),
    (_FF + "w1.weight", _FF + "w1.weight", "col"),
    (_FF + "w3.weight", _FF + "w3.weight", "col"),
    (_FF + "w2.weight", _FF + "w2.weight", "row"),
]

_VE = "vision_embeddings.vision_encoder."
_VB = _VE + "transformer.resblocks.{i}."
VISION_RULES = [
    ("vision.patch_embed.weight", _VE + "conv1._linear.weight", "col"),
    ("vision.class_embedding", _VE + "class_embedding", "rep"),
    ("vision.positional_embedding", _VE + "positional_embedding_vlm", "rep"),
    ("vision.layernorm_pre.{p}", _VE + "ln_pre.{p}", "rep"),
    ("vision.layernorm_post.{p}", _VE + "ln_post.{p}", "rep"),
    ("vision.layers.{i}.attention_norm.{p}", _VB + "ln_1.{p}", "rep"),
    ("vision.layers.{i}.ffn_norm.{p}", _VB + "ln_2.{p}", "rep"),
    ("vision.layers.{i}.attention.wq.{p}", _VB + "attn.wq.{p}", "col"),
    ("vision.layers.{i}.attention.wk.{p}", _VB + "attn.wk.{p}", "col"),
    ("vision.layers.{i}.attention.wv.{p}", _VB + "attn.wv.{p}", "col"),
    ("vision.layers.{i}.attention.wo.weight", _VB + "attn.wo.weight", "row"),
    ("vision.layers.{i}.attention.wo.bias", _VB + "attn.wo.bias", "rep"),  # added once, after the reduce
    ("vision.layers.{i}.fc1.{p}", _VB + "mlp.c_fc.{p}", "col"),
    ("vision.layers.{i}.fc2.weight", _VB + "mlp.c_proj.weight", "row"),
    ("vision.layers.{i}.fc2.bias", _VB + "mlp.c_proj.bias", "rep"),
    ("vision.adapter_fc1.weight", "vision_embeddings.vision_adapter.mlp.c_fc.weight", "col"),
    ("vision.adapter_fc2.weight", "vision_embeddings.vision_adapter.mlp.c_proj.weight", "row"),
    ("vision.projector.weight", "vision_projection.weight", "col"),
]

# Keys that carry no weights: precomputed RoPE tables, TransformerEngine state, routing statistics.
_IGNORED = re.compile(r"rope\.freqs|freq_cis|.*\._extra_state|.*\.(global_gate_stats_3E|running_gate_stats_3E|"
                      r"expert_activation_DE)")


# params.json -> config ----------------------------------------------------------------------------

_MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "ffn_exp", "norm_eps", "attention_chunk_size", "rope_theta", "use_scaled_rope",
               "rope_scaling_factor", "rope_high_freq_factor", "nope_layer_interval", "use_qk_norm",
               "attn_temperature_tuning", "floor_scale", "attn_scale", "vision_args", "moe_args",
               "quantization_args", "lora_args", "max_batch_size", "max_seq_len"}


# llama-models' pydantic ModelArgs types, checked before any arithmetic: `ffn_exp: "2"` would otherwise
# repeat a string `dim` times and size a tensor from it.
_PARAM_RULES = {
    "dim": POS_INT, "n_layers": POS_INT, "n_heads": POS_INT, "n_kv_heads": optional(POS_INT),
    "head_dim": optional(POS_INT),
    "vocab_size": optional(Rule("a positive integer, or -1 (ask the tokenizer)", lambda v: is_int(v) and (v > 0 or v == -1))),
    "multiple_of": POS_INT, "ffn_dim_multiplier": optional(POS_NUMBER), "ffn_exp": optional(POS_NUMBER),
    "norm_eps": POS_NUMBER, "attention_chunk_size": optional(POS_INT), "rope_theta": POS_NUMBER,
    "use_scaled_rope": BOOL, "rope_scaling_factor": optional(POS_NUMBER), "rope_high_freq_factor": optional(POS_NUMBER),
    "nope_layer_interval": optional(POS_INT), "use_qk_norm": BOOL, "attn_temperature_tuning": BOOL_OR_INT,
    "floor_scale": POS_NUMBER, "attn_scale": NUMBER, "max_batch_size": POS_INT, "max_seq_len": POS_INT,
    **{name: optional(DICT) for name in ("moe_args", "vision_args", "quantization_args", "lora_args")},
}
_MOE_RULES = {"num_experts": POS_INT, "capacity_factor": POS_NUMBER, "auto_scale_F": BOOL, "top_k": POS_INT,
              "interleave_moe_layer_step": POS_INT}
_VISION_RULES = {"dim": POS_INT, "n_layers": POS_INT, "n_heads": POS_INT, "mlp_ratio": POS_NUMBER,
                 "output_dim": POS_INT, "pixel_shuffle_ratio": RATIO}


def check_params(params: dict, where: str = "params.json") -> dict:
    """Type- and range-check Meta's params.json field by field; returns the model arguments."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(params).__name__}")
    p = params.get("model", params)  # some releases nest the arguments under "model"
    if not isinstance(p, dict):
        raise ValueError(f"{where}: model must be an object of model arguments, got {type(p).__name__}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in p]
    if missing:
        raise ValueError(f"{where}: required fields {missing} are missing")
    check_fields(p, _PARAM_RULES, where)
    if p.get("moe_args"):
        check_fields(p["moe_args"], _MOE_RULES, f"{where}: moe_args")
    if p.get("vision_args"):
        check_fields(p["vision_args"], _VISION_RULES, f"{where}: vision_args")
    return p


def dense_hidden(p: dict) -> int:
    """The dense FFN width, exactly as llama-models' TransformerBlock computes it (ffn_exp is not used)."""
    hidden = int(2 * int(4 * p["dim"]) / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    m = p.get("multiple_of", 256)
    return m * ((hidden + m - 1) // m)


def expert_hidden(p: dict, moe: dict, where: str) -> int:
    """Each expert's width, exactly as llama-models' MoE computes it."""
    for name in ("ffn_exp", "ffn_dim_multiplier"):
        if p.get(name) is None:
            raise ValueError(f"{where}: MoE models need {name!r} to size the experts (llama-models computes "
                             f"int({name} * ...)), but it is missing")
    hidden = int(2 * int(p["ffn_exp"] * p["dim"]) / 3)
    hidden = int(p["ffn_dim_multiplier"] * hidden)
    if moe.get("auto_scale_F", True):
        # Keep the activated parameters equal to a dense layer's: the shared expert plus capacity_factor routed.
        hidden = int(hidden / (moe.get("capacity_factor", 1.0) + 1))
    return hidden + (-hidden % p.get("multiple_of", 256))


def _rope_scaling(p: dict) -> dict | None:
    if not p.get("use_scaled_rope", False):
        return None
    # llama-models fixes low_freq_factor and the original context; the rest default to Scout's values.
    factor = p.get("rope_scaling_factor")
    high = p.get("rope_high_freq_factor")
    return {"rope_type": "llama3", "factor": float(16 if factor is None else factor), "low_freq_factor": 1.0,
            "high_freq_factor": float(1 if high is None else high), "original_max_position_embeddings": 8192}


def _vision_from_params(v: dict, where: str) -> VisionConfig:
    missing = sorted({"image_size", "patch_size", "dim", "n_layers", "n_heads", "mlp_ratio", "output_dim",
                      "pixel_shuffle_ratio"} - set(v))
    if missing:
        raise ValueError(f"{where}: vision_args is missing {missing}")
    sizes = {}
    for name in ("image_size", "patch_size"):
        s = v[name]
        if not isinstance(s, dict) or s.get("height") != s.get("width") or not POS_INT.ok(s.get("height")):
            raise ValueError(f"{where}: vision_args.{name}={s!r}: expected a square {{height, width}} of "
                             f"positive integers")
        sizes[name] = int(s["height"])
    mlp = int(v["mlp_ratio"] * v["dim"])
    shuffled = int(v["dim"] // v["pixel_shuffle_ratio"] ** 2)
    if mlp != shuffled:
        # Our encoder (like transformers') sizes both the ViT MLP and the adapter's input by intermediate_size.
        raise ValueError(f"{where}: vision_args gives an MLP width int(mlp_ratio * dim) = {mlp} but a pixel-shuffled "
                         f"width dim / pixel_shuffle_ratio**2 = {shuffled}; this implementation needs them equal")
    out = int(v["output_dim"])
    return VisionConfig(hidden_size=int(v["dim"]), intermediate_size=mlp, num_hidden_layers=int(v["n_layers"]),
                        num_attention_heads=int(v["n_heads"]), image_size=sizes["image_size"],
                        patch_size=sizes["patch_size"], pixel_shuffle_ratio=float(v["pixel_shuffle_ratio"]),
                        projector_input_dim=out, projector_output_dim=out, vision_output_dim=out)


def config_from_params(params: dict, where: str = "params.json", vocab_size: int | None = None) -> Llama4Config:
    """Our config from Meta's `params.json` (llama-models' ModelArgs). `vocab_size` is used when the
    file leaves it out or gives -1 (llama-models then asks the tokenizer)."""
    p = check_params(params, where)
    unknown = sorted(set(p) - _MODEL_ARGS)
    if unknown:  # llama-models ignores them too
        log.warning("%s: ignoring fields unknown to llama-models' ModelArgs: %s", where, unknown)
    for name in ("quantization_args", "lora_args"):
        extra = p.get(name)
        if extra and (name == "lora_args" or extra.get("scheme")):
            raise ValueError(f"{where}: {name}={extra!r} is not supported (expected a plain bf16/fp32 checkpoint)")
    dim, n_heads = p["dim"], p["n_heads"]
    n_kv = p.get("n_kv_heads") or n_heads
    if dim % n_heads:
        raise ValueError(f"{where}: dim={dim} is not a multiple of n_heads={n_heads}")
    head_dim = dim // n_heads  # llama-models' attention always uses dim // n_heads
    if p.get("head_dim") not in (None, head_dim):
        raise ValueError(f"{where}: head_dim={p['head_dim']} contradicts dim // n_heads = {head_dim}, which is what "
                         f"llama-models' attention uses")
    vocab = p.get("vocab_size", -1)
    if vocab in (None, -1):
        vocab = vocab_size
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{where}: vocab_size={p.get('vocab_size')!r}: expected a positive int")

    n = p["n_layers"]
    moe = p.get("moe_args")
    dense = dense_hidden(p)
    if moe:
        if moe.get("num_experts", -1) <= 0:
            raise ValueError(f"{where}: moe_args.num_experts={moe.get('num_experts')!r}: expected a positive int")
        moe_kw = dict(intermediate_size=expert_hidden(p, moe, where), num_local_experts=moe["num_experts"],
                      num_experts_per_tok=moe.get("top_k", 1),
                      interleave_moe_layer_step=moe.get("interleave_moe_layer_step", 1))
        # The published configs have no context length; as transformers' converter: 16 experts (Scout) 10M,
        # 128 (Maverick) 1M.
        context = 10485760 if moe["num_experts"] == 16 else 1048576
    else:
        moe_kw = dict(intermediate_size=dense, num_local_experts=0, moe_layers=[])
        context = 8192
    interval = p.get("nope_layer_interval")
    no_rope = [0 if interval and (i + 1) % interval == 0 else 1 for i in range(n)]
    text = TextConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=n, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        head_dim=head_dim, intermediate_size_mlp=dense, no_rope_layers=no_rope,
        no_rope_layer_interval=interval or n + 1, attention_chunk_size=p.get("attention_chunk_size"),
        use_qk_norm=bool(p.get("use_qk_norm", False)),
        attn_temperature_tuning=bool(p.get("attn_temperature_tuning", False)),
        floor_scale=float(p.get("floor_scale", 8192.0)), attn_scale=float(p.get("attn_scale", 0.1)),
        rope_theta=float(p.get("rope_theta", 500000.0)), rope_scaling=_rope_scaling(p),
        max_position_embeddings=context, rms_norm_eps=float(p.get("norm_eps", 1e-5)), **moe_kw)
    vision = _vision_from_params(p["vision_args"], where) if p.get("vision_args") else None
    return Llama4Config(text, vision, name=Path(str(where)).parent.name)


# Shards --------------------------------------------------------------------------------------------

def _shard_files(root: Path) -> list[Path]:
    numbered = {int(m.group(1)): f for f in root.glob("consolidated.*.pth")
                if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name))}
    if not numbered:
        single = root / "consolidated.pth"
        if single.exists():
            return [single]
        raise FileNotFoundError(f"{root}: params.json but no consolidated.NN.pth (or consolidated.pth) files")
    gaps = [f"consolidated.{r:02d}.pth" for r in range(max(numbered) + 1) if r not in numbered]
    if gaps:
        raise FileNotFoundError(f"{root}: model-parallel shards {gaps} are missing (found ranks {sorted(numbered)})")
    return [numbered[r] for r in range(len(numbered))]


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # TransformerEngine keeps `_extra_state` as BytesIO objects; allow exactly that class.
        with torch.serialization.safe_globals([io.BytesIO]):
            sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # torch raises a mix of RuntimeError / UnpicklingError / OSError here
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    out = {}
    for key, value in sd.items():
        if _IGNORED.fullmatch(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, expected a tensor")
        out[key] = value
    return out


# Assembling one tensor from its per-rank slices ---------------------------------------------------

def _pieces(kind: str, parts: list[torch.Tensor], t: TextConfig) -> tuple[list[torch.Tensor], int]:
    """Our tensor (or our half of it) as pieces laid side by side along a dim: the ranks' slices with
    the per-rank fusions undone and Meta's expert flattening reshaped. Views only, nothing is read, so
    the same code checks shapes on meta tensors and then copies each piece straight into place."""
    n = len(parts)
    if kind in ("rep", "rep_T"):
        return [parts[0].T if kind == "rep_T" else parts[0]], 0
    if kind in ("col", "row"):
        return parts, 0 if kind == "col" else -1
    if kind in ("q", "k", "v"):
        heads = {"q": t.num_attention_heads, "k": t.num_key_value_heads, "v": t.num_key_value_heads}
        if t.num_key_value_heads % n:
            raise ValueError(f"{n} ranks do not divide num_key_value_heads={t.num_key_value_heads} (llama-models "
                             f"repeats kv heads then; not supported)")
        sizes = [heads[c] // n * t.head_dim for c in "qkv"]
        if parts[0].shape[0] != sum(sizes):
            raise ValueError(f"each rank's slice has {parts[0].shape[0]} rows, expected q|k|v = {sizes} "
                             f"for {n} rank(s)")
        return [x.split(sizes, dim=0)["qkv".index(kind)] for x in parts], 0
    if kind in ("gate", "up"):
        return [x.chunk(2, dim=0)[kind == "up"] for x in parts], 0
    E, D = t.num_local_experts, t.hidden_size
    if parts[0].numel() % (E * D):
        raise ValueError(f"each rank's slice has shape {list(parts[0].shape)}, not E*D*k for E={E} experts, D={D}")
    if kind in ("eDF_gate", "eDF_up"):
        return [x.reshape(E, D, -1) for x in parts], -1
    if kind == "eFD":
        return [x.reshape(E, -1, D) for x in parts], 1
    raise AssertionError(kind)


def _copy_pieces(dest: torch.Tensor, pieces: list[torch.Tensor], dim: int) -> None:
    offset = 0
    for piece in pieces:
        dest.narrow(dim, offset, piece.shape[dim]).copy_(piece)
        offset += piece.shape[dim]


def _target(param: torch.Tensor, kind: str) -> torch.Tensor:
    """The part of our parameter a rule fills: gate|up share our last dim."""
    if kind in ("eDF_gate", "eDF_up"):
        return param.chunk(2, dim=-1)[kind == "eDF_up"]
    return param


def _plan(model: Llama4, keys: set[str], root: Path) -> list[tuple[str, str, str]]:
    """(ours, Meta key, kind) for every part of every parameter; every checkpoint key used once."""
    rules = TEXT_RULES + (VISION_RULES if model.vision is not None else [])
    compiled = [(compile_template(o), m, k) for o, m, k in rules]
    plan, missing = [], []
    buffers = {name for name, _ in model.named_buffers()}  # routing state: Meta's format has none
    for name in model.state_dict():
        if name in buffers:
            continue
        found: dict[bool, tuple[str, str]] = {}  # slot (is-up-half?) -> (meta key, kind)
        wanted: dict[bool, str] = {}
        for pattern, meta, kind in compiled:
            m = pattern.fullmatch(name)
            if not m:
                continue
            slot = kind == "eDF_up"
            key = meta.format(**m.groupdict())
            wanted.setdefault(slot, key)
            if slot not in found and key in keys:
                found[slot] = (key, kind)
        assert wanted, f"no Meta rule for parameter {name}"
        for slot, key in wanted.items():
            if slot in found:
                plan.append((name, *found[slot]))
            else:
                missing.append(key)
    if missing:
        raise ValueError(f"{root}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
    unused = sorted(keys - {k for _, k, _ in plan})
    if unused:
        raise ValueError(f"{root}: {len(unused)} unexpected tensors not used by params.json's model, e.g. "
                         f"{unused[:3]}")
    return plan


def load_meta(root: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama4:
    """Load Meta's original format (`params.json` + `consolidated.NN.pth`, sharded by model-parallel rank)."""
    root = Path(root)
    params_file = root / "params.json"
    if not params_file.exists():
        raise FileNotFoundError(f"{params_file}: no params.json (expected Meta's original checkpoint layout)")
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{params_file}: not valid JSON ({e})") from None
    check_params(params, str(params_file))  # before any shard is read
    files = _shard_files(root)
    shards = [_read_shard(f) for f in files]
    for f, sd in zip(files[1:], shards[1:]):
        if sd.keys() != shards[0].keys():
            diff = sorted(sd.keys() ^ shards[0].keys())
            raise ValueError(f"{f}: its tensors differ from {files[0].name}'s, e.g. {diff[:3]} is in only one")
    emb = [sd["tok_embeddings.weight"].shape[0] for sd in shards if "tok_embeddings.weight" in sd]
    cfg = config_from_params(params, str(params_file), vocab_size=sum(emb) if emb else None)
    t = cfg.text

    with torch.device("meta"):
        model = Llama4(cfg)
    plan = _plan(model, set(shards[0]), root)
    expected = model.state_dict()
    for ours, key, kind in plan:  # shapes first, on meta tensors: nothing is read or allocated yet
        slices = [torch.empty(sd[key].shape, device="meta") for sd in shards]
        want = tuple(_target(expected[ours], kind).shape)
        try:
            pieces, dim = _pieces(kind, slices, t)
            got = tuple(torch.cat(pieces, dim).shape)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{files[0]}: tensor {key!r}: {e}") from None
        if got != want:
            hint = ""
            if kind != "rep" and math.prod(want) % math.prod(got) == 0 and math.prod(want) > math.prod(got):
                hint = f" (only {math.prod(got) / math.prod(want):.3g} of it: are model-parallel shards missing?)"
            raise ValueError(f"{files[0]}: tensor {key!r} ({len(files)} shard(s) of {list(shards[0][key].shape)}) "
                             f"gives shape {list(got)} but params.json implies {list(want)} for {ours}{hint}")

    if dtype is None:
        dtype = shards[0][plan[0][1]].dtype
    model = model.to(dtype=dtype).to_empty(device=device)
    params_now = model.state_dict()
    with torch.no_grad():
        for ours, key, kind in plan:
            slices = [sd[key] for sd in shards]
            if kind.startswith("rep"):
                for f, other in zip(files[1:], slices[1:]):
                    if not torch.equal(other, slices[0]):
                        raise ValueError(f"{f}: replicated tensor {key!r} differs from {files[0].name}'s copy")
            _copy_pieces(_target(params_now[ours], kind), *_pieces(kind, slices, t))
    model.reset_buffers()
    log.info("%s: loaded Meta checkpoint (%d model-parallel shard(s))", root, len(files))
    return model.eval()
