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
    tok_path = args.tokenizer or next((model_dir / n for n in ("tokenizer.model", "tokenizer.json")
                                       if (model_dir / n).is_file()), None)
    tokenizer = Tokenizer(tok_path)
    return model, tokenizer
