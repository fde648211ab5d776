"""`llama4 eval`: accuracy of a model on held-out synthetic questions."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..eval.synth_qa import evaluate, heldout_synthetic
from .common import add_threads, load_model_and_tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    args.dtype = getattr(args, "dtype", "auto")
    model, tokenizer = load_model_and_tokenizer(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else heldout_synthetic(model, Path(tmp), args.limit or 400, args.seed)
        result = evaluate(model, tokenizer, data, limit=args.limit, num_frames=args.num_frames)
    for question, expected, got in result.examples[:args.show]:
        print(f"  Q: {question:<42} expected: {expected:<13} got: {got!r}")
    print(f"{'group':<22} {'accuracy':>8}  correct/total")
    for group, r in result.summary().items():
        print(f"{group:<22} {r['accuracy']:>8.1%}  {r['correct']}/{r['total']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy on held-out chat questions (default: the synthetic held-out set)")
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's)")
    p.add_argument("--data", default=None, help="chat JSONL with reference answers (default: synthetic held-out)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--frames", dest="num_frames", type=int, default=None,
                   help="frames sampled per video (default: what the model was trained with, else 8)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) applied without merging")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic held-out set")
    p.add_argument("--show", type=int, default=6, help="print this many example answers")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    add_threads(p)
    p.set_defaults(func=cmd_eval)
