"""`llama4 convert`: between Meta's original format, the HF layout and GGUF (llama.cpp).

Any checkpoint `llama4.load` reads is a source (HF, Meta, quantized ones dequantized as they load).
  --to hf    an HF checkpoint (config.json + safetensors + tokenizer and side files), as `llama4.save`
  --to meta  Meta's params.json + consolidated.NN.pth, split over --model-parallel ranks
  --to gguf  one .gguf file for llama.cpp (text model), refused when llama.cpp would compute another model
"""

from __future__ import annotations

import argparse

import torch

from .common import add_threads, apply_threads, positive_int


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import load, save
    from ..checkpoint.gguf import export_gguf
    from ..checkpoint.meta_save import save_meta
    from ..model.quant import QuantExperts, QuantLinear
    from ..text.tokenizer import Tokenizer

    apply_threads(args)
    if args.model_parallel != 1 and args.to != "meta":
        raise ValueError(f"--model-parallel applies to --to meta only (got --to {args.to})")
    if args.outtype is not None and args.to != "gguf":
        raise ValueError(f"--outtype applies to --to gguf only (got --to {args.to}); use --dtype for hf / meta")
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load(args.input, dtype=dtype)
    quantized = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (QuantExperts, QuantLinear))})
    if quantized:
        raise ValueError(f"{args.input}: a quantized checkpoint (it loads as {', '.join(quantized)}); convert writes "
                         f"float weights only. Convert the bf16/fp32 checkpoint instead (for a quantized GGUF, "
                         f"--to gguf --outtype q8_0)")
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    if args.to == "hf":
        out = save(model, args.output, tokenizer=tokenizer)
    elif args.to == "meta":
        out = save_meta(model, args.output, model_parallel=args.model_parallel)
    else:
        out = export_gguf(model, args.output, outtype=args.outtype or "f32", tokenizer=tokenizer,
                          allow_routing_bias=args.allow_routing_bias)
    detail = {"hf": "", "meta": f", {args.model_parallel} rank(s)", "gguf": f", {args.outtype or 'f32'}"}[args.to]
    print(f"wrote {out} ({args.to}{detail})")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert between Meta's original format, HF and GGUF (llama.cpp)")
    p.add_argument("input", help="checkpoint directory (HF or Meta's params.json + consolidated.*.pth)")
    p.add_argument("output", help="directory to write (hf, meta), or the .gguf file (gguf)")
    p.add_argument("--to", required=True, choices=("hf", "meta", "gguf"))
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights dtype for hf / meta (auto: the checkpoint's)")
    p.add_argument("--model-parallel", type=positive_int, default=1,
                   help="--to meta: number of consolidated.NN.pth shards (Meta's model-parallel ranks)")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help="--to gguf: tensor type (default f32; norms and the router stay f32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to write (default: the checkpoint's)")
    p.add_argument("--allow-routing-bias", action="store_true",
                   help="--to gguf: export a model that routes with a learned expert bias anyway (llama.cpp "
                        "will compute a different model)")
    add_threads(p)
    p.set_defaults(func=cmd_convert)
