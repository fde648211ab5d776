"""`llama4 <command>`: each subcommand parses its flags and calls one plain function.

Subcommands are registered in `_COMMANDS` by small `add_*` functions, so a feature adds its command
in one place without touching the others.
"""

from __future__ import annotations

import argparse
import sys

from .data import add_data
from .demo import add_demo
from .eval import add_eval
from .generate import add_chat, add_generate
from .inspect import add_inspect
from .plan import add_plan
from .quantize import add_quantize
from .serve import add_serve
from .tokenizer import add_tokenizer
from .train import add_train


# Each entry adds one subcommand; features append theirs here.
_COMMANDS = [add_plan, add_inspect, add_tokenizer, add_data, add_train, add_generate, add_chat, add_eval, add_demo, add_quantize,
             add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama4", description="Llama 4 in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # OSError: missing files, permissions, a full disk (ENOSPC)
        print(f"llama4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
