"""`llama4 tokenizer train`: a small BPE tokenizer that keeps every Llama 4 special token."""

from __future__ import annotations

import argparse
from .common import add_threads, apply_threads, positive_int
from ..text.bpe import train_tokenizer
from ..text.tokenizer import Tokenizer


def cmd_train(args: argparse.Namespace) -> int:
    apply_threads(args)
    path = train_tokenizer(args.corpus, args.vocab_size, args.out)
    tok = Tokenizer(path)
    ordinary = tok.vocab_size - len(tok.special_tokens)
    print(f"wrote {path}: {ordinary:,} ordinary + {len(tok.special_tokens):,} special = {tok.vocab_size:,} ids")
    if ordinary < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge before reaching --vocab-size {args.vocab_size:,}")
    return 0


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a small byte-level BPE that keeps the Llama 4 special tokens")
    t.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text file(s) to train on")
    t.add_argument("--vocab-size", type=positive_int, required=True,
                   help="ordinary tokens (>= 256); the 2,048 special tokens come on top")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    add_threads(t)
    t.set_defaults(func=cmd_train)
