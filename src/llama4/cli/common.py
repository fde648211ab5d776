"""What several subcommands share: loading a checkpoint directory with its tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model in `args.model` (dtype `args.dtype`, `args.threads` threads) and its tokenizer."""
    from ..checkpoint import load
    from ..text.tokenizer import Tokenizer

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such checkpoint directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load(model_dir, dtype=dtype).eval()
    if getattr(args, "adapter", None):
        from ..train.lora import apply_adapter

        apply_adapter(model, args.adapter)
    checkpoint_defaults(args, model)
    tok_path = args.tokenizer or next((model_dir / n for n in ("tokenizer.model", "tokenizer.json")
                                       if (model_dir / n).is_file()), None)
    tokenizer = Tokenizer(tok_path)
    return model, tokenizer


# Used when neither the flag nor the checkpoint says otherwise.
FALLBACKS = {"max_new_tokens": 256, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
             "repetition_penalty": 1.0, "num_frames": 8, "max_tiles": 16}


def checkpoint_defaults(args: argparse.Namespace, model) -> None:
    """Fill flags left unset (None) from the checkpoint's generation_config.json and media_config.json."""
    info = getattr(model, "side_info", None)
    from_ckpt = {**(info.generation if info else {}), **(info.media if info else {})}
    for name, fallback in FALLBACKS.items():
        if getattr(args, name, fallback) is None:
            setattr(args, name, from_ckpt.get(name, fallback))
