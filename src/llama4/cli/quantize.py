"""`llama4 quantize`: write a compressed-tensors checkpoint (read by vLLM, transformers and us)."""

from __future__ import annotations

import argparse

from ..model.quant import INT4_GROUP_SIZES, SCHEMES


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..checkpoint.quantized_save import quantize_checkpoint

    if args.group_size is not None and args.scheme != "int4":
        raise ValueError(f"--group-size applies to int4 only (got --scheme {args.scheme})")
    out = quantize_checkpoint(args.input, args.output, args.scheme, args.only, args.group_size)
    print(f"wrote {out} ({args.scheme}{f' group {args.group_size or 128}' if args.scheme == 'int4' else ''}, "
          f"{args.only}; compressed-tensors)")
    return 0


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a bf16/fp32 HF checkpoint into the compressed-tensors format")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8 per channel, int4 symmetric groups, fp8 e4m3 per channel (dynamic fp8 activations)")
    p.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES, default=None, help="int4 group size (128)")
    p.add_argument("--only", choices=("experts", "all"), default="experts",
                   help="experts: the routed experts; all: also attention, shared expert and dense FFN linears")
    p.add_argument("input", help="HF checkpoint directory (bf16 or fp32)")
    p.add_argument("output", help="new directory to write")
    p.set_defaults(func=cmd_quantize)
