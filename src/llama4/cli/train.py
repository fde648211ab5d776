"""`llama4 train --config FILE.toml [section.key=value ...] [--resume]` and `llama4 merge-lora`."""

from __future__ import annotations

import argparse

from .common import THREADS_HELP, add_threads, apply_threads


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.distributed import is_main, launched

    apply_threads(args)
    if launched():  # under torchrun: every rank trains its part, rank 0 reports
        from ..train.parallel_trainer import run_parallel as run
    else:
        from ..train.loop import run
    out = run(args.config, resume=args.resume, overrides=args.overrides)
    if is_main():
        print(f"trained: {out} (metrics.jsonl, loss.png, checkpoints/)")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from ..train.lora import merge_adapter

    apply_threads(args)
    print(f"merged: {merge_adapter(args.base, args.adapter, args.out)}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a TOML config",
                       description="Train from a TOML config; `section.key=value` arguments override it "
                                   "(e.g. optim.lr=1e-3 train.steps=200). Threads: " + THREADS_HELP + ". "
                                   "The progress line shows tokens/s and the thread count.")
    p.add_argument("--config", default=None, help="TOML training config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides, value in TOML syntax")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    add_threads(p)
    p.set_defaults(func=cmd_train)
    m = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base checkpoint")
    m.add_argument("base", help="base HF checkpoint directory")
    m.add_argument("adapter", help="adapter directory (adapter_model.safetensors + adapter_config.json)")
    m.add_argument("out", help="output HF checkpoint directory")
    add_threads(m)
    m.set_defaults(func=cmd_merge_lora)
