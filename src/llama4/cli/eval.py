"""`llama4 eval`: accuracy on held-out synthetic questions, and sub-tasks (`llama4 eval <task> ...`).

`llama4 eval --model DIR` (no sub-task) scores exact match on the synthetic chat set. Each sub-task is
registered by an `add_*(subparsers)` function in `_EVAL_TASKS`, so a feature adds its sub-task with one
import and one list entry, without touching the others.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..eval.synth_qa import evaluate, heldout_synthetic
from .common import add_threads, load_model_and_tokenizer
from .eval_harness import add_eval_lm_eval
from .eval_ppl import add_eval_ppl

# Each entry adds one `llama4 eval <task>` sub-task to the subparsers it is given; features append theirs here.
_EVAL_TASKS = [add_eval_ppl, add_eval_lm_eval]


def cmd_eval(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("--model DIR is required (or name a sub-task: llama4 eval {"
                         + ",".join(sorted(args.eval_tasks)) + "} ...)")
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
    p = sub.add_parser("eval", help="accuracy on held-out chat questions (default: the synthetic held-out set), "
                                    "or a sub-task: llama4 eval <task> --help")
    # Not required=True here: `llama4 eval <task> --model DIR` gives --model to the sub-task; cmd_eval checks it.
    p.add_argument("--model", default=None, help="checkpoint directory (with its tokenizer)")
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
    tasks = p.add_subparsers(dest="eval_task", metavar="[TASK]", required=False,
                             help="optional sub-task (each has its own --help)")
    for add in _EVAL_TASKS:
        add(tasks)
    p.set_defaults(eval_tasks=list(tasks.choices))
