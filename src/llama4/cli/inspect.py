"""`llama4 inspect`: a config's layer kinds, parameter counts and KV-cache sizes by layer kind."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..accounting import (bytes_human, fits_on, kv_bytes_per_token, kv_cache_bytes, kv_element_bytes, parameter_counts,
                          quantized_weight_bytes)
from ..config import PRESETS, load_config, preset
from .common import positive_int, token_count


def _load_config_or_preset(spec: str):
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").exists() and (path / "params.json").exists():
        return _meta_config(path)
    if path.exists():
        return load_config(spec)
    raise SystemExit(f"llama4: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


def _meta_config(root: Path):
    """Meta's original layout: params.json (its vocab_size may be -1, meaning the tokenizer's: Llama 4's)."""
    import json

    from ..checkpoint.meta import config_from_params

    f = root / "params.json"
    try:
        params = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return config_from_params(params, str(f), vocab_size=202048)


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _load_config_or_preset(args.model)
    t = cfg.text
    n = t.num_hidden_layers
    local = [i for i in range(n) if t.is_chunked(i)]
    glob = [i for i in range(n) if not t.is_chunked(i)]
    moe = [i for i in range(n) if t.is_moe(i)]
    counts = parameter_counts(cfg)
    print(f"model            {cfg.name or args.model}  ({cfg.architecture})")
    print(f"layers           {n}: {len(local)} local (RoPE, chunk {t.attention_chunk_size}), "
          f"{len(glob)} global (NoPE{', temperature-tuned' if t.attn_temperature_tuning else ''})")
    print(f"  global layers  {glob}")
    print(f"ffn              {len(moe)} MoE layers ({t.num_local_experts} experts, top-{t.num_experts_per_tok} "
          f"+ shared, F={t.intermediate_size}), {n - len(moe)} dense (F={t.intermediate_size_mlp})")
    print(f"attention        D={t.hidden_size}, {t.num_attention_heads} heads / {t.num_key_value_heads} kv heads, "
          f"head_dim={t.head_dim}, qk-norm={'on' if t.use_qk_norm else 'off'}")
    rs = t.rope_scaling
    print(f"rope             theta={t.rope_theta:g}" + (f", {rs.get('rope_type')} scaling x{rs.get('factor')}"
                                                        if rs else ", no scaling"))
    print(f"context          {t.max_position_embeddings:,} tokens; vocab {t.vocab_size:,}")
    if cfg.vision is not None:
        v = cfg.vision
        print(f"vision           ViT {v.num_hidden_layers} layers, D={v.hidden_size}, {v.image_size}px tiles, "
              f"patch {v.patch_size}, {v.tokens_per_tile} tokens/tile")
    print(f"parameters       total {counts['total']:,}  active {counts['active']:,}")
    print_routing_bias(Path(args.model))
    print_stored(args.model)
    print_quantized_memory(cfg)
    # --kv-dtype fp8/int8 is the global layers' dtype (llama4.kv.quant); local layers keep --kv-bytes.
    gb = kv_element_bytes(args.kv_dtype, t.head_dim) if args.kv_dtype else None
    per = kv_bytes_per_token(cfg, args.kv_bytes, gb)
    kind = f"{args.kv_bytes}-byte elements" + (f", global layers {args.kv_dtype} ({gb:.4g} bytes with scales)"
                                              if gb is not None else "")
    print(f"kv-cache/token   local layers {bytes_human(per['local'])}, global layers {bytes_human(per['global'])} "
          f"({kind})")
    contexts = [args.context] if args.context else [8192, 131072, 1048576, t.max_position_embeddings]
    for ctx in sorted(set(contexts)):
        kv = kv_cache_bytes(cfg, ctx, args.kv_bytes, gb)
        naive = (per["local"] + per["global"]) * ctx
        print(f"kv-cache @{ctx:>11,}  local {bytes_human(kv['local']):>11}  global {bytes_human(kv['global']):>11}  "
              f"total {bytes_human(kv['total']):>11}  (naive {bytes_human(naive)})")
    return 0


def print_routing_bias(path: Path) -> None:
    """The warning a save with a routing bias records in config.json (checkpoint/hf.py: BIAS_KEY)."""
    import json

    from ..checkpoint.hf import BIAS_KEY

    f = path / "config.json" if path.is_dir() else path
    if f.is_file() and f.suffix == ".json":
        entry = json.loads(f.read_text()).get(BIAS_KEY)
        if isinstance(entry, dict):
            print(f"routing bias     layers {entry.get('layers')} ({entry.get('file')}): {entry.get('warning')}")


def stored_summary(spec: str) -> str:
    """What is on disk: the weight bytes per stored dtype (from the safetensors headers, nothing else is
    read) and the quantization scheme config.json declares."""
    from ..config import PRESETS

    path = Path(spec)
    if not path.is_dir():
        return f"preset {spec!r}: nothing on disk (figures below are computed)" if spec in PRESETS else \
            f"{path.name}: a config file, no weights"
    pth = sorted(path.glob("consolidated*.pth"))
    if pth and not any(path.glob("*.safetensors")):
        size = sum(f.stat().st_size for f in pth)
        return f"{size / 1e9:.2f} GB in {len(pth)} Meta .pth file(s) (dtypes are read when loading)"
    from ..checkpoint.quantized import quantization_config
    from ..checkpoint.safetensors_io import weight_files

    if not any(path.glob("*.safetensors")):
        return "no weight files (config only)"
    _, headers = weight_files(path)
    per: dict[str, int] = {}
    for header in headers.values():
        for key, info in header.items():
            if key != "__metadata__":
                a, b = info["data_offsets"]
                per[info["dtype"]] = per.get(info["dtype"], 0) + (b - a)
    total = sum(per.values())
    parts = ", ".join(f"{dt} {n / 1e9:.3g} GB ({n / total:.0%})" for dt, n in sorted(per.items(), key=lambda x: -x[1]))
    out = f"{total / 1e9:.3g} GB of tensors in {len(headers)} safetensors file(s): {parts or 'none'}"
    q = quantization_config(path)
    if q:
        out += f"; quantized: {describe_quantization(q)}"
    else:
        out += "; not quantized"
    return out


def describe_quantization(q: dict) -> str:
    """config.json's quantization_config in one phrase: method, format and each group's scheme."""
    method = q.get("quant_method", "?")
    groups = q.get("config_groups") or {}
    descr = []
    for g in groups.values():
        w = (g or {}).get("weights") or {}
        kind = f"{w.get('type', '?')}{w.get('num_bits', '?')} {w.get('strategy', '?')}"
        if w.get("strategy") == "group":
            kind += f" {w.get('group_size')}"
        targets = g.get("targets", [])
        descr.append(f"{kind} on {', '.join(map(str, targets))[:60]}")
    fmt = q.get("format")
    head = method + (f" ({fmt})" if fmt else "")
    return head + (": " + "; ".join(descr) if descr else "")


def print_stored(spec: str) -> None:
    print(f"stored           {stored_summary(spec)}")


def print_quantized_memory(cfg) -> None:
    """Weight memory per quantization scheme (routed experts quantized, the rest bf16) and where it fits."""
    for scheme, only, label in [("bf16", "experts", "bf16"), ("fp8", "experts", "fp8 experts"),
                                ("int8", "experts", "int8 experts"), ("int4", "experts", "int4 experts (g128)"),
                                ("int4", "experts+shared", "int4 +shared (Meta)")]:
        b = quantized_weight_bytes(cfg, scheme, only)
        detail = f"  (experts {b['quantized'] / 1e9:.1f} GB + rest {b['rest'] / 1e9:.1f} GB bf16)" \
            if scheme != "bf16" else ""
        print(f"weights {label:<20} {b['total'] / 1e9:8.1f} GB{detail}")
        print(f"  fits on: {fits_on(b['total'])}")


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="config summary, parameter counts and KV-cache sizes")
    p.add_argument("model", help="checkpoint directory or preset name (tiny, scout, maverick, behemoth)")
    p.add_argument("--context", type=token_count, default=None, help="context length for the KV-cache figure (8192, 128k, 10M)")
    p.add_argument("--kv-bytes", type=positive_int, default=2, help="bytes per cached element (2 = bf16)")
    p.add_argument("--kv-dtype", choices=["bf16", "fp16", "fp8", "int8"], default=None,
                   help="the global layers' KV dtype (fp8 / int8: one byte per element plus a bf16 scale per head "
                        "vector); default: --kv-bytes for every layer")
    p.set_defaults(func=cmd_inspect)
