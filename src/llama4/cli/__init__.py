"""`llama4 <command>`: each subcommand parses its flags and calls one plain function.

Subcommands are registered in `_COMMANDS` by small `add_*` functions, so a feature adds its command
in one place without touching the others.
"""

from __future__ import annotations

import argparse
import os
import sys

from .convert import add_convert
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
             add_serve, add_convert]


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
    except BrokenPipeError:  # `llama4 generate ... | head`: the reader left; stop quietly, as `yes | head` does
        try:  # stdout's buffer still holds unwritten text; point it at devnull so the exit flush cannot fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
    except (ValueError, OSError, ImportError) as e:  # OSError: missing files, permissions, a full disk (ENOSPC)
        print(f"llama4 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop quietly (chat handles it itself and goes on)
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
