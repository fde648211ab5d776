"""Meta's original-format quantized checkpoints: `fp8_mixed` and `int4_mixed` (llama-models'
`quantization/loader.py`), run quantized with our fp8 / int4 kernels.

As llama-models loads them, the weight tensors in `consolidated.NN.pth` have the shapes of the bf16
model and hold the quantized values (fp8 values, or int4 values -8..7 one per element: its
`load_int4` casts them to int8). The scales sit beside the shards in `fp8_scales_{rank}.pt` /
`int4_scales_{rank}.pt` (read with weights_only=True), keyed by module, in the layout of fbgemm's
row-wise quantizers applied to the transposed weights:
- fp8_mixed: routed experts of every MoE layer except the first and last (those stay bf16).
  `...experts.w1` / `w3`: [E, F] (one per output column of [E, D, F]); `...experts.w2`: [E, D].
- int4_mixed: routed and shared experts, groups of 128 along the input dim.
  `...experts.w1` / `w3`: [E, D/128, F]; `w2`: [E, F/128, D]; `...shared_expert.w1` / `w3`: [D/128, F],
  `w2`: [F/128, D].
Only single-shard (one model-parallel rank) checkpoints are read: per-rank scales of a row-parallel
weight cannot be merged into one per-channel scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model.quant import QuantExperts, QuantLinear, QuantScheme
from ..model.quantize import expert_weights, replace_module

MODES = {"fp8_mixed": "fp8_scales_{}.pt", "int4_mixed": "int4_scales_{}.pt"}
_KEY = re.compile(r"layers\.(?P<i>\d+)\.feed_forward\.(?P<kind>experts|shared_expert)\.(?P<w>w1|w2|w3)")


def meta_quantization(root: Path) -> str | None:
    found = [mode for mode, pattern in MODES.items() if (root / pattern.format(0)).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root}: both fp8_scales_0.pt and int4_scales_0.pt; expected one quantization mode")
    return found[0] if found else None


def _read_scales(f: Path) -> dict[str, torch.Tensor]:
    try:
        d = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises a mix of RuntimeError / UnpicklingError / OSError here
        raise ValueError(f"{f}: not a readable PyTorch file of scales ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise ValueError(f"{f}: expected a dict of scale tensors")
    bad = [k for k in d if not _KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"{f}: unexpected keys {bad[:3]}; expected layers.N.feed_forward.(experts|shared_expert)."
                         f"(w1|w2|w3)")
    return d


def _values(t: torch.Tensor, mode: str, where: str) -> torch.Tensor:
    if mode == "fp8_mixed":
        q = t.float().to(torch.float8_e4m3fn)
        if not torch.equal(q.float(), t.float()):
            raise ValueError(f"{where}: weights are not fp8 e4m3 values (is this an fp8_mixed checkpoint?)")
        return q
    q = t.float()
    if not torch.equal(q, q.round()) or q.min() < -8 or q.max() > 7:
        raise ValueError(f"{where}: weights are not int4 values -8..7 (packed two per byte is not supported)")
    return q.to(torch.int8)


def _scale(scales: dict, key: str, numel: int, f: Path) -> torch.Tensor:
    if key not in scales:
        raise ValueError(f"{f}: no scale for {key!r}")
    s = scales[key].float()
    if s.numel() != numel:
        raise ValueError(f"{f}: scale {key!r} has shape {list(s.shape)}; expected {numel} values")
    return s


def load_meta_quantized(root: Path, *, dtype=None, device="cpu"):
    from .meta import load_meta

    mode = meta_quantization(root)
    if len(list(root.glob("consolidated.*.pth"))) > 1:
        raise ValueError(f"{root}: {mode} with several model-parallel shards is not supported (one shard only)")
    f = root / MODES[mode].format(0)
    scales = _read_scales(f)
    # bf16 holds every fp8 and int4 value exactly, so the float load keeps them intact.
    model = load_meta(root, dtype=dtype or torch.bfloat16, device=device)
    scheme = QuantScheme("fp8") if mode == "fp8_mixed" else QuantScheme("int4", 128)
    layers = sorted({int(m["i"]) for k in scales if (m := _KEY.fullmatch(k))})
    with torch.no_grad():
        for i in layers:
            if i >= len(model.layers) or not hasattr(model.layers[i].feed_forward, "experts"):
                raise ValueError(f"{f}: scales for layer {i}, which is not an MoE layer of params.json's model")
            ff = model.layers[i].feed_forward
            p = f"layers.{i}.feed_forward"
            gate_up, down = expert_weights(ff.experts)
            E, D, F2 = gate_up.shape
            F = F2 // 2
            qe = QuantExperts(E, D, F, scheme, device)
            qe.gate_up.act_scale_ub = qe.down.act_scale_ub = 1200.0 if mode == "fp8_mixed" else None
            g = scheme.group_size
            s1 = _scale(scales, f"{p}.experts.w1", E * F * (1 if mode == "fp8_mixed" else D // g), f)
            s3 = _scale(scales, f"{p}.experts.w3", s1.numel(), f)
            s2 = _scale(scales, f"{p}.experts.w2", E * D * (1 if mode == "fp8_mixed" else F // g), f)
            for e in range(E):
                q_gu = _values(gate_up[e].t(), mode, f"{root}: {p}.experts.w1/w3")
                q_dn = _values(down[e].t(), mode, f"{root}: {p}.experts.w2")
                if mode == "fp8_mixed":
                    s_gu = torch.cat([s1.reshape(E, F)[e], s3.reshape(E, F)[e]])
                    s_dn = s2.reshape(E, D)[e]
                else:  # [G, N] per expert -> our [N, G]
                    s_gu = torch.cat([s1.reshape(E, D // g, F)[e].t(), s3.reshape(E, D // g, F)[e].t()])
                    s_dn = s2.reshape(E, F // g, D)[e].t()
                qe.gate_up.set(e, q_gu, s_gu)
                qe.down.set(e, q_dn, s_dn)
            replace_module(model, f"{p}.experts", qe)
            if mode == "int4_mixed":
                for w in ("w1", "w3", "w2"):
                    lin = getattr(ff.shared_expert, w)
                    N, K = lin.weight.shape
                    s = _scale(scales, f"{p}.shared_expert.{w}", N * K // g, f).reshape(K // g, N).t()
                    ql = QuantLinear(K, N, scheme, device)
                    ql.w.set(0, _values(lin.weight, mode, f"{root}: {p}.shared_expert.{w}"), s)
                    setattr(ff.shared_expert, w, ql)
    model.quantization = {"scheme": mode, "only": "checkpoint"}
    return model
