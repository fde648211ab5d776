"""`llama4 plan --model scout|maverick|behemoth|DIR --gpus 8xH100 --context N ...`: memory per GPU and the
layouts that fit (see planner.py for what each term assumes)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .common import token_count
from ..planner import DTYPE_BYTES, GPUS, Request, cp_degrees, estimate, layouts, report


MAX_GPUS = 1 << 20  # layouts are enumerated over divisors: a bound keeps a typo from hanging the plan


def parse_gpus(text: str) -> tuple[int, str, float]:
    """'8xH100' -> (8, 'H100', bytes); '4x96GB' names the memory directly."""
    m = re.fullmatch(r"(\d+)x([\w-]+)", text.strip(), flags=re.IGNORECASE)
    if not m or not 1 <= int(m.group(1)) <= MAX_GPUS:
        raise ValueError(f"--gpus {text!r}: expected COUNTxKIND with 1 <= COUNT <= {MAX_GPUS:,}, "
                         f"e.g. 8xH100 or 4x96GB")
    n, kind = int(m.group(1)), m.group(2)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)GB", kind, flags=re.IGNORECASE)
    if size:
        if not float(size.group(1)) > 0:
            raise ValueError(f"--gpus {text!r}: a GPU's memory must be > 0 GB")
        return n, kind, float(size.group(1)) * 1e9
    known = {k.upper(): k for k in GPUS}
    if kind.upper() not in known:
        raise ValueError(f"--gpus {text!r}: unknown GPU {kind!r}; known: {sorted(GPUS)} or NNGB")
    return n, known[kind.upper()], GPUS[known[kind.upper()]]


def cmd_plan(args: argparse.Namespace) -> int:
    from ..config import PRESETS, load_config, preset

    if args.model in PRESETS:
        cfg, name = preset(args.model), args.model
    elif Path(args.model).is_dir():
        cfg, name = load_config(Path(args.model) / "config.json"), args.model
    else:
        raise ValueError(f"--model {args.model!r}: not a preset ({sorted(PRESETS)}) nor a checkpoint directory")
    n, kind, size = parse_gpus(args.gpus)
    if args.context < 1 or args.batch < 1 or args.seq < 1:
        raise ValueError("--context, --batch and --seq must be >= 1")
    req = Request(gpus=n, gpu_bytes=size, context=args.context, dtype=args.dtype, kv_dtype=args.kv_dtype,
                  quant=args.quant, train=args.train, batch=args.batch, seq=args.seq,
                  checkpointing=not args.no_checkpointing)
    show = None
    if args.tp or args.ep or args.cp:
        tp, ep, cp = args.tp or 1, args.ep or 1, args.cp or 1
        if (tp, ep) not in layouts(cfg, n):
            raise ValueError(f"--tp {tp} --ep {ep} is not a valid layout of {name} on {n} GPUs; valid: "
                             f"{layouts(cfg, n)}")
        if cp not in cp_degrees(req, tp):
            raise ValueError(f"--cp {cp} is not a context-parallel degree of tp={tp} on {n} GPUs (inference only); "
                             f"valid: {cp_degrees(req, tp)}")
        show = estimate(cfg, req, tp, ep, cp)
    print(report(cfg, req, name, kind, show))
    return 0


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU of a model on N GPUs, and the layouts that fit",
                       description="Per-GPU weights, gradients and optimizer state (--train), KV by layer kind "
                                   "and activations, for each tensor/expert-parallel layout.")
    p.add_argument("--model", required=True, help="scout | maverick | behemoth | tiny | a checkpoint directory")
    p.add_argument("--gpus", required=True, help="COUNTxKIND, e.g. 8xH100, 8xH200, 4x96GB")
    p.add_argument("--context", type=token_count, default=8192,
                   help="tokens of context per sequence (inference); 128k = 131072, 10M = 10485760")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp16", "fp8", "int8"])
    p.add_argument("--quant", default=None, choices=[k for k in DTYPE_BYTES if k in ("int8", "int4", "fp8")],
                   help="weight-only quantization of the decoder matrices")
    p.add_argument("--train", action="store_true", help="training memory (fp32 master + AdamW, FSDP)")
    p.add_argument("--batch", type=int, default=1, help="training: global rows per step; inference: sequences")
    p.add_argument("--seq", type=int, default=4096, help="training sequence length")
    p.add_argument("--no-checkpointing", action="store_true", help="training without activation checkpointing")
    p.add_argument("--tp", type=int, default=0, help="show this layout's terms (default: the smallest that fits)")
    p.add_argument("--ep", type=int, default=0)
    p.add_argument("--cp", type=int, default=0, help="show this context-parallel degree (inference)")
    p.set_defaults(func=cmd_plan)
