"""`llama4 serve`: the OpenAI-compatible server (FastAPI + uvicorn) over the continuous-batching engine.

    llama4 serve --model DIR --host 127.0.0.1 --port 8000 [--api-key KEY] [--kv-memory 2GiB]
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from .common import load_model_and_tokenizer

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--kv-memory {text!r}: expected a size like 512MiB, 2GiB or 1e9 bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _memory_budget(args, device: torch.device) -> int:
    if args.kv_memory:
        return parse_bytes(args.kv_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * args.kv_memory_fraction)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * args.kv_memory_fraction)


def build_engine(model, tokenizer, *, kv_memory: int, block_size: int = 16, max_running: int = 64,
                 prefill_chunk: int = 256, max_model_len: int | None = None, prefix_caching: bool = True,
                 kv_dtype: str | None = None):
    """The paged store, scheduler and engine thread for `model` (not started)."""
    from ..generation.scheduler import Scheduler
    from ..kv.paged import PagedKV
    from ..serve.engine import Engine

    text = model.config.text
    w = model.output.weight
    chunk = text.attention_chunk_size
    if chunk and chunk % block_size:
        block_size = next(b for b in (16, 8, 4, 2, 1) if chunk % b == 0)
    kv = PagedKV.from_memory(text, kv_memory, block_size, dtype=w.dtype, device=w.device,
                             prefix_caching=prefix_caching, kv_dtype=kv_dtype)
    sched = Scheduler(model, kv, max_running=max_running, prefill_chunk=prefill_chunk, tokenizer=tokenizer)
    limit = min(text.max_position_embeddings, max_model_len or text.max_position_embeddings)
    lo, hi = 0, limit  # the longest sequence one request may hold alone in this pool
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv.blocks_bound(mid) <= kv.num_blocks else (lo, mid - 1)
    if lo < 2:
        raise ValueError(f"--kv-memory {kv_memory} bytes holds {kv.num_blocks} KV blocks: not even one request "
                         f"fits (raise --kv-memory)")
    sched.window = lo
    return Engine(sched)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.app import ServeConfig, create_app

    model, tokenizer = load_model_and_tokenizer(args)
    dirs = [Path(d) for d in args.allowed_media_dir]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"--allowed-media-dir {d}: no such directory")
    engine = build_engine(model, tokenizer, kv_memory=_memory_budget(args, model.output.weight.device),
                          block_size=args.block_size, max_running=args.max_running, prefill_chunk=args.prefill_chunk,
                          max_model_len=args.max_model_len, prefix_caching=not args.no_prefix_caching,
                          kv_dtype=args.kv_dtype)
    api_key = args.api_key or os.environ.get("LLAMA4_API_KEY") or None
    cfg = ServeConfig(model_name=args.served_model_name or Path(args.model).name, api_key=api_key,
                      max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, allowed_media_dirs=dirs,
                      shutdown_timeout=args.shutdown_timeout)
    kv = engine.scheduler.kv
    print(f"llama4 serve: {cfg.model_name} on http://{args.host}:{args.port}  KV pool {kv.num_blocks} blocks x "
          f"{kv.block_size} positions ({kv.nbytes() / 2**20:.1f} MiB, {kv.kv_dtype or 'weights dtype'}), context window {engine.scheduler.window}",
          flush=True)
    uvicorn.run(create_app(engine, tokenizer, cfg), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: DIR's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LLAMA4_API_KEY)")
    p.add_argument("--kv-memory", default=None, help="KV pool size, e.g. 2GiB (default: --kv-memory-fraction of "
                                                     "free memory)")
    p.add_argument("--kv-memory-fraction", type=float, default=0.2)
    p.add_argument("--block-size", type=int, default=16, help="positions per KV block")
    p.add_argument("--max-running", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those (then 429)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per step (chunked prefill)")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + max_tokens")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20)
    p.add_argument("--allowed-media-dir", action="append", default=[],
                   help="directory whose files file:// image/video URLs may name (repeatable)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds running requests get to finish")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--kv-dtype", choices=["auto", "fp8", "int8"], default="auto",
                   help="KV pool elements: auto = the weights' dtype; fp8 / int8 = one byte with a scale per position "
                        "and head (the pool holds about twice the tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)
