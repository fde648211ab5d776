"""`llama4 eval ppl`: perplexity of a model on a text file or a JSONL file of documents."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..data.jsonl import iter_jsonl
from ..eval.score import DEFAULT_BATCH_TOKENS, score_rolling
from .common import add_threads, load_model_and_tokenizer, positive_int


def read_documents(path: Path, field: str = "text") -> list[str]:
    """A .jsonl file: one document per line, in its `field`; any other file: the whole file, one document."""
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{where}: expected an object with a string {field!r} field, got {json.dumps(row)[:80]!r}")
        docs.append(row[field])
    if not docs:
        raise ValueError(f"{path}: no documents (expected one JSON object per line with a {field!r} field)")
    return docs


def cmd_ppl(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.stride is not None and args.window is None:
        raise ValueError("--stride needs --window (without a window every token sees the whole document)")
    docs = read_documents(Path(args.data), args.field)[:args.limit]
    model, tokenizer = load_model_and_tokenizer(args)
    ids = [tokenizer.encode(d, bos=True) for d in docs]  # BOS first: every token of the text is scored
    total = sum(max(len(x) - 1, 0) for x in ids)
    with tqdm(total=total, unit="tok", desc="ppl", file=sys.stderr, mininterval=0.5, disable=args.quiet) as bar:
        scores = score_rolling(model, ids, window=args.window, stride=args.stride, batch_tokens=args.batch_tokens,
                               progress=bar.update)
    logprob = sum(s.logprob for s in scores)
    n_tokens = sum(s.n_tokens for s in scores)
    if n_tokens == 0:
        raise ValueError(f"{args.data}: the documents are empty: nothing to score")
    n_words = sum(len(d.split()) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    result = {"documents": len(docs), "tokens": n_tokens, "words": n_words, "bytes": n_bytes,
              "logprob": logprob, "perplexity": math.exp(-logprob / n_tokens),
              "word_perplexity": math.exp(-logprob / max(n_words, 1)),
              "bits_per_byte": -logprob / max(n_bytes, 1) / math.log(2),
              "window": args.window, "stride": args.stride if args.window is None else (args.stride or args.window)}
    print(f"{len(docs)} document(s), {n_tokens} tokens scored"
          + (f" (window {args.window}, stride {result['stride']})" if args.window else " (full context)"))
    print(f"perplexity {result['perplexity']:.6g}  word perplexity {result['word_perplexity']:.6g}  "
          f"bits per byte {result['bits_per_byte']:.4f}  log-likelihood {logprob:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_eval_ppl(tasks) -> None:
    p = tasks.add_parser("ppl", help="perplexity on a text file, or a JSONL file with a text field per line")
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's)")
    p.add_argument("--data", required=True, help="a text file (one document) or JSONL (one document per line)")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="score with windows of N tokens at their absolute positions (default: the whole document "
                        "as context, through the KV cache)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="new tokens scored per window (default: the window; <= window)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N documents")
    p.add_argument("--batch-tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                   help=f"tokens per forward (default {DEFAULT_BATCH_TOKENS}; bounds activation memory)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights dtype (default: the checkpoint's); log-probs are computed in fp32")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads(p)
    p.set_defaults(func=cmd_ppl)
