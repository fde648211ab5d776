"""Parameter counts, KV-cache sizes by layer kind and byte formatting, computed from a config alone."""

from __future__ import annotations

from .config import Llama4Config, VisionConfig


def _vision_params(v: VisionConfig, text_hidden: int) -> int:
    d, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    n = v.num_channels * v.patch_size**2 * d  # unfold patch embedding (no bias)
    n += d + (patches + 1) * d  # class token + positional embedding
    n += 2 * 2 * d  # pre / post LayerNorm
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
    n += v.num_hidden_layers * layer
    # adapter MLP: HF sizes fc1's input by `intermediate_size` (= the pixel-shuffled width in every release)
    n += i * v.projector_input_dim + v.projector_output_dim * v.projector_output_dim
    n += v.vision_output_dim * text_hidden + (text_hidden if v.multi_modal_projector_bias else 0)
    return n


def parameter_counts(cfg: Llama4Config) -> dict[str, int]:
    """`total`: every parameter in the HF layout (vision tower included); `active`: the text
    parameters one token uses (embeddings and lm_head in full, top-k of the routed experts)."""
    t = cfg.text
    D, hd = t.hidden_size, t.head_dim
    attn = D * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    if t.attention_bias:
        attn += hd * (t.num_attention_heads + 2 * t.num_key_value_heads) + D
    swiglu = lambda f: 3 * D * f  # noqa: E731
    total = active = 0
    for i in range(t.num_hidden_layers):
        base = attn + 2 * D
        if t.is_moe(i):
            shared = t.num_local_experts * D + swiglu(t.intermediate_size)  # router + shared expert
            total += base + shared + t.num_local_experts * swiglu(t.intermediate_size)
            active += base + shared + t.num_experts_per_tok * swiglu(t.intermediate_size)
        else:
            total += base + swiglu(t.intermediate_size_mlp)
            active += base + swiglu(t.intermediate_size_mlp)
    emb = t.vocab_size * D * (1 if t.tie_word_embeddings else 2) + D
    total += emb
    active += emb
    if cfg.vision is not None:
        total += _vision_params(cfg.vision, D)
    return {"total": total, "active": active}


# Bytes per cached element by KV dtype; fp8 / int8 add one bf16 scale per head_dim elements (kv/quant.py).
KV_ELEMENT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}


def kv_element_bytes(kv_dtype: str, head_dim: int) -> float:
    """Stored bytes per cached element of `kv_dtype`, scales included (what the KV stores allocate)."""
    if kv_dtype not in KV_ELEMENT_BYTES:
        raise ValueError(f"KV dtype {kv_dtype!r} is not one of {sorted(KV_ELEMENT_BYTES)}")
    return KV_ELEMENT_BYTES[kv_dtype] + (2 / head_dim if kv_dtype in ("fp8", "int8") else 0)


def kv_bytes_per_token(cfg: Llama4Config, dtype_bytes: float = 2, global_bytes: float | None = None) -> dict[str, float]:
    """KV-cache bytes one token costs, by layer kind (keys + values, all layers of that kind);
    `global_bytes` per element of the global layers when their KV dtype differs (fp8 / int8 KV)."""
    t = cfg.text
    per_elem = 2 * t.num_key_value_heads * t.head_dim
    local = sum(t.is_chunked(i) for i in range(t.num_hidden_layers))
    gb = dtype_bytes if global_bytes is None else global_bytes
    return {"local": local * per_elem * dtype_bytes, "global": (t.num_hidden_layers - local) * per_elem * gb}


def kv_cache_bytes(cfg: Llama4Config, context: int, dtype_bytes: float = 2,
                   global_bytes: float | None = None) -> dict[str, float]:
    """KV-cache bytes for `context` tokens: local layers hold at most one chunk, global layers all."""
    per = kv_bytes_per_token(cfg, dtype_bytes, global_bytes)
    chunk = cfg.text.attention_chunk_size or context
    local = per["local"] * min(context, chunk)
    glob = per["global"] * context
    return {"local": local, "global": glob, "total": local + glob}


def bytes_human(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or suffix == "PiB":
            return f"{n:.4g} {suffix}"
        n /= 1024
    return f"{n} B"


# Quantized weight memory (`llama4 inspect`) ---------------------------------------------------------

# Usable memory of common accelerators, in bytes (marketing GB; H100/A100 "80GB" are 80 GiB parts).
DEVICES = [("RTX 4090 24GB", 24 * 2**30), ("L40S 48GB", 48 * 2**30), ("H100 80GB", 80 * 2**30),
           ("H200 141GB", 141 * 10**9)]


def _bytes_per_param(scheme: str, group_size: int, in_features: int) -> float:
    """Stored bytes per weight of a scheme, scales included (fp32, one per row or per group)."""
    if scheme == "bf16":
        return 2.0
    if scheme == "int4":
        return 0.5 + 4 / group_size
    return 1.0 + 4 / in_features  # int8, fp8: one fp32 scale per output row


def quantized_weight_bytes(cfg: Llama4Config, scheme: str, only: str = "experts", group_size: int = 128) -> dict[str, int]:
    """Weight bytes with the routed experts (`only="experts+shared"`: and the shared experts, Meta's
    int4_mixed; `"all"`: and every decoder linear but the router) stored in `scheme` ("bf16", "int8", "int4", "fp8") and everything else in bf16, as `llama4 quantize` writes."""
    t = cfg.text
    D, hd = t.hidden_size, t.head_dim
    experts = shared = linears = 0
    attn = D * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    for i in range(t.num_hidden_layers):
        linears += attn
        if t.is_moe(i):
            experts += t.num_local_experts * 3 * D * t.intermediate_size
            shared += 3 * D * t.intermediate_size
        else:
            linears += 3 * D * t.intermediate_size_mlp
    total = parameter_counts(cfg)["total"]
    q_params = experts + {"experts": 0, "experts+shared": shared, "all": shared + linears}[only]
    q_bytes = int(q_params * _bytes_per_param(scheme, group_size, D))
    rest = (total - q_params) * 2
    return {"quantized_params": q_params, "quantized": q_bytes, "rest": rest, "total": q_bytes + rest}


def fits_on(nbytes: int) -> str:
    """'1xH100 80GB' style: the fewest devices of each kind that hold `nbytes` of weights (no KV cache,
    activations or framework overhead counted)."""
    out = []
    for name, cap in DEVICES:
        n = -(-nbytes // cap)
        if n <= 8:
            out.append(f"{n}x{name}")
    return ", ".join(out) if out else "more than 8 of any listed device"
