"""Memory per GPU for a model, a GPU count and a layout, as `parallelize()` lays the model out.

What each term assumes (the model of `train/parallel.py`, not of some other framework):
  - tensor parallel (tp) splits attention projections, the dense FFN and the shared expert; the
    router, norms, embeddings, output head and vision tower stay whole on every tp rank;
  - expert parallel (ep) splits only the routed experts; ep ranks are data-parallel ranks, so
    tp * ep <= GPUs and ep divides GPUs / tp;
  - training: fp32 master weights, fp32 gradients and two fp32 AdamW moments, all sharded by FSDP over
    the data-parallel ranks (the experts over dp / ep of them); bf16 autocast activations;
  - inference: weights in `dtype` (routed experts and attention/FFN matrices in `quant` when given),
    KV for one sequence of `context` tokens per GPU group: chunked layers keep one chunk (in `dtype`),
    global layers keep everything (in `kv_dtype`; fp8 / int8 count their bf16 scale per head vector,
    as kv/quant.py stores them), K heads split by tp;
  - context parallel (cp, inference): the cp data-parallel ranks of one tp group share one sequence
    (model/context_parallel.py): each holds 1/cp of the global layers' KV, at most one chunk of each
    local layer, and the two K/V blocks of one layer that ring attention has in flight.
Activation figures are estimates (what autograd keeps per token per layer, or one prefill slice).

Shape legend: D model dim, F expert hidden, Fm dense FFN hidden, V vocab, K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .accounting import bytes_human, kv_element_bytes, parameter_counts
from .config import Llama4Config

GPUS = {"H100": 80e9, "H200": 141e9, "B200": 192e9, "A100": 80e9, "A100-40": 40e9, "L40S": 48e9, "MI300X": 192e9}
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
RESERVE = 0.10  # runtime, allocator fragmentation and communication buffers: keep 10% free
PREFILL_SLICE = 8192  # tokens per prefill forward at inference


@dataclass
class Request:
    gpus: int
    gpu_bytes: float
    context: int = 8192
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    quant: str | None = None
    train: bool = False
    batch: int = 1  # training: global rows per step; inference: sequences held at once
    seq: int = 4096  # training sequence length
    checkpointing: bool = True  # training: activation checkpointing per block


@dataclass
class Estimate:
    tp: int
    ep: int
    dp: int
    terms: dict[str, float] = field(default_factory=dict)
    cp: int = 1

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def split_params(cfg: Llama4Config) -> dict[str, int]:
    """Parameters by how the layout splits them: `tp` (split by tensor parallel), `experts` (routed,
    split by expert parallel), `whole` (replicated on every tp/ep rank)."""
    t = cfg.text
    D, hd = t.hidden_size, t.head_dim
    attn = D * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    tp = experts = 0
    whole = 0
    for i in range(t.num_hidden_layers):
        tp += attn
        whole += 2 * D  # the two norms
        if t.is_moe(i):
            tp += 3 * D * t.intermediate_size  # shared expert
            experts += t.num_local_experts * 3 * D * t.intermediate_size
            whole += t.num_local_experts * D  # router
        else:
            tp += 3 * D * t.intermediate_size_mlp
    total = parameter_counts(cfg)["total"]
    whole += total - tp - experts - whole  # embeddings, output head, final norm, vision tower
    return {"tp": tp, "experts": experts, "whole": whole}


def layouts(cfg: Llama4Config, gpus: int) -> list[tuple[int, int]]:
    """(tp, ep) pairs `parallelize()` accepts on `gpus` ranks for this model."""
    t = cfg.text
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp or t.num_attention_heads % tp or t.num_key_value_heads % tp or \
                t.intermediate_size % tp or t.intermediate_size_mlp % tp:
            continue
        for ep in range(1, gpus // tp + 1):
            if (gpus // tp) % ep == 0 and (ep == 1 or (t.moe_layers and t.num_local_experts % ep == 0)):
                out.append((tp, ep))
    return out


def estimate(cfg: Llama4Config, req: Request, tp: int, ep: int, cp: int = 1) -> Estimate:
    t = cfg.text
    dp = req.gpus // tp
    p = split_params(cfg)
    est = Estimate(tp, ep, dp, cp=cp)
    if req.train:
        # FSDP shards dense weights over all dp ranks, experts over the dp / ep ranks sharing them.
        per_gpu = (p["tp"] / tp + p["whole"]) / dp + p["experts"] / ep / (dp // ep)
        est.terms["weights (fp32 master)"] = 4 * per_gpu
        est.terms["gradients (fp32)"] = 4 * per_gpu
        est.terms["optimizer (AdamW, 2x fp32)"] = 8 * per_gpu
        est.terms.update(_train_activations(cfg, req, tp, dp))
        return est
    wq = DTYPE_BYTES[req.quant] if req.quant else DTYPE_BYTES[req.dtype]
    wd = DTYPE_BYTES[req.dtype]
    est.terms["weights: attention + dense FFN (/tp)"] = wq * p["tp"] / tp
    est.terms["weights: routed experts (/ep)"] = wq * p["experts"] / ep
    est.terms["weights: embeddings, head, norms, router, vision"] = wd * p["whole"]
    quant_kv = req.kv_dtype in ("fp8", "int8")
    local_dtype = req.dtype if quant_kv else req.kv_dtype  # a quantized KV is the global layers' only
    shard = -(-req.context // cp)
    kv = kv_by_kind(cfg, shard, kv_element_bytes(req.kv_dtype, t.head_dim), tp)
    local = kv_by_kind(cfg, shard, kv_element_bytes(local_dtype, t.head_dim), tp)["local"]
    split = "/tp" + ("/cp" if cp > 1 else "")
    est.terms[f"KV: chunked (local) layers, {local_dtype}, one chunk"] = local * req.batch
    est.terms[f"KV: global layers, {req.kv_dtype} ({split})"] = kv["global"] * req.batch
    if cp > 1:  # ring attention: the block being sent and the one received, of one layer, in `dtype`
        per_token = 2 * t.num_key_value_heads / tp * t.head_dim * wd
        est.terms[f"ring attention: 2 K/V blocks of {shard:,} tokens"] = 2 * shard * per_token * req.batch
    slice_tokens = min(shard, PREFILL_SLICE) * req.batch
    est.terms["activations (one prefill slice)"] = slice_tokens * _act_bytes_per_token(cfg, tp) + \
        req.batch * t.vocab_size * 4
    return est


def kv_by_kind(cfg: Llama4Config, context: int, dtype_bytes: float, tp: int) -> dict[str, float]:
    """KV bytes per GPU for one sequence: chunked layers hold one chunk, global layers all `context`."""
    t = cfg.text
    per_layer_token = 2 * (t.num_key_value_heads / tp) * t.head_dim * dtype_bytes
    local = sum(t.is_chunked(i) for i in range(t.num_hidden_layers))
    chunk = min(context, t.attention_chunk_size or context)
    return {"local": local * chunk * per_layer_token,
            "global": (t.num_hidden_layers - local) * context * per_layer_token}


def _act_bytes_per_token(cfg: Llama4Config, tp: int) -> float:
    """bf16 bytes one token keeps alive inside one decoder layer for backward (an estimate): norms,
    q/k/v/attention out, FFN inputs and hidden activations; tp splits the head and FFN parts."""
    t = cfg.text
    D, k = t.hidden_size, t.num_experts_per_tok
    heads = (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim / tp
    ffn = (3 * t.intermediate_size / tp + k * (2 * D + 3 * t.intermediate_size)) if t.moe_layers else \
        3 * t.intermediate_size_mlp / tp
    return 2 * (6 * D + heads + ffn)


def _train_activations(cfg: Llama4Config, req: Request, tp: int, dp: int) -> dict[str, float]:
    t = cfg.text
    tokens = req.batch * req.seq / dp
    per_layer = _act_bytes_per_token(cfg, tp) * tokens
    if req.checkpointing:  # each block keeps its input; one block's activations exist during recompute
        acts = t.num_hidden_layers * tokens * t.hidden_size * 2 + per_layer
    else:
        acts = t.num_hidden_layers * per_layer
    loss = 2 * 4096 * t.vocab_size * 4  # one chunk of fp32 logits and its gradient (train.loss_chunk)
    return {"activations (estimate)": acts, "loss chunk logits": loss}


def cp_degrees(req: Request, tp: int) -> list[int]:
    """Context-parallel degrees of a tp layout: divisors of its dp ranks (inference only)."""
    dp = req.gpus // tp
    if req.train:
        return [1]
    return [c for c in range(1, dp + 1) if dp % c == 0 and c <= req.context]


def plan(cfg: Llama4Config, req: Request) -> tuple[list[Estimate], list[Estimate]]:
    """(every layout's estimate, those that fit), fitting ones smallest first."""
    every = [estimate(cfg, req, tp, ep, cp) for tp, ep in layouts(cfg, req.gpus) for cp in cp_degrees(req, tp)]
    budget = req.gpu_bytes * (1 - RESERVE)
    fits = sorted((e for e in every if e.total <= budget), key=lambda e: e.total)
    return every, fits


def report(cfg: Llama4Config, req: Request, name: str, gpu_name: str, show: Estimate | None = None) -> str:
    every, fits = plan(cfg, req)
    budget = req.gpu_bytes * (1 - RESERVE)
    what = (f"train batch {req.batch} x seq {req.seq}" if req.train else
            f"inference, context {req.context:,}, {req.batch} sequence(s), weights {req.quant or req.dtype}, "
            f"KV {req.kv_dtype}")
    lines = [f"{name} on {req.gpus}x{gpu_name} ({bytes_human(req.gpu_bytes)} each, {bytes_human(budget)} usable "
             f"after {RESERVE:.0%} reserve): {what}"]
    pick = show or (fits[0] if fits else min(every, key=lambda e: e.total))
    cp_note = f" (context parallel: each sequence split over {pick.cp} ranks, {-(-req.context // pick.cp):,} " \
        f"tokens each)" if pick.cp > 1 else ""
    lines.append(f"\nper GPU, layout tp={pick.tp} ep={pick.ep} dp={pick.dp} cp={pick.cp}{cp_note}:")
    for k, v in pick.terms.items():
        lines.append(f"  {k:<52} {bytes_human(v):>12}")
    verdict = "fits" if pick.total <= budget else "does NOT fit"
    lines.append(f"  {'total':<52} {bytes_human(pick.total):>12}  -> {verdict}")
    lines.append("\nlayouts that fit (smallest per-GPU memory first):" if fits else "\nno layout fits")
    for e in fits:
        lines.append(f"  tp={e.tp:<2} ep={e.ep:<3} dp={e.dp:<3} cp={e.cp:<3} {bytes_human(e.total):>12}  "
                     f"(parallel.tp={e.tp} parallel.ep={e.ep}" + (f", context parallel over {e.cp}" if e.cp > 1 else "")
                     + ")")
    return "\n".join(lines)
