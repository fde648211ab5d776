"""`llama4 eval lm-eval`: lm-eval-harness's own evaluator (`simple_evaluate`) on a llama4 checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_threads, apply_threads, non_negative_int, positive_int


def _limit(text: str) -> int | float:
    """lm-eval's --limit: an int count of documents per task, or a fraction < 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"{text} is invalid: expected a count >= 1 or a fraction in (0, 1)")
    return int(value) if value >= 1 else value


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise ImportError(f"llama4 eval lm-eval needs lm-eval-harness: pip install lm-eval ({e})") from None
    from ..eval.harness import Llama4LM

    for p in args.include_path or []:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p}: no such directory")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager, known = None, set()
    if args.include_path:  # indexing lm-eval's ~15k built-in YAMLs takes seconds: skip it when the local ones do
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        known = set(manager.match_tasks(tasks))
    if not tasks or not all(t in known for t in tasks):
        manager = TaskManager(include_path=args.include_path or None)
        known = set(manager.match_tasks(tasks))
    missing = [t for t in tasks if t not in known and not any(c in t for c in "*?[")]
    if missing or not tasks:
        raise ValueError(f"--tasks {args.tasks}: unknown task(s) {missing or tasks} (lm-eval knows "
                         f"{len(manager.all_tasks)} tasks; local YAMLs need --include-path DIR)")
    apply_threads(args)
    lm = Llama4LM(args.model, dtype=args.dtype, batch_tokens=args.batch_tokens, max_length=args.max_length,
                  seed=args.seed)
    gen_kwargs = json.loads(args.gen_kwargs) if args.gen_kwargs and args.gen_kwargs.lstrip().startswith("{") \
        else args.gen_kwargs
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=manager, apply_chat_template=args.apply_chat_template,
                              fewshot_as_multiturn=args.fewshot_as_multiturn,
                              system_instruction=args.system_instruction, gen_kwargs=gen_kwargs,
                              log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters,
                              random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed)
    print(make_table(results))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    print(f"results: {out}")
    return 0


def add_eval_lm_eval(tasks) -> None:
    p = tasks.add_parser("lm-eval", help="lm-eval-harness tasks through lm-eval's own evaluator")
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or groups, or glob patterns)")
    p.add_argument("--output", required=True, help="write lm-eval's results JSON here")
    p.add_argument("--num-fewshot", type=non_negative_int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (a count, or a fraction < 1)")
    p.add_argument("--include-path", action="append", default=None,
                   help="a directory of extra task YAMLs (repeatable)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the checkpoint's chat template")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="with --apply-chat-template: few-shot examples as earlier chat turns")
    p.add_argument("--system-instruction", default=None, help="a system prompt for every request")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation overrides for generate_until tasks, e.g. 'max_gen_toks=64' or a JSON object")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--bootstrap-iters", type=non_negative_int, default=100000,
                   help="bootstrap resamples for standard errors (0: none; lm-eval's default 100000)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context length lm-eval may use (default: the model's max_position_embeddings)")
    p.add_argument("--batch-tokens", type=positive_int, default=2048, help="tokens per forward (default 2048)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="weights dtype")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling, sampling)")
    add_threads(p)
    p.set_defaults(func=cmd_lm_eval)
