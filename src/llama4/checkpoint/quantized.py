"""Quantized checkpoints in: compressed-tensors and fbgemm_fp8 (HF layout), and quantizing while loading.

What runs quantized and what is dequantized on load:
- compressed-tensors int8 per channel, int4 symmetric groups of 32/64/128, fp8 per channel (the
  official Maverick FP8): quantized experts and linears, our kernels (fp8 on CPU is weight-only: its
  dynamic per-token activation scheme is not simulated, so it computes slightly *more* precisely).
  Any other compressed-tensors scheme (other group sizes, asymmetric, per-tensor, ...) is
  dequantized on load by the compressed-tensors package's own decompressor.
- fbgemm_fp8: fused experts and linears run as fp8 per channel.
- Modules in the `ignore` / `modules_to_not_convert` list, and every unquantized tensor, load as usual.
A quant method other than these is refused by name.

`load(..., quantize=...)` builds the model on the meta device, allocates quantized modules, and reads
the bf16/fp32 checkpoint one tensor at a time, quantizing each as it arrives: peak memory is the
quantized model plus the largest single tensor.

Shape legend: E experts, D model dim, F expert hidden, N output features, K input features.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..config import config_from_hf
from ..model import Llama4
from ..model.quant import SCHEMES, QuantExperts, QuantLinear, QuantScheme, as_scheme
from ..model.quantize import empty_quantized, expert_weights, quantized_targets, replace_module
from .keymap import KeyMap
from .safetensors_io import detect_layout, weight_files

log = logging.getLogger("llama4")

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
             "I32": torch.int32, "I64": torch.int64}
METHODS = ("compressed-tensors", "fbgemm_fp8")


def read_tensor(file: Path, header: dict, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read into fresh memory (no mmap), any dtype above."""
    info = header[key]
    if info["dtype"] not in ST_DTYPES:
        raise ValueError(f"{file}: tensor {key!r} has dtype {info['dtype']}; expected one of {sorted(ST_DTYPES)}")
    buf = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    want = buf.numel() * buf.element_size()
    with open(file, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(start + begin)
        if end - begin != want or f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != want:
            raise ValueError(f"{file}: tensor {key!r} should hold {want} bytes ({info['dtype']} {info['shape']}) "
                             f"but its data is {end - begin} bytes or cut short")
    return buf


# Quantizing while loading ---------------------------------------------------------------------------

def prepare_quantized(model: Llama4, quantize: str | QuantScheme, only: str, device) -> dict[str, callable]:
    """Swap `only`'s modules of a meta-device model for empty quantized ones and return
    {our parameter name: sink(float tensor)} that quantizes a checkpoint tensor into place."""
    scheme = as_scheme(quantize)
    sinks: dict[str, callable] = {}
    for name, mod in quantized_targets(model, only).items():
        new = empty_quantized(mod, scheme, "meta")
        replace_module(model, name, new)
        if isinstance(new, QuantLinear):
            sinks[f"{name}.weight"] = _linear_sink(model, name)
        else:
            sinks[f"{name}.gate_up_proj"] = _experts_sink(model, name, "gate_up")
            sinks[f"{name}.down_proj"] = _experts_sink(model, name, "down")
    model.quantization = {"scheme": str(scheme), "only": only}
    return sinks


def _linear_sink(model, name):
    def sink(w_NK: torch.Tensor) -> None:
        model.get_submodule(name).w.set_float(0, w_NK)
    return sink


def _experts_sink(model, name, which):
    def sink(w_EKN: torch.Tensor) -> None:  # HF fused layout: [E, D, 2F] or [E, F, D]
        mats = getattr(model.get_submodule(name), which)
        for e in range(w_EKN.shape[0]):
            mats.set_float(e, w_EKN[e].t())
    return sink


# Published quantized HF checkpoints -----------------------------------------------------------------

def quantization_config(root: Path) -> dict | None:
    """config.json's `quantization_config` (top level or in text_config), or None."""
    f = root / "config.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None  # load_config reports it
    if not isinstance(d, dict):
        return None
    return d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config")


_EXPERT_KEY = re.compile(r"(?P<m>.*\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj)\."
                         r"(?P<t>\w+)")
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale",
             "weight_g_idx", "input_scale", "input_zero_point", "input_global_scale", "gate_up_proj_scale",
             "down_proj_scale")


class _CTScheme:
    """One compressed-tensors config group, resolved to our kernel scheme or to 'decompress'."""

    def __init__(self, group: dict, fmt: str, where: str):
        from compressed_tensors.quantization import QuantizationScheme

        self.ct = QuantizationScheme.model_validate({"targets": group.get("targets", ["Linear"]), **group})
        self.targets = list(self.ct.targets)
        self.format = group.get("format") or fmt
        w = self.ct.weights
        self.ours = None
        if w is not None and w.symmetric and not w.dynamic and self.format in (
                "pack-quantized", "int-quantized", "float-quantized", "naive-quantized"):
            if w.type == "float" and w.num_bits == 8 and w.strategy == "channel":
                self.ours = QuantScheme("fp8")
            elif w.type == "int" and w.num_bits == 8 and w.strategy == "channel":
                self.ours = QuantScheme("int8")
            elif w.type == "int" and w.num_bits == 4 and w.strategy == "group" and w.group_size in (32, 64, 128):
                self.ours = QuantScheme("int4", w.group_size)
        log.info("%s: compressed-tensors group %s (%s) -> %s", where, self.targets, self.format,
                 self.ours or "dequantized on load")

    def decode(self, local: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """(q_NK, scale) in our checkpoint form when we have a kernel, else the float weight."""
        if self.ours is None:
            from compressed_tensors.compressors import BaseCompressor

            comp = BaseCompressor.get_value_from_registry(self.format)
            return comp.decompress(dict(local), self.ct)["weight"].float()
        scale = local["weight_scale"].float()
        if "weight_packed" in local:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            shape = torch.Size(local["weight_shape"].tolist())
            q = unpack_from_int32(local["weight_packed"], self.ct.weights.num_bits, shape)
        else:
            q = local["weight"]
        return q, scale


def _matches(name: str, target: str, module_class: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == module_class or name == target or name.endswith("." + target)


def load_published(root: Path, qcfg: dict, *, dtype=None, device="cpu") -> Llama4:
    """Load a compressed-tensors or fbgemm_fp8 checkpoint (HF layout)."""
    method = qcfg.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"{root}/config.json: quantization method {method!r} is not supported (supported: "
                         f"{', '.join(METHODS)}; or a bf16/fp32 checkpoint with load(..., quantize=...))")
    d = json.loads((root / "config.json").read_text())
    d.pop("quantization_config", None)
    (d.get("text_config") or {}).pop("quantization_config", None)
    cfg = config_from_hf(d, str(root / "config.json"))
    located, headers = weight_files(root)
    multimodal = detect_layout(located, root)
    if not multimodal:
        cfg.vision = None
    keymap = KeyMap(multimodal)
    with torch.device("meta"):
        model = Llama4(cfg)
    if dtype is None:  # the unquantized tensors' dtype, as for a float checkpoint
        emb = next((k for k in located if k.endswith("embed_tokens.weight")), None)
        dtype = ST_DTYPES.get(headers[located[emb]][emb]["dtype"], torch.bfloat16) if emb else torch.bfloat16
    model = model.to(dtype=dtype)

    def tensor(key):
        return read_tensor(located[key], headers[located[key]], key)

    # Group the checkpoint's keys by module: per-expert split keys under their fused experts module.
    used: set[str] = set()
    experts: dict[str, dict[int, dict[str, dict[str, str]]]] = {}
    for key in located:
        m = _EXPERT_KEY.fullmatch(key)
        if m:
            experts.setdefault(m["m"], {}).setdefault(int(m["e"]), {}).setdefault(m["p"], {})[m["t"]] = key

    scale_ub = None
    if method == "compressed-tensors":
        fmt = qcfg.get("format", "dense")
        groups = [_CTScheme(g, fmt, str(root)) for g in (qcfg.get("config_groups") or {}).values()]
        ignore = qcfg.get("ignore") or []

        def scheme_for(hf_module: str) -> _CTScheme | None:
            if any(_matches(hf_module, t, "Linear") for t in ignore):
                return None
            return next((g for g in groups if any(_matches(hf_module, t, "Linear") for t in g.targets)), None)
    else:
        fp8 = _CTScheme({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                           "symmetric": True, "dynamic": False}},
                        "float-quantized", str(root))
        skip = qcfg.get("modules_to_not_convert") or []
        scale_ub = float(qcfg.get("activation_scale_ub", 1200.0))

        def scheme_for(hf_module: str) -> _CTScheme | None:
            return None if any(s in hf_module for s in skip) else fp8

    float_params = dict(model.state_dict(keep_vars=True))
    plan_float: list[tuple[str, str]] = []  # (ours, hf key) read as usual
    fill: list[callable] = []  # run after allocation
    handled: set[str] = set()  # experts modules filled from split or fused fp8 keys

    for i, layer in enumerate(model.layers):
        if not hasattr(layer.feed_forward, "experts"):
            continue
        ours = f"layers.{i}.feed_forward.experts"
        hf_gate_up = keymap.to_hf(f"{ours}.gate_up_proj")
        hf_module = hf_gate_up.rsplit(".", 1)[0]
        gate_up, down = expert_weights(layer.feed_forward.experts)
        E, D, F2 = gate_up.shape
        if hf_module in experts or f"{hf_gate_up}_scale" in located:
            handled.add(ours)
        if hf_module in experts:  # per-expert split keys, as transformers writes quantized Llama 4
            per = experts[hf_module]
            if sorted(per) != list(range(E)):
                raise ValueError(f"{root}: {hf_module}: experts {sorted(per)[:5]}... found, expected 0..{E - 1}")
            schemes = {scheme_for(f"{hf_module}.{e}.{p}") for e in per for p in per[e]}
            if len(schemes) != 1:
                raise ValueError(f"{root}: {hf_module}: its experts' projections are quantized differently")
            sch = schemes.pop()
            for e in per:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    if p not in per[e]:
                        raise ValueError(f"{root}: {hf_module}.{e}.{p} is missing")
                    used.update(per[e][p].values())
            if sch is not None and sch.ours is not None:
                replace_module(model, ours, QuantExperts(E, D, F2 // 2, sch.ours, "meta"))
                fill.append(_fill_split_experts(model, ours, per, sch, tensor))
            else:
                fill.append(_fill_split_experts_float(model, ours, per, sch, tensor, E, D, F2 // 2))
        elif f"{hf_gate_up}_scale" in located:  # fbgemm_fp8: fused F8 experts with per-column scales
            sch = scheme_for(hf_module)
            hf_down = keymap.to_hf(f"{ours}.down_proj")
            used.update({hf_gate_up, f"{hf_gate_up}_scale", hf_down, f"{hf_down}_scale"})
            replace_module(model, ours, QuantExperts(E, D, F2 // 2, QuantScheme("fp8"), "meta"))
            fill.append(_fill_fused_fp8_experts(model, ours, hf_gate_up, hf_down, tensor, scale_ub))

    # Every other module: quantized linear where it has a scale / packed weight, else read as is.
    for ours_name, param in float_params.items():
        if ours_name.rsplit(".", 1)[0] in handled:
            continue
        try:
            hf = keymap.to_hf(ours_name)
        except KeyError:
            continue
        mod_hf = hf.rsplit(".", 1)[0]
        is_quant = f"{mod_hf}.weight_scale" in located and (hf.endswith(".weight"))
        if hf in located and not is_quant:
            plan_float.append((ours_name, hf))
            used.add(hf)
        elif is_quant:
            sch = scheme_for(mod_hf)
            local_keys = {s: f"{mod_hf}.{s}" for s in ("weight", *_SUFFIXES) if f"{mod_hf}.{s}" in located}
            used.update(local_keys.values())
            if sch is None:
                raise ValueError(f"{root}: {mod_hf} has a weight_scale but the quantization config does not "
                                 f"cover it (it is in the ignore list or matches no config group)")
            mod_name = ours_name.rsplit(".", 1)[0]
            linear = model.get_submodule(mod_name)
            if sch.ours is not None and isinstance(linear, nn.Linear) and linear.bias is None:
                replace_module(model, mod_name, QuantLinear(linear.in_features, linear.out_features, sch.ours, "meta"))
                fill.append(_fill_linear(model, mod_name, local_keys, sch, tensor, scale_ub))
            else:
                fill.append(_fill_param_dequantized(model, ours_name, local_keys, sch, tensor))
        elif not (ours_name == "output.weight" and cfg.text.tie_word_embeddings):
            raise ValueError(f"{root}: tensor {hf!r} (for {ours_name}) is missing from the checkpoint")

    unexpected = sorted(set(located) - used)
    if unexpected:
        raise ValueError(f"{root}: {len(unexpected)} unexpected tensors not used by this config, e.g. {unexpected[:3]}")

    model = model.to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for ours_name, hf in plan_float:
            t = tensor(hf)
            if tuple(t.shape) != tuple(params[ours_name].shape):
                raise ValueError(f"{located[hf]}: tensor {hf!r} has shape {list(t.shape)}; the config implies "
                                 f"{list(params[ours_name].shape)}")
            params[ours_name].copy_(t)
        for f in fill:
            f()
    model.reset_buffers()
    model.quantization = {"scheme": method, "only": "checkpoint"}
    return model.eval()


def _local(keys: dict[str, str], tensor) -> dict[str, torch.Tensor]:
    return {k.rsplit(".", 1)[1]: tensor(k) for k in keys.values()}


def _fill_split_experts(model, name, per, sch: _CTScheme, tensor):
    def fill():
        qe = model.get_submodule(name)
        for e, projs in per.items():
            gq, gs = sch.decode(_local(projs["gate_proj"], tensor))
            uq, us = sch.decode(_local(projs["up_proj"], tensor))
            qe.gate_up.set(e, torch.cat([gq, uq]), torch.cat([gs, us]))
            qe.down.set(e, *sch.decode(_local(projs["down_proj"], tensor)))
    return fill


def _as_float(decoded) -> torch.Tensor:
    if isinstance(decoded, tuple):
        from ..model.quant import dequantize_weight

        return dequantize_weight(*decoded)
    return decoded


def _fill_split_experts_float(model, name, per, sch, tensor, E, D, F):
    def fill():
        gate_up, down = expert_weights(model.get_submodule(name))
        for e, projs in per.items():
            ws = {}
            for p in ("gate_proj", "up_proj", "down_proj"):
                local = _local(projs[p], tensor)
                ws[p] = local["weight"].float() if sch is None else _as_float(sch.decode(local))
            if ws["gate_proj"].shape != (F, D) or ws["down_proj"].shape != (D, F):
                raise ValueError(f"{name}: expert {e} has shapes {list(ws['gate_proj'].shape)} / "
                                 f"{list(ws['down_proj'].shape)}; expected [{F}, {D}] / [{D}, {F}]")
            gate_up[e].copy_(torch.cat([ws["gate_proj"], ws["up_proj"]]).t())
            down[e].copy_(ws["down_proj"].t())
    return fill


def _fill_fused_fp8_experts(model, name, hf_gate_up, hf_down, tensor, scale_ub):
    def fill():
        qe = model.get_submodule(name)
        gu, gu_s = tensor(hf_gate_up), tensor(f"{hf_gate_up}_scale").float()  # [E, D, 2F], [E, 1, 2F]
        dn, dn_s = tensor(hf_down), tensor(f"{hf_down}_scale").float()  # [E, F, D], [E, D, 1]
        E = gu.shape[0]
        if gu.dtype != torch.float8_e4m3fn or gu_s.numel() != E * gu.shape[2] or dn_s.numel() != E * dn.shape[2]:
            raise ValueError(f"{hf_gate_up}: expected F8_E4M3 [E, D, 2F] with scales [E, 1, 2F] and down scales "
                             f"[E, D, 1]; got {gu.dtype} {list(gu.shape)}, {list(gu_s.shape)}, {list(dn_s.shape)}")
        qe.gate_up.act_scale_ub = qe.down.act_scale_ub = scale_ub
        for e in range(E):
            qe.gate_up.set(e, gu[e].t(), gu_s[e].reshape(-1))
            qe.down.set(e, dn[e].t(), dn_s[e].reshape(-1))
    return fill


def _fill_linear(model, name, keys, sch, tensor, scale_ub):
    def fill():
        model.get_submodule(name).w.set(0, *sch.decode(_local(keys, tensor)))
        model.get_submodule(name).w.act_scale_ub = scale_ub
    return fill


def _fill_param_dequantized(model, ours_name, keys, sch, tensor):
    def fill():
        mod_name, _, pname = ours_name.rpartition(".")
        getattr(model.get_submodule(mod_name), pname).copy_(_as_float(sch.decode(_local(keys, tensor))))
    return fill


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of weights as stored (quantized buffers included, tied weights once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, (QuantExperts, QuantLinear))
                                         for b in m.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


__all__ = ["METHODS", "SCHEMES", "load_published", "prepare_quantized", "quantization_config", "quantized_nbytes",
           "read_tensor"]
