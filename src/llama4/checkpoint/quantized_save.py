"""`llama4 quantize`: a bf16/fp32 HF checkpoint -> a compressed-tensors checkpoint, tensor by tensor.

The output is what llm-compressor writes and vLLM / transformers read:
- experts split per expert, `...feed_forward.experts.{e}.{gate,up,down}_proj.*`, as transformers
  lays out quantized Llama 4 (its fused experts module has no place for scales);
- int8 per channel and int4 groups: `pack-quantized` (`weight_packed` int32, `weight_scale`,
  `weight_shape`), the format compressed-tensors infers for weight-only int schemes;
- fp8 per channel: `float-quantized` (`weight` F8_E4M3 + `weight_scale`) with dynamic per-token fp8
  activations, the scheme of the official Maverick FP8 (FP8_DYNAMIC);
- config.json gains `quantization_config` (built with the compressed-tensors package) whose
  `ignore` list names the router, the output head and the vision tower.
Compression itself is the compressed-tensors package's (`BaseCompressor.compress`), given our scales.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.quant import QuantScheme, as_scheme, quantize_weight
from ..model.quantize import ONLY
from .quantized import read_tensor
from .safetensors_io import weight_files

_EXPERTS = re.compile(r"(?P<m>(?:language_model\.)?model\.layers\.\d+\.feed_forward\.experts)\.(?P<p>gate_up_proj|down_proj)")
_LINEAR = re.compile(r"(?:language_model\.)?model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|feed_forward\.shared_expert\."
                     r"(?:gate|up|down)_proj|feed_forward\.(?:gate|up|down)_proj)\.weight")
TARGETS = {"experts": [r"re:.*feed_forward\.experts\.\d+\.(gate|up|down)_proj$"],
           "all": [r"re:.*feed_forward\.experts\.\d+\.(gate|up|down)_proj$", r"re:.*self_attn\.(q|k|v|o)_proj$",
                   r"re:.*feed_forward\.shared_expert\.(gate|up|down)_proj$",
                   r"re:.*layers\.\d+\.feed_forward\.(gate|up|down)_proj$"]}
IGNORE = ["lm_head", r"re:.*feed_forward\.router$", r"re:.*vision_model.*", r"re:.*multi_modal_projector.*"]


def ct_scheme(scheme: QuantScheme, only: str):
    """The compressed-tensors QuantizationScheme (and its format) for one of ours."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme.name == "fp8":
        w = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
        a = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    elif scheme.name == "int8":
        w, a = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False), None
    else:
        w = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=scheme.group_size,
                             symmetric=True, dynamic=False)
        a = None
    ct = QuantizationScheme(targets=TARGETS[only], weights=w, input_activations=a)
    fmt = infer_module_format(torch.nn.Linear, ct)
    ct.format = fmt.value
    return ct, fmt.value


def quantization_config_json(scheme: QuantScheme, only: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    ct, fmt = ct_scheme(scheme, only)
    qc = QuantizationConfig(config_groups={"group_0": ct}, ignore=IGNORE, format=fmt, quantization_status="compressed")
    d = qc.model_dump(mode="json")
    d["quant_method"] = "compressed-tensors"
    return d


def _compress(w_NK: torch.Tensor, scheme: QuantScheme, ct, fmt: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import BaseCompressor

    _, scale = quantize_weight(w_NK, scheme)
    out = BaseCompressor.get_value_from_registry(fmt).compress({"weight": w_NK.float(), "weight_scale": scale}, ct)
    return {k: v.contiguous() for k, v in out.items()}


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, scheme: str | QuantScheme,
                        only: str = "experts", group_size: int | None = None,
                        max_shard_bytes: int = 5 * 10**9) -> Path:
    """Read `src` (HF layout) one tensor at a time and write the compressed-tensors checkpoint `out`."""
    src, out = Path(src), Path(out)
    scheme = as_scheme(scheme, group_size)
    if only not in ONLY:
        raise ValueError(f"--only {only!r}: expected one of {', '.join(ONLY)}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a bf16/fp32 HF checkpoint directory)")
    d = json.loads((src / "config.json").read_text())
    if d.get("quantization_config") or (d.get("text_config") or {}).get("quantization_config"):
        raise ValueError(f"{src}/config.json: already quantized ({d.get('quantization_config', {}).get('quant_method')})")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; refusing to overwrite it")
    located, headers = weight_files(src)
    ct, fmt = ct_scheme(scheme, only)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.quantizing-", dir=out.parent))
    try:
        shards: list[str] = []
        weight_map: dict[str, str] = {}
        pending: dict[str, torch.Tensor] = {}
        size = 0

        def flush():
            nonlocal pending, size
            if pending:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(pending, str(tmp / name), metadata={"format": "pt"})
                shards.append(name)
                weight_map.update({k: name for k in pending})
                pending, size = {}, 0

        def emit(key: str, t: torch.Tensor):
            nonlocal size
            pending[key] = t
            size += t.numel() * t.element_size()
            if size >= max_shard_bytes:
                flush()

        quantized = 0
        for key in sorted(located):
            t = read_tensor(located[key], headers[located[key]], key)
            m = _EXPERTS.fullmatch(key)
            if m:
                F = t.shape[-1] // 2 if m["p"] == "gate_up_proj" else None
                for e in range(t.shape[0]):
                    if F is None:
                        mats = {"down_proj": t[e].t()}
                    else:
                        mats = {"gate_proj": t[e, :, :F].t(), "up_proj": t[e, :, F:].t()}
                    for proj, w in mats.items():
                        for k, v in _compress(w, scheme, ct, fmt).items():
                            emit(f"{m['m']}.{e}.{proj}.{k}", v)
                quantized += 1
            elif only == "all" and _LINEAR.fullmatch(key):
                for k, v in _compress(t, scheme, ct, fmt).items():
                    emit(f"{key[:-len('.weight')]}.{k}", v)
                quantized += 1
            else:
                emit(key, t)
            del t
        flush()
        if not quantized:
            raise ValueError(f"{src}: no tensors to quantize (no MoE experts{' or linears' if only == 'all' else ''})")
        if len(shards) == 1:
            os.replace(tmp / shards[0], tmp / "model.safetensors")
        else:
            final = {}
            for n, name in enumerate(shards, 1):
                new = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / name, tmp / new)
                final[name] = new
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=2))
        d["quantization_config"] = quantization_config_json(scheme, only)
        (tmp / "config.json").write_text(json.dumps(d, indent=2))
        for f in src.iterdir():  # tokenizer, generation config, expert biases, templates, ...
            if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
