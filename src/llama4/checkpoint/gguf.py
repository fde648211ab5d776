"""HF / Meta / our model -> GGUF for llama.cpp, written with the `gguf` package (llama.cpp's own gguf-py).

The file is what llama.cpp's `convert_hf_to_gguf.py` writes for `Llama4ForCausalLM` (its `Llama4Model`:
architecture `llama4`, experts split into gate / up / down and transposed, no Q/K permutation, a
`rope_freqs` tensor for llama3 RoPE scaling, norms and the router kept in F32), written from our
parameters directly, so no transformers model is needed.

llama.cpp's `llama4` architecture hard-codes parts of the model (`src/models/llama4.cpp`): chunked
attention of 8192 tokens on 3 of every 4 layers (NoPE + global on every 4th), temperature tuning with
floor_scale 8192 and attn_scale 0.1, QK-norm exactly when the model has other than 128 experts, and
it needs experts. A model that differs would load and silently compute something else, so the export
refuses it and names the field (`gguf_problems`).

The tokenizer: llama.cpp picks its pre-tokenizer by name (`tokenizer.ggml.pre`). Its converter finds
the name by hashing a tokenized test string and refuses a BPE tokenizer whose hash it does not know,
which includes every tokenizer trained with `llama4 tokenizer train`. Ours all split text with Llama 4's
own regex (`text/tokenizer.py: SPLIT_PATTERN`), which llama.cpp implements as `llama4` (its GPT-4o
pre-tokenizer), so that is the name written, after checking the tokenizer.json's split pattern.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("llama4")

# llama.cpp src/models/llama4.cpp: `hparams.n_swa = 8192; n_attn_temp_floor_scale = 8192; f_attn_temp_scale = 0.1`
# and src/llama-hparams.h: `n_no_rope_layer_step = 4`.
LLAMACPP_FIXED = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1}
LLAMACPP_NOPE_STEP = 4
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_problems(cfg, *, allow_routing_bias: bool = False, model=None) -> list[str]:
    """Every reason llama.cpp would compute a different model than `cfg` (empty: the export is faithful)."""
    t = cfg.text
    out = []
    for name, want in LLAMACPP_FIXED.items():
        got = getattr(t, name)
        if got is None or float(got) != float(want):
            out.append(f"{name}={got!r} (llama.cpp's llama4 hard-codes {want})")
    if not t.attn_temperature_tuning:
        out.append("attn_temperature_tuning=False (llama.cpp always applies it)")
    n = t.num_hidden_layers
    pattern = [int((i + 1) % LLAMACPP_NOPE_STEP != 0) for i in range(n)]
    if t.no_rope_layers != pattern:
        out.append(f"no_rope_layers={t.no_rope_layers} (llama.cpp hard-codes NoPE on every {LLAMACPP_NOPE_STEP}th "
                   f"layer: {pattern})")
    if not t.num_local_experts or not t.moe_layers:
        out.append("a dense model (num_local_experts=0): llama.cpp's llama4 needs experts")
    else:
        step = t.interleave_moe_layer_step
        if t.moe_layers != list(range(step - 1, n, step)):
            out.append(f"moe_layers={t.moe_layers} (llama.cpp puts MoE on every interleave_moe_layer_step={step}th "
                       f"layer)")
        qk = t.num_local_experts != 128  # llama.cpp: use_kq_norm = type != 17B_128E
        if t.use_qk_norm != qk:
            out.append(f"use_qk_norm={t.use_qk_norm} with {t.num_local_experts} experts (llama.cpp applies QK-norm "
                       f"exactly when there are not 128 experts)")
    if t.attention_bias:
        out.append("attention_bias=True (llama.cpp's llama4 has no attention biases)")
    if t.hidden_act != "silu":
        out.append(f"hidden_act={t.hidden_act!r} (llama.cpp's llama4 FFN is SwiGLU)")
    if t.rope_scaling is not None and t.rope_scaling.get("rope_type") != "llama3":
        out.append(f"rope_scaling={t.rope_scaling} (only llama3 scaling is exported)")
    if model is not None and not allow_routing_bias:
        biased = [i for i, layer in enumerate(model.layers)
                  if getattr(layer.feed_forward, "expert_bias", None) is not None and layer.feed_forward.expert_bias.any()]
        if biased:
            out.append(f"a routing bias in layers {biased} (expert_bias.json): llama.cpp has no slot for it and "
                       f"would route differently")
    return out


def _rope_freqs(t) -> np.ndarray | None:
    """llama.cpp's per-frequency factors for llama3 RoPE scaling (its `LlamaModel.generate_extra_tensors`)."""
    rs = t.rope_scaling
    if rs is None:
        return None
    base, dim = t.rope_theta, t.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _tensors(model):
    """(GGUF name, fp32 numpy array in GGUF's row-major order) for every text tensor."""
    t = model.config.text
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["tok_embeddings.weight"]
    yield "output_norm.weight", sd["norm.weight"]
    if not t.tie_word_embeddings:
        yield "output.weight", sd["output.weight"]
    freqs = _rope_freqs(t)
    if freqs is not None:
        yield "rope_freqs.weight", torch.from_numpy(freqs)
    for i in range(t.num_hidden_layers):
        L, B = f"layers.{i}.", f"blk.{i}."
        yield B + "attn_norm.weight", sd[L + "attention_norm.weight"]
        for ours, theirs in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output")):
            yield B + theirs + ".weight", sd[L + f"attention.{ours}.weight"]
        yield B + "ffn_norm.weight", sd[L + "ffn_norm.weight"]
        F = L + "feed_forward."
        if i in t.moe_layers:
            yield B + "ffn_gate_inp.weight", sd[F + "router.weight"]  # [E, D]
            gate_EDF, up_EDF = sd[F + "experts.gate_up_proj"].chunk(2, dim=-1)
            yield B + "ffn_gate_exps.weight", gate_EDF.transpose(1, 2)  # [E, F, D]
            yield B + "ffn_up_exps.weight", up_EDF.transpose(1, 2)
            yield B + "ffn_down_exps.weight", sd[F + "experts.down_proj"].transpose(1, 2)  # [E, D, F]
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                yield B + f"ffn_{theirs}_shexp.weight", sd[F + f"shared_expert.{ours}.weight"]
        else:
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                yield B + f"ffn_{theirs}.weight", sd[F + f"{ours}.weight"]


def _encode(name: str, x: torch.Tensor, outtype: str):
    """(numpy data, GGML type) as llama.cpp's converter stores it: 1-D tensors, norms and the router in F32."""
    import gguf

    Q = gguf.GGMLQuantizationType
    a = x.contiguous().numpy()
    if outtype == "f32" or a.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return a.astype(np.float32), Q.F32
    if outtype == "q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    return a.astype(np.float16), Q.F16  # f16, and q8_0's fallback for rows that are not blocks of 32


def _vocab(model, tokenizer, writer) -> None:
    """Tokens, types, merges and special ids from the tokenizer.json our saves write (text/hf_export.py)."""
    import gguf

    from ..text.hf_export import tokenizer_files
    from ..text.tokenizer import SPLIT_PATTERN
    from .side_files import resolve_tokenizer

    tok = resolve_tokenizer(model, tokenizer)
    if tok is None:
        raise ValueError(f"the model (vocab_size={model.config.text.vocab_size}) has no tokenizer; a GGUF file "
                         f"needs one (pass --tokenizer)")
    V = model.config.text.vocab_size
    with tempfile.TemporaryDirectory() as d:
        for name, data in tokenizer_files(tok, model.config.text.max_position_embeddings).items():
            Path(d, name).write_bytes(data)
        spec = json.loads(Path(d, "tokenizer.json").read_text())
        pre = json.dumps(spec.get("pre_tokenizer"))
        if json.dumps(SPLIT_PATTERN)[1:-1] not in pre:
            raise ValueError(f"{tok.path}: its pre-tokenizer is not Llama 4's split pattern, so llama.cpp's "
                             f"'llama4' pre-tokenizer would split text differently")
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=V)
    vocab = spec["model"]["vocab"]
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()} | {i: a["content"] for i, a in added.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(V):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.CONTROL if i in added and added[i].get("special", True) else T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama4")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer)


def export_gguf(model, path: str | os.PathLike, *, outtype: str = "f32", tokenizer=None,
                allow_routing_bias: bool = False) -> Path:
    """Write the text model of `model` as one GGUF file for llama.cpp; refuses what llama.cpp would
    compute differently (`gguf_problems`)."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}: expected one of {OUTTYPES}")
    cfg = model.config
    problems = gguf_problems(cfg, allow_routing_bias=allow_routing_bias, model=model)
    if problems:
        raise ValueError("llama.cpp would compute a different model, so no GGUF file is written: "
                         + "; ".join(problems))
    if any(getattr(layer.feed_forward, "expert_bias", torch.zeros(1)).any() for layer in model.layers):
        log.warning("WARNING: this model routes with a learned expert bias that GGUF has no field for: llama.cpp "
                    "WILL COMPUTE A DIFFERENT MODEL from this file (exported anyway: allow_routing_bias)")
    if cfg.vision is not None:
        log.warning("the vision tower is not exported: the GGUF file holds the text model only (llama.cpp reads "
                    "vision from a separate mmproj file)")
    t = cfg.text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), "llama4")
    writer.add_type("model")
    writer.add_name(cfg.name or "llama4")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(t.vocab_size)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size_mlp)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_key_length(t.head_dim)
    writer.add_value_length(t.head_dim)
    writer.add_rope_dimension_count(t.head_dim)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_expert_count(t.num_local_experts)
    writer.add_expert_used_count(t.num_experts_per_tok)
    writer.add_interleave_moe_layer_step(t.interleave_moe_layer_step)
    writer.add_expert_feed_forward_length(t.intermediate_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(ftype)
    _vocab(model, tokenizer, writer)
    for name, x in _tensors(model):
        data, qtype = _encode(name, x, outtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    log.info("%s: wrote GGUF (%s)", path, outtype)
    return path
