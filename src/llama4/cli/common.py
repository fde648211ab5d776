"""What several subcommands share: the --threads flag, and loading a checkpoint directory with its tokenizer."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

# Why one thread by default: torch's OpenMP workers spin while they wait, so on a machine that is busy
# with anything else each small kernel waits for a descheduled peer. Measured on a shared 2-core
# machine (docs/generation.md, docs/reliability.md): decode 58 tok/s with 1 thread, 8 tok/s with 2
# spinning threads; a training step 13.5x slower. OMP_WAIT_POLICY=PASSIVE fixes the spinning but only
# when set before torch is imported, which a library cannot do for its caller. So: 1 thread unless
# --threads N, or OMP_NUM_THREADS in the environment, asks for more.
THREADS_HELP = ("torch CPU threads (default: $OMP_NUM_THREADS if set, else 1, which is safe on a busy machine; "
                "on an idle many-core machine try the core count)")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= {low}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def token_count(text: str) -> int:
    """argparse type: a token count >= 1, with an optional binary suffix: 128k = 131072, 10M = 10485760
    (Llama 4's published windows are powers of two: Scout's 10M is 10 * 2**20)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (expected e.g. 8192, 128k or 10M)")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= 1 (a token count)")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 1


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's thread count from `args.threads` (or the default); returns it. Also bounds the
    `tokenizers` (Rust) pool, which reads its size when it first runs."""
    n = getattr(args, "threads", None) or default_threads()
    torch.set_num_threads(n)
    os.environ["RAYON_RS_NUM_CPUS"] = str(n)
    return n


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model in `args.model` (dtype `args.dtype`, `args.threads` threads) and its tokenizer."""
    from ..checkpoint import load
    from ..checkpoint.hub import resolve_checkpoint
    from ..text.tokenizer import Tokenizer

    model_dir = resolve_checkpoint(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such checkpoint directory")
    apply_threads(args)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = _load_maybe_parallel(model_dir, dtype, args) or load(model_dir, dtype=dtype).eval()
    if getattr(args, "adapter", None):
        from ..train.lora import apply_adapter

        apply_adapter(model, args.adapter)
    checkpoint_defaults(args, model)
    tok_path = args.tokenizer or next((model_dir / n for n in ("tokenizer.model", "tokenizer.json")
                                       if (model_dir / n).is_file()), None)
    tokenizer = Tokenizer(tok_path)
    return model, tokenizer


def _load_maybe_parallel(model_dir: Path, dtype, args: argparse.Namespace):
    """Under torchrun: the model split over the ranks by `--tp` / `--ep` (each rank reads only its
    slices); otherwise None (after refusing --tp / --ep without torchrun)."""
    from ..train.distributed import launched

    tp, ep = getattr(args, "tp", 1), getattr(args, "ep", 1)
    if not launched():
        if tp > 1 or ep > 1:
            raise ValueError(f"--tp {tp} --ep {ep} split the model over the processes of a torchrun launch; run "
                             f"`torchrun --nproc-per-node N -m llama4 {args.command} ...`")
        return None
    if getattr(args, "adapter", None):
        raise ValueError("--adapter is not supported under torchrun (merge it into the checkpoint first)")
    import atexit

    import torch.distributed as dist

    from ..train.distributed import init_from_env
    from ..train.parallel import load_parallel

    init_from_env()
    atexit.register(dist.destroy_process_group)
    return load_parallel(model_dir, tp=tp, ep=ep, dtype=dtype)


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
